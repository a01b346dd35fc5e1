"""The budget allocator: optimal by enumeration, truly within budget, clear when infeasible."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from osscar_export.allocate import allocate, min_latency_ms, tradeoff
from osscar_export.errors import InfeasibleBudgetError, LatencyTableError, PlanError
from osscar_export.latency.table import LatencyTable


def make_table(times: dict[str, dict[int, float]], base_ms: float) -> LatencyTable:
    """A table with one signature per group (times given directly, nothing measured)."""
    dense = base_ms + sum(c[max(c)] for c in times.values())
    return LatencyTable(
        fingerprint={"cpu": "test"}, target={"name": "test"}, model_signature="m", measurement={},
        dense_ms=dense, base_ms=base_ms, groups={g: f"sig-{g}" for g in times},
        times={f"sig-{g}": dict(c) for g, c in times.items()},
    )


def random_instance(rng: np.random.Generator, groups: int, levels: int, integer_times: bool):
    """Curves normalised already (max loss 1 per group) so brute force sees the DP's losses."""
    times, curves = {}, {}
    for g in range(groups):
        widths = sorted(rng.choice(np.arange(1, 40), size=levels, replace=False).tolist())
        if integer_times:
            ms = rng.integers(1, 12, size=levels).astype(float)
        else:
            ms = rng.uniform(0.05, 3.0, size=levels)
        losses = rng.uniform(0, 1, size=levels)
        losses /= losses.max()
        name = f"g{g}"
        times[name] = dict(zip(widths, ms.tolist()))
        curves[name] = (widths, losses.tolist())
    return times, curves


