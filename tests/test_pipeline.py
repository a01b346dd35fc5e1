"""The job's budget feedback (a model measured over its budget is rebuilt for a tighter one) and
its split of the calibration samples."""

from __future__ import annotations

from types import SimpleNamespace

from osscar_export.allocate import allocate
from osscar_export.pipeline import BUDGET_RETRIES, BUDGET_TOLERANCE, JobConfig, _tighter_allocation, split_calibration
from tests.test_search import two_kind_instance


def test_over_budget_models_get_a_tighter_allocation_a_bounded_number_of_times():
    table, curves, _ = two_kind_instance()
    prep = SimpleNamespace(curves=curves, table=table)
    cfg = JobConfig(model="m", search=False)
    budget = 1.0 + 4 * 0.5 * 6
    alloc = allocate(curves, table, budget)
    quiet = lambda msg: None  # noqa: E731
    assert _tighter_allocation(prep, cfg, budget, alloc, budget * (1 + BUDGET_TOLERANCE / 2), 1, quiet) is None
    tighter, candidates = _tighter_allocation(prep, cfg, budget, alloc, budget * 1.2, 1, quiet)
    assert candidates == []
    assert tighter.predicted_ms <= alloc.predicted_ms / 1.2 + 1e-9
    assert _tighter_allocation(prep, cfg, budget, alloc, budget * 1.2, BUDGET_RETRIES + 1, quiet) is None
    # nothing faster than the fastest allocation: keep what was built
    fastest = allocate(curves, table, 1.0 + 4 * 0.5 * 2)
    assert _tighter_allocation(prep, cfg, fastest.budget_ms, fastest, fastest.budget_ms * 1.2, 1, quiet) is None


def test_calibration_split_holds_out_the_last_samples_and_never_starves_calibration():
    batches = [(i,) for i in range(40)]
    calibration, held = split_calibration(batches, 1, 32, 8)
    assert calibration == batches[:32] and held == batches[32:]
    calibration, held = split_calibration(batches[:20], 2, 32, 8)  # a source short of samples (batches of 2)
    assert held == batches[16:20] and calibration == batches[:16]  # 4 batches = 8 samples, a fifth: fits the quarter
    calibration, held = split_calibration(batches[:12], 1, 32, 8)
    assert len(held) == 3 and calibration + held == batches[:12]  # at most a quarter
    assert split_calibration(batches[:3], 1, 32, 8) == (batches[:3], [])
    more = [(i,) for i in range(60)]
    assert split_calibration(more, 1, 32, 8) == (more[:52], more[52:])  # a larger file calibrates on the rest
    assert split_calibration(batches, 1, 32, 0) == (batches, [])
