"""The job's budget feedback: a model that misses its budget on two timings is rebuilt for a
tighter one; the fastest model built is kept; one rule decides "meets the budget"."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from osscar_export import pipeline
from osscar_export.allocate import allocate
from osscar_export.errors import OsscarError
from osscar_export.job import BUDGET_TOLERANCE, Attempt, JobConfig, check_budget, meets_budget
from osscar_export.latency.timing import MeasureSettings, Timing
from osscar_export.pipeline import BUDGET_RETRIES, _faster, _tighter_allocation, _timings, parse_budgets
from tests.test_search import two_kind_instance

quiet = lambda msg: None  # noqa: E731


def test_over_budget_models_get_a_tighter_allocation_a_bounded_number_of_times():
    table, curves, _ = two_kind_instance()
    prep = SimpleNamespace(curves=curves, table=table)
    cfg = JobConfig(model="m", search=False)
    budget = 1.0 + 4 * 0.5 * 6
    alloc = allocate(curves, table, budget)
    assert _tighter_allocation(prep, cfg, budget, alloc, budget * (1 + BUDGET_TOLERANCE), 1, quiet) is None
    tighter, candidates = _tighter_allocation(prep, cfg, budget, alloc, budget * 1.2, 1, quiet)
    assert candidates == []
    assert tighter.predicted_ms <= alloc.predicted_ms / 1.2 + 1e-9
    # the last attempt (BUDGET_RETRIES + 1 models built) gets no further rebuild
    assert _tighter_allocation(prep, cfg, budget, alloc, budget * 1.2, BUDGET_RETRIES, quiet) is not None
    assert _tighter_allocation(prep, cfg, budget, alloc, budget * 1.2, BUDGET_RETRIES + 1, quiet) is None
    # nothing faster than the fastest allocation: keep what was built
    fastest = allocate(curves, table, 1.0 + 4 * 0.5 * 2)
    assert _tighter_allocation(prep, cfg, fastest.budget_ms, fastest, fastest.budget_ms * 1.2, 1, quiet) is None


def test_meets_budget_is_one_rule_with_its_boundary():
    assert meets_budget(1.0, 1.0) and meets_budget(1.0 + BUDGET_TOLERANCE, 1.0)
    assert not meets_budget(math.nextafter(1.0 + BUDGET_TOLERANCE, math.inf), 1.0)


def _fake_measure(values: list[float], monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make ``pipeline.measure`` return ``values`` in order; returns the list it pops from."""
    queue = list(values)
    monkeypatch.setattr(pipeline, "measure", lambda runnable, inputs, settings: Timing(queue.pop(0), (), 0.0, 0.0, 1, False))
    return queue


@pytest.mark.parametrize(("values", "taken"), [
    ([1.0], [1.0]),  # within the budget: timed once
    ([1.02], [1.02]),  # exactly at the tolerance: timed once
    ([1.5, 0.9], [1.5, 0.9]),  # one disturbed timing: the second, lower one counts
    ([1.5, 1.7], [1.5, 1.7]),  # two timings over: a miss
])
def test_a_timing_over_the_budget_is_taken_again(values: list[float], taken: list[float], monkeypatch: pytest.MonkeyPatch):
    left = _fake_measure(values + [99.0], monkeypatch)
    timings = _timings(object(), (), MeasureSettings(), 1.0, "x", quiet)
    assert [t.ms for t in timings] == taken and left == [99.0]


def _attempt(tmp_path: Path, number: int, ms: float) -> Attempt:
    folder = tmp_path / f".attempt{number}"
    folder.mkdir()
    (folder / "model.onnx").write_text(str(number))
    return Attempt(number, None, [], None, "dense", {}, folder, {}, ms, False)


def test_the_fastest_attempt_is_kept_and_the_others_deleted(tmp_path: Path):
    first = _attempt(tmp_path, 1, 1.10)
    assert _faster(first, None) is first
    second = _attempt(tmp_path, 2, 1.30)  # a rebuild that measured slower
    assert _faster(second, first) is first and not second.folder.exists()
    third = _attempt(tmp_path, 3, 1.10)  # a tie keeps the earlier, less pruned model
    assert _faster(third, first) is first and not third.folder.exists()
    fourth = _attempt(tmp_path, 4, 0.95)
    assert _faster(fourth, first) is fourth and not first.folder.exists() and fourth.folder.exists()


def test_budgets_must_be_finite_and_speedups_above_one():
    assert parse_budgets(["2", "0.5"], "--latency-ms") == (2.0, 0.5)
    assert parse_budgets(["1.01"], "--speedup") == (1.01,)
    for flag, value, message in [("--latency-ms", "0", "above 0"), ("--latency-ms", "inf", "finite"),
                                 ("--latency-ms", "nan", "finite"), ("--speedup", "1", "above 1"),
                                 ("--speedup", "1e400", "finite"), ("--speedup", "x", "is not a number")]:
        with pytest.raises(OsscarError, match=f"{flag} .*{message}"):
            parse_budgets([value], flag)
    # the Python API refuses the same budgets
    with pytest.raises(OsscarError, match="--speedup 1: a speedup must be a finite number above 1"):
        JobConfig(model="m", speedup=(1.0,))
    with pytest.raises(OsscarError, match="--latency-ms inf"):
        JobConfig(model="m", latency_ms=(math.inf,))
    assert check_budget(0.001, "--latency-ms") == 0.001