def brute_force(times, curves, base, budget):
    """Least summed loss over every combination meeting the budget (inf when none does)."""
    names = list(curves)
    best = np.inf
    for combo in itertools.product(*(range(len(curves[n][0])) for n in names)):
        t = base + sum(times[n][curves[n][0][i]] for n, i in zip(names, combo))
        if t <= budget + 1e-12:
            best = min(best, sum(curves[n][1][i] for n, i in zip(names, combo)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_is_optimal_when_times_are_on_the_bucket_grid(seed):
    rng = np.random.default_rng(seed)
    times, curves = random_instance(rng, groups=int(rng.integers(2, 5)), levels=int(rng.integers(2, 5)), integer_times=True)
    base = 3.0
    table = make_table(times, base)
    fastest = base + sum(min(c.values()) for c in times.values())
    slowest = base + sum(max(c.values()) for c in times.values())
    slack = int(rng.integers(0, int(slowest - fastest) + 1))
    budget = fastest + slack
    # buckets == slack makes one bucket exactly 1 ms, the grid of the integer times: no rounding.
    alloc = allocate(curves, table, budget, buckets=max(slack, 1))
    assert alloc.predicted_ms <= budget + 1e-9
    assert alloc.loss == pytest.approx(brute_force(times, curves, base, budget), abs=1e-12)
    # the reported loss and time are those of the reported widths
    assert alloc.predicted_ms == pytest.approx(base + sum(times[g][w] for g, w in alloc.widths.items()))
    assert alloc.loss == pytest.approx(sum(curves[g][1][curves[g][0].index(w)] for g, w in alloc.widths.items()))


@pytest.mark.parametrize("seed", range(12))
def test_dp_is_feasible_and_near_optimal_for_arbitrary_times(seed):
    rng = np.random.default_rng(100 + seed)
    groups = int(rng.integers(2, 5))
    times, curves = random_instance(rng, groups=groups, levels=int(rng.integers(2, 6)), integer_times=False)
    base = 1.7
    table = make_table(times, base)
    fastest = base + sum(min(c.values()) for c in times.values())
    slowest = base + sum(max(c.values()) for c in times.values())
    budget = fastest + rng.uniform(0, 1) * (slowest - fastest)
    buckets = 200
    alloc = allocate(curves, table, budget, buckets=buckets)
    assert alloc.predicted_ms <= budget
    optimum = brute_force(times, curves, base, budget)
    assert alloc.loss >= optimum - 1e-12
    # rounding up loses at most one bucket per group: the DP beats the optimum of a budget that
    # much tighter.
    bucket = (budget - fastest) / buckets
    assert alloc.loss <= brute_force(times, curves, base, budget - groups * bucket) + 1e-12


def test_infeasible_budget_reports_the_smallest_achievable_latency():
    times = {"a": {4: 1.0, 8: 2.5, 16: 4.0}, "b": {1: 0.5, 2: 0.75}, "c": {8: 3.0, 16: 2.0}}
    curves = {g: (sorted(c), [1.0 - i / len(c) for i in range(len(c))]) for g, c in times.items()}
    table = make_table(times, base_ms=2.0)
    want = 2.0 + 1.0 + 0.5 + 2.0  # c's fastest width is its widest: latency is not monotone
    assert min_latency_ms(curves, table) == pytest.approx(want)
    with pytest.raises(InfeasibleBudgetError) as err:
        allocate(curves, table, want - 0.01)
    assert err.value.min_latency_ms == pytest.approx(want)
    assert f"{want:.4g}" in str(err.value)
    at_minimum = allocate(curves, table, want)
    assert at_minimum.widths == {"a": 4, "b": 1, "c": 16}
    assert at_minimum.predicted_ms == pytest.approx(want)


def test_groups_without_a_curve_stay_full_and_count_in_the_time():
    times = {"a": {1: 1.0, 2: 2.0}, "fixed": {3: 5.0, 6: 7.0}}
    table = make_table(times, base_ms=1.0)
    curves = {"a": ([1, 2], [1.0, 0.0])}
    assert min_latency_ms(curves, table) == pytest.approx(1.0 + 7.0 + 1.0)
    alloc = allocate(curves, table, 10.0)
    assert alloc.widths == {"a": 2}
    assert alloc.predicted_ms == pytest.approx(10.0)
    with pytest.raises(InfeasibleBudgetError):
        allocate(curves, table, 8.9)


def test_the_tables_calibrated_scale_is_applied():
    times = {"a": {1: 1.0, 2: 2.0}, "b": {1: 1.0, 2: 3.0}}
    table = make_table(times, base_ms=1.0)
    table.scale = 2.0  # T = 1 + 2 * (t_a + t_b)
    curves = {"a": ([1, 2], [1.0, 0.0]), "b": ([1, 2], [1.0, 0.0])}
    assert min_latency_ms(curves, table) == pytest.approx(1.0 + 2 * 2.0)
    alloc = allocate(curves, table, 1.0 + 2 * (2.0 + 1.0))
    assert alloc.widths == {"a": 2, "b": 1}
    assert alloc.predicted_ms == pytest.approx(7.0) == table.predict(alloc.widths)
    with pytest.raises(InfeasibleBudgetError) as err:
        allocate(curves, table, 4.9)
    assert err.value.min_latency_ms == pytest.approx(5.0)


def test_each_curve_is_normalised_by_its_own_scale():
    times = {"a": {1: 1.0, 2: 2.0}, "b": {1: 1.0, 2: 2.0}}
    table = make_table(times, base_ms=0.0)
    # relative to its own worst case, pruning a costs 0.9 and pruning b costs 0.2: prune b, even
    # though b's raw numbers are 1000x larger.
    curves = {"a": ([1, 2], [1.0, 0.1]), "b": ([1, 2], [1000.0, 800.0])}
    alloc = allocate(curves, table, 3.0)
    assert alloc.widths == {"a": 2, "b": 1}
    assert alloc.loss == pytest.approx(0.1 + 1.0)


def test_curve_widths_must_be_in_the_table():
    table = make_table({"a": {8: 1.0, 16: 2.0}}, base_ms=0.0)
    with pytest.raises(PlanError, match="width grid"):
        allocate({"a": ([3, 5], [1.0, 0.0])}, table, 5.0)
    with pytest.raises(LatencyTableError, match="no group"):
        allocate({"zzz": ([8, 16], [1.0, 0.0])}, table, 5.0)
    # widths the table lacks are dropped; the rest are still candidates
    assert allocate({"a": ([3, 8, 16], [2.0, 1.0, 0.0])}, table, 1.5).widths == {"a": 8}


def test_tradeoff_spans_fastest_to_widest():
    rng = np.random.default_rng(7)
    times, curves = random_instance(rng, groups=4, levels=5, integer_times=False)
    for g in curves:  # the widest candidate loses nothing, as a dense layer does
        widths, losses = curves[g]
        losses[widths.index(max(widths))] = 0.0
    table = make_table(times, base_ms=1.0)
    allocs = tradeoff(curves, table, points=6, buckets=2000)
    assert len(allocs) == 6
    assert allocs[0].predicted_ms == pytest.approx(min_latency_ms(curves, table))
    widest = 1.0 + sum(times[g][max(curves[g][0])] for g in curves)
    assert allocs[-1].budget_ms == pytest.approx(widest)
    assert all(a.predicted_ms <= a.budget_ms + 1e-9 for a in allocs)
    assert allocs[-1].loss <= allocs[0].loss
    # rounding up costs at most one bucket per group: a budget that much above the widest
    # configuration gets it, with zero loss
    bucket = (widest - allocs[0].budget_ms) / 2000
    roomy = allocate(curves, table, widest + 4 * bucket * 1.01, buckets=2000)
    assert roomy.loss == pytest.approx(0.0)
    explicit = tradeoff(curves, table, [allocs[2].budget_ms])
    assert explicit[0].widths == allocs[2].widths
