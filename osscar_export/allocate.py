"""Allocate: one kept width per group, least total loss within a latency budget.

A multiple-choice knapsack solved by dynamic programming over a discretised time axis, as SPDY
does: ``minimise sum_g e_g(k_g)  s.t.  base + scale * sum_g t_g(k_g) <= budget`` (the table's
fitted additive model; times below are already multiplied by ``scale``).

Loss normalisation: each group's curve is divided by its largest loss (for a monotone curve, the
loss at its smallest candidate width), so every curve spans [0, 1]. Raw layer objectives are in the units of each
layer's activations, which differ by orders of magnitude across layers; dividing by the curve's
own maximum needs nothing beyond the curve. A curve that is zero everywhere (dead structures)
stays zero: those widths are free.

Discretisation (exact feasibility): every group's minimum time is taken out first, so the DP
axis covers only the time *above* the fastest configuration; times are then rounded UP to
buckets. Rounding up can only over-estimate, so any DP solution truly meets the budget (up to a
relative 1e-9 of slack that keeps exact multiples of a bucket from being pushed up by float
round-off), and the fastest configuration (all zeros on the axis) is always found when the
budget allows it.
``predicted_ms`` is computed from the un-discretised table. See docs/design.md, section Allocate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from osscar_export.errors import InfeasibleBudgetError, LatencyTableError, PlanError
from osscar_export.latency.table import LatencyTable

Curves = Mapping[str, tuple[Sequence[int], Sequence[float]]]

# Relative slack when rounding times up to buckets: a time that is an exact multiple of the bucket
# in real arithmetic must not be pushed one bucket up by float round-off.
_ROUND_SLACK = 1e-9


@dataclass(frozen=True)
class Allocation:
    """Chosen widths, the table's (un-discretised) prediction and the summed normalised loss
    (without the weights the knapsack may have used, so allocations compare)."""

    widths: dict[str, int]
    predicted_ms: float
    loss: float
    budget_ms: float


@dataclass(frozen=True)
class _Options:
    """One group's candidates, sorted by width descending (ties in loss keep the wider one)."""

    name: str
    widths: np.ndarray
    ms: np.ndarray
    loss: np.ndarray  # normalised


def _options(curves: Curves, table: LatencyTable, weights: Mapping[str, float] | None = None) -> tuple[list[_Options], float]:
    """Candidates per group (curve widths the table measured) and the fixed time of the rest;
    ``weights`` (group name → multiplier, default 1) scale the normalised losses."""
    missing = sorted(set(curves) - set(table.groups))
    if missing:
        raise LatencyTableError(f"latency table has no group(s) {missing[:5]}: it was measured for another plan")
    options = []
    for name, (widths, losses) in curves.items():
        widths, losses = np.asarray(widths), np.asarray(losses, dtype=np.float64)
        if widths.shape != losses.shape or widths.ndim != 1:
            raise PlanError(f"curve of {name!r}: widths {widths.shape} and losses {losses.shape} differ")
        if not np.all(np.isfinite(losses)):
            raise PlanError(f"curve of {name!r} has non-finite losses")
        measured = set(table.widths(name))
        keep = np.array([int(w) in measured for w in widths], dtype=bool)
        if not keep.any():
            raise PlanError(
                f"no width of the curve of {name!r} ({sorted(int(w) for w in widths)[:8]}...) was measured in "
                f"the latency table ({sorted(measured)[:8]}...): use the table's width grid for the solver"
            )
        widths, losses = widths[keep].astype(np.int64), losses[keep]
        order = np.argsort(-widths, kind="stable")
        widths, losses = widths[order], losses[order]
        norm = float(np.abs(losses).max()) or 1.0
        ms = table.scale * np.array([table.ms(name, int(w)) for w in widths])
        weight = float(weights.get(name, 1.0)) if weights else 1.0
        if not (math.isfinite(weight) and weight > 0):
            raise PlanError(f"loss weight of {name!r} must be a positive number, got {weight}")
        options.append(_Options(name, widths, ms, weight * losses / norm))
    fixed = table.base_ms + table.scale * sum(table.ms(g, table.full_width(g)) for g in table.groups if g not in curves)
    return options, fixed


