"""The job's budget feedback: a model measured over its budget is rebuilt for a tighter one."""

from __future__ import annotations

from types import SimpleNamespace

from osscar_export.allocate import allocate
from osscar_export.job import JobConfig
from osscar_export.pipeline import BUDGET_RETRIES, BUDGET_TOLERANCE, _tighter_allocation
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
