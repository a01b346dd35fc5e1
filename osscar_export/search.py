"""Choose the allocation by its end-to-end loss on held-out samples (SPDY's idea, made cheap).

The knapsack (``allocate``) adds per-group layer losses, each normalised by its own curve's
maximum. Those units do not say how much a layer's error hurts the model's output. SPDY repairs
the sum with one sensitivity coefficient per layer, searched against the end-to-end loss over
hundreds of model evaluations. Here each coefficient is *measured* instead, with one evaluation
per group: prune that group alone to its width in the uniform allocation (the operating point),
re-fit it, and take the rise of the end-to-end loss; the coefficient makes the group's weighted
normalised loss at that width equal to the rise.

The coefficients and every score use samples held out of the Gram matrices: the re-fit is fitted
to the calibration samples, so on them pruning looks milder than it is.

Candidates: the plain knapsack, the knapsack with the measured coefficients, the knapsack with
each group kind re-weighted by a geometric grid of factors, and the uniform allocation. Each is
built cheaply: every group's support is its error curve's support at the chosen width (stored
with the curve), re-fitted exactly on the dense Grams and written into a working copy of the
dense model (restored after); the lowest held-out loss wins. The final model is then pruned
afresh at the winner's widths. See docs/design.md, "Search"; the measurements behind these
choices are in docs/results.md.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from osscar_export import cache
from osscar_export.allocate import Allocation, Curves, allocate, group_losses, normalised_loss
from osscar_export.latency.table import LatencyTable
from osscar_export.passes.base import Grams
from osscar_export.plan import StructurePlan
from osscar_export.passes.runner import GraphRunner, RunState
from osscar_export.passes.materialize import writable_copy, zero_structures
from osscar_export.passes.module_edit import bias, owner
from osscar_export.passes.solve import GroupSolution, refit_group
from osscar_export.prune import group_curve
from osscar_export.tasks import Task

Batch = tuple[torch.Tensor, ...]
Log = Callable[[str], None]

# Coefficients tried for each group kind (relative to the others): a factor 8 either way covers
# the KV-vs-MLP mis-weighting seen on SmolLM2 with room to spare.
KIND_FACTORS = (0.125, 0.25, 0.5, 2.0, 4.0, 8.0)
# A group whose probe did not raise the loss still gets this fraction of the median coefficient:
# the knapsack needs positive weights, and one probe's noise should not make a group free.
SENSITIVITY_FLOOR = 1e-3


@dataclass(frozen=True)
class Candidate:
    """One allocation tried: how it was made, its widths and prediction, its end-to-end score."""

    name: str
    allocation: Allocation
    score: float


def uniform_allocation(curves: Curves, table: LatencyTable, budget_ms: float) -> Allocation | None:
    """Every group at about one keep fraction: the largest fraction whose widths (each group's
    smallest measured curve width at or above ``fraction · count``) the table predicts within
    the budget; None when even the narrowest such allocation does not fit."""
    grid = {g: sorted(set(int(w) for w in widths) & set(table.widths(g))) for g, (widths, _) in curves.items()}
    full = {g: table.full_width(g) for g in grid}

    def widths_at(fraction: float) -> dict[str, int]:
        return {g: next((w for w in ws if w >= fraction * full[g] - 1e-9), ws[-1]) for g, ws in grid.items()}

    fractions = sorted({w / full[g] for g, ws in grid.items() for w in ws}, reverse=True)
    for f in fractions:
        widths = widths_at(f)
        predicted = table.predict(widths)
        if predicted <= budget_ms:
            return Allocation(widths, predicted, normalised_loss(curves, table, widths), budget_ms)
    return None


def probe_widths(curves: Curves, table: LatencyTable, budget_ms: float) -> dict[str, int]:
    """Where each group's sensitivity is measured: its width in the uniform allocation, or its
    widest narrower curve width where that is the full width; the narrowest widths when even
    uniform pruning does not fit."""
    uniform = uniform_allocation(curves, table, budget_ms)
    probes = {}
    for g, (widths, _) in curves.items():
        grid = sorted(set(int(w) for w in widths) & set(table.widths(g)))
        below = [w for w in grid if w < table.full_width(g)] or grid
        probes[g] = grid[0] if uniform is None else min(uniform.widths[g], below[-1])
    return probes


def sensitivities(curves: Curves, table: LatencyTable, at: Mapping[str, int],
                  score: Callable[[Mapping[str, int]], float]) -> dict[str, float]:
    """Knapsack weights that turn each group's normalised loss at ``at[g]`` into the end-to-end
    loss rise of pruning that group alone to it (``score`` of a one-group allocation)."""
    base = score({})
    rise = {g: score({g: w}) - base for g, w in tqdm(at.items(), desc="sensitivities", leave=False)}
    layer = group_losses(curves, table, at)
    coefficient = {g: rise[g] / layer[g] for g in at if layer[g] > 0 and rise[g] > 0}
    median = statistics.median(coefficient.values()) if coefficient else 1.0
    return {g: max(coefficient.get(g, 0.0), SENSITIVITY_FLOOR * median) if layer[g] > 0 else median for g in at}


def candidates(curves: Curves, table: LatencyTable, budget_ms: float, kinds: Mapping[str, str],
               sensitivity: Mapping[str, float] | None = None) -> list[tuple[str, Allocation]]:
    """The plain knapsack, the knapsack weighted by ``sensitivity`` (when given), the knapsack
    with each kind re-weighted by every factor of ``KIND_FACTORS``, and the uniform allocation;
    duplicates (same widths) dropped, the first name kept."""
    found: list[tuple[str, Allocation]] = [("knapsack", allocate(curves, table, budget_ms))]
    if sensitivity is not None:
        found.append(("knapsack, measured sensitivities", allocate(curves, table, budget_ms, weights=sensitivity)))
    names = sorted(set(kinds.values()))
    for kind in names[1:] if len(names) > 1 else ():
        for factor in KIND_FACTORS:
            weights = {g: factor for g, k in kinds.items() if k == kind}
            found.append((f"knapsack, {kind} loss x{factor:g}", allocate(curves, table, budget_ms, weights=weights)))
    uniform = uniform_allocation(curves, table, budget_ms)
    if uniform is not None:
        found.append(("uniform", uniform))
    unique: dict[tuple, tuple[str, Allocation]] = {}
    for name, a in found:
        unique.setdefault(tuple(sorted(a.widths.items())), (name, a))
    return list(unique.values())


class Scorer:
    """Builds and scores candidate allocations on the dense model; solves and scores are memoised."""

    def __init__(self, plan: StructurePlan, grams: Grams, curves: Curves, batches: Sequence[Batch], task: Task,
                 damp: float = 0.01, cache_dir: str | Path | None = None, scores_file: Path | None = None,
                 intercept: bool = False, dense_outputs: Sequence[torch.Tensor | None] | None = None):
        """``curves`` as ``error_curves`` made them (same damping and intercept; its ``cache_dir``
        holds the supports); ``batches`` are scored, and should be samples the Grams did not see. Scores
        are read from and saved to ``scores_file`` (``cache.scores_path``), so a re-run of the
        job scores nothing twice. ``dense_outputs`` are the dense model's on ``batches``, when the
        caller has them already."""
        self.plan, self.grams, self.curves, self.task = plan, grams, curves, task
        self.batches = list(batches)
        self.damp, self.cache_dir, self.intercept = damp, cache_dir, intercept
        self.work = writable_copy(plan, intercept)  # pruned in place per candidate, restored after
        # consumer weight FQN -> its bias and that bias's dense value, restored after each candidate
        self._biases = {c.weight: bias(self.work, c) for g in plan.groups for c in g.consumers if c.full and intercept}
        self._dense_biases = {fqn: getattr(*owner(self.work, fqn)).clone() for fqn in self._biases.values()}
        self.dense_outputs = list(dense_outputs) if dense_outputs is not None else task.reference_outputs(self.work, self.batches)
        self._tails: _Tails | None | bool = False  # built on the first one-group score; None: too large to keep
        self._supports: dict[str, dict[int, torch.Tensor]] = {}
        self._solutions: dict[tuple[str, int], GroupSolution] = {}
        self.scores_file = scores_file
        self._scores: dict[str, float] = cache.load_scores(scores_file) if scores_file is not None else {}

    def _support(self, group: str, width: int) -> torch.Tensor:
        if group not in self._supports:
            widths = [int(w) for w in self.curves[group][0]]
            levels, _, masks = group_curve(self.plan.group(group), self.grams, self.plan.program.state_dict.__getitem__,
                                           widths, damp=self.damp, cache_dir=self.cache_dir, intercept=self.intercept)
            self._supports[group] = {int(k): torch.from_numpy(masks[i]) for i, k in enumerate(levels)}
        return self._supports[group][width]

    @contextmanager
    def model(self, widths: Mapping[str, int]) -> Iterator[nn.Module]:
        """The dense model with every group pruned to its width (zeroed, not materialized); its
        consumer weights and biases are restored on exit, so one working copy serves every candidate."""
        gm, state = self.work, self.plan.program.state_dict
        touched = {c.weight for name, width in widths.items() if width < self.plan.group(name).count
                   for c in self.plan.group(name).consumers}
        try:
            self._prune(widths)
            yield gm
        finally:
            with torch.no_grad():
                for fqn in touched:
                    gm.get_parameter(fqn).copy_(state[fqn])
                    if fqn in self._biases:
                        getattr(*owner(gm, self._biases[fqn])).copy_(self._dense_biases[self._biases[fqn]])

    def _prune(self, widths: Mapping[str, int]) -> None:
        """Re-fit every narrowed group on its curve's support and zero it in the working copy."""
        state = self.plan.program.state_dict
        groups, masks, weights, shifts = [], {}, {}, {}
        for name, width in widths.items():
            group = self.plan.group(name)
            if width >= group.count:
                continue
            key = (name, width)
            if key not in self._solutions:
                self._solutions[key] = refit_group(group, self.grams, state.__getitem__, self._support(name, width), self.damp,
                                                   self.intercept)
            solution = self._solutions[key]
            groups.append(group)
            masks[name] = solution.mask
            weights.update(solution.weights)
            shifts.update(solution.shifts)
        zero_structures(self.work, groups, masks, weights, shifts)

    def __call__(self, widths: Mapping[str, int]) -> float:
        narrowed = sorted((g, int(w)) for g, w in widths.items() if w < self.plan.group(g).count)
        name = ",".join(f"{g}={w}" for g, w in narrowed)
        if name not in self._scores:
            if len(narrowed) == 1 and self._tails is False:
                self._tails = _Tails.record(self.work, self.plan, self.batches)
            with self.model(dict(narrowed)) as model:
                if len(narrowed) == 1 and self._tails is not None:
                    model = self._tails.model(narrowed[0][0])  # a one-group probe runs from the group on
                self._scores[name] = self.task.end_to_end_loss(model, self.batches, self.dense_outputs)
            if self.scores_file is not None:
                cache.save_scores(self.scores_file, self._scores)
        return self._scores[name]