def min_latency_ms(curves: Curves, table: LatencyTable) -> float:
    """The fastest configuration the curves allow: base + scale * (fixed groups + sum_g min_k t_g(k))."""
    options, fixed = _options(curves, table)
    return fixed + sum(float(o.ms.min()) for o in options)


def allocate(curves: Curves, table: LatencyTable, budget_ms: float, *, buckets: int = 10_000,
             weights: Mapping[str, float] | None = None) -> Allocation:
    """Widths for the groups in ``curves`` (others stay full) meeting ``budget_ms``, least loss.

    ``weights`` multiplies each group's normalised curve (sensitivity coefficients, as SPDY fits;
    see ``search``). O(groups x widths x buckets), vectorised over buckets and widths per group.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    options, fixed = _options(curves, table, weights)
    fastest = fixed + sum(float(o.ms.min()) for o in options)
    if fastest > budget_ms:
        raise InfeasibleBudgetError(
            f"no allocation meets {budget_ms:.4g} ms: the fastest configuration the table allows takes "
            f"{fastest:.4g} ms (base {table.base_ms:.4g} ms + every group at its fastest width)",
            min_latency_ms=fastest,
        )
    slack = budget_ms - fastest  # time available above the fastest configuration
    bucket = slack / buckets if slack > 0 else 0.0
    dp = np.zeros(buckets + 1)  # dp[b]: least loss of the groups so far using at most b buckets
    choices = []
    taus = []
    for o in options:
        excess = o.ms - o.ms.min()
        if bucket > 0:
            tau = np.ceil(excess / bucket * (1 - _ROUND_SLACK)).astype(np.int64)
        else:
            tau = np.where(excess > 0, buckets + 1, 0)
        cand = np.full((len(tau), buckets + 1), np.inf)
        for i, t in enumerate(tau):
            if t <= buckets:
                cand[i, t:] = dp[: buckets + 1 - t] + o.loss[i]
        choice = np.argmin(cand, axis=0)
        dp = cand[choice, np.arange(buckets + 1)]
        choices.append(choice)
        taus.append(tau)
    widths: dict[str, int] = {}
    b = buckets
    for o, choice, tau in zip(reversed(options), reversed(choices), reversed(taus)):
        i = int(choice[b])
        widths[o.name] = int(o.widths[i])
        b -= int(tau[i])
    widths = {o.name: widths[o.name] for o in options}
    return Allocation(widths, table.predict(widths), normalised_loss(curves, table, widths), budget_ms)


def group_losses(curves: Curves, table: LatencyTable, widths: Mapping[str, int]) -> dict[str, float]:
    """Each given group's normalised (unweighted) loss at its width; groups not given are dense."""
    options, _ = _options(curves, table)
    return {o.name: float(o.loss[list(o.widths).index(widths[o.name])]) for o in options if o.name in widths}


def normalised_loss(curves: Curves, table: LatencyTable, widths: Mapping[str, int]) -> float:
    """Summed normalised (unweighted) loss of an allocation: comparable across allocations."""
    return sum(group_losses(curves, table, widths).values())


def tradeoff(curves: Curves, table: LatencyTable, budgets_ms: Sequence[float] | None = None, *,
             points: int = 20, buckets: int = 10_000) -> list[Allocation]:
    """Allocations across many budgets: the loss/latency trade-off of one error-curve database.

    Without ``budgets_ms``: ``points`` budgets evenly spaced from the fastest configuration to
    every group at its widest candidate. Infeasible budgets among explicit ones raise, naming the minimum.
    """
    if budgets_ms is None:
        options, fixed = _options(curves, table)
        lo = fixed + sum(float(o.ms.min()) for o in options)
        hi = fixed + sum(float(o.ms[0]) for o in options)  # every group at its widest candidate
        budgets_ms = [lo + (hi - lo) * i / max(1, points - 1) for i in range(points)]
    return [allocate(curves, table, b, buckets=buckets) for b in budgets_ms]