class _Tails:
    """The dense forward paused before each group's first consumer, per scored batch.

    A sensitivity probe prunes one group; everything the model computes before that group's
    consumers is the dense model's, so a probe resumes the dense run there (``GraphRunner``,
    which reads weights when they are used, so the probe's re-fit weights are seen) instead of
    running the whole model: on a stack of layers, half of it on average. The paused states
    hold the values still needed after their point, once per batch; when they would take more
    than ``MAX_BYTES``, probes run the whole model instead.
    """

    MAX_BYTES = 2 << 30

    def __init__(self, runner: GraphRunner, states: dict[str, list[RunState]], batches: Sequence[Batch]):
        self.runner, self.states, self.batches = runner, states, batches

    @classmethod
    def record(cls, gm: nn.Module, plan: StructurePlan, batches: Sequence[Batch]) -> _Tails | None:
        runner = GraphRunner(gm)
        weights = {g.name: {c.weight for c in g.consumers} for g in plan.groups}
        first_use = {}  # group -> position of the first node reading one of its consumer weights
        for node in runner.nodes:
            if node.op == "get_attr":
                for g, fqns in weights.items():
                    if node.target in fqns:
                        at = min(runner.pos[u.name] for u in node.users)
                        first_use[g] = min(first_use.get(g, at), at)
        if set(first_use) != set(weights):
            return None  # a consumer weight the graph does not read by name: run whole models
        cuts = sorted(set(first_use.values()))
        states: dict[int, list[RunState]] = {c: [] for c in cuts}
        held = 0
        for batch in batches:
            state = runner.start(batch)
            for cut in cuts:
                runner.advance(state, cut)
                saved = runner.save(state)
                held += sum(v.nbytes for v in saved.env.values() if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter))
                if held > cls.MAX_BYTES:
                    return None
                states[cut].append(saved)
        return cls(runner, {g: states[c] for g, c in first_use.items()}, batches)

    def model(self, group: str) -> Callable[..., object]:
        """A stand-in for the model on the scored batches, resuming each at ``group``."""
        paused = {id(b[0]): s for b, s in zip(self.batches, self.states[group])}

        def run(*inputs: torch.Tensor) -> object:
            state = self.runner.save(paused[id(inputs[0])])
            self.runner.advance(state, len(self.runner.nodes))
            return self.runner.output(state)

        return run


def search_allocation(curves: Curves, table: LatencyTable, budget_ms: float, kinds: Mapping[str, str],
                      score: Callable[[Mapping[str, int]], float], log: Log = print) -> tuple[Allocation, list[Candidate]]:
    """The candidate with the lowest end-to-end loss ``score(widths)`` (a ``Scorer``; groups left
    out of ``widths`` are dense), and every candidate tried; ``kinds`` maps each group of
    ``curves`` to its kind."""
    log(f"  measuring the end-to-end sensitivity of {len(curves)} groups")
    sensitivity = sensitivities(curves, table, probe_widths(curves, table, budget_ms), score)
    tried = []
    for name, allocation in candidates(curves, table, budget_ms, kinds, sensitivity):
        loss = score(allocation.widths)
        log(f"  candidate {name}: predicted {allocation.predicted_ms:.2f} ms, held-out loss {loss:.4f}")
        tried.append(Candidate(name, allocation, loss))
    best = min(tried, key=lambda c: c.score)
    return best.allocation, tried
