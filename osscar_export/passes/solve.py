"""Solve: each group's layer problem, and the pass that decides every group's mask and re-fit.

A group's solver problem (``layer_problem``, docs/design.md, "Solver"): each full consumer's Gram
is centred when the re-fit has an intercept (``intercept``, below) and damped on its own
(λ_c = damp·mean diag), dead inputs' weight rows are zeroed (the reference's treatment), and a group with several consumers is stacked into one problem whose structure ``i``
owns the rows of structure ``i`` in every consumer (``d = Σ d_c``, H permuted block diagonal, W
block diagonal). The layer problems are independent given the support, so the stacked objective
is exactly the sum and its solution splits back per consumer.

The intercept: a consumer ``y = xW + b`` re-fitted to ``W'`` keeps its best bias
``b' = b + μ(Ŵ − W')`` (μ the mean calibration input), which removes the mean of what the pruned
inputs contributed. Putting that ``b'`` back into the loss leaves ``½ tr((W'−Ŵ)ᵀ C (W'−Ŵ))`` with
the centred Gram ``C = XᵀX − N μᵀμ``: the same solver problem on ``C``, then the bias shift
(``GroupSolution.shifts``, added to the consumer's output by materialize). An input that is
constant on the calibration data is then dead: its whole contribution moves into the bias.

``Solve`` runs in one of two modes (docs/design.md, "Calibrate"): ``dense`` solves every group on
the unpruned model's Grams; ``sequential`` solves groups in graph order, each on inputs
propagated through a working copy of the captured module that ``zero_structures`` has already
pruned. Either way it only decides: the model in the state is left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from osscar_export import solver
from osscar_export.errors import PlanError
from osscar_export.fanout import Engine
from osscar_export.passes.base import Pass, PassResult, PruneState
from osscar_export.passes.base import Grams
from osscar_export.passes.calibrate import SequentialCalibrator, blocked_groups, check_batches, dense_grams
from osscar_export.passes.materialize import writable_copy, zero_structures
from osscar_export.plan import Consumer, StructureGroup

MODES = ("dense", "sequential")


@dataclass(frozen=True)
class _Part:
    """Where one consumer sits inside a stacked group problem."""

    consumer: Consumer
    base: int  # first row of its block in the block-diagonal layout
    rows: int  # p_c
    col: int  # first output column of its block
    cols: int  # m_c
    mean: torch.Tensor | None  # μ_c, the mean input row (float64 (p_c,)), when centred


@dataclass
class LayerProblem:
    """One group's solver input: damped ``H`` (p×p), ``W`` (p×m), structure size ``d``, float64."""

    group: str
    H: torch.Tensor
    W: torch.Tensor
    d: int
    parts: list[_Part]
    perm: torch.Tensor | None  # stacked row -> block-diagonal row; None when the identity

    def split(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A stacked solution back to each consumer's input-major ``W`` (rows in its own order)."""
        if self.perm is not None:
            block = torch.empty_like(w)
            block[self.perm] = w
            w = block
        return {p.consumer.weight: w[p.base : p.base + p.rows, p.col : p.col + p.cols] for p in self.parts}

    def losses(self, w: torch.Tensor) -> dict[str, float]:
        """Per-consumer objective increase ``f(W) − f(Ŵ) = ½ tr((W−Ŵ)ᵀ H (W−Ŵ))`` (sums to the group's)."""
        dense = self.split(self.W)
        out = {}
        for fqn, wc in self.split(w).items():
            p = next(p for p in self.parts if p.consumer.weight == fqn)
            h = self._block(p)
            diff = wc - dense[fqn]
            out[fqn] = 0.5 * float((diff * (h @ diff)).sum())
        return out

    def _block(self, part: _Part) -> torch.Tensor:
        if self.perm is None:
            return self.H
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(len(self.perm), device=self.perm.device)
        idx = inv[part.base : part.base + part.rows]
        return self.H[idx][:, idx]


def structure_rows(consumer: Consumer, weight: torch.Tensor, count: int) -> torch.Tensor:
    """``(count, d)`` rows of the consumer's input-major ``W`` owned by each structure, in order."""
    s = consumer.input
    channels = s.indices(torch.arange(count)).reshape(len(s.offsets), count, s.unit).transpose(0, 1).reshape(count, -1)
    area = int(np.prod(weight.shape[2:])) if consumer.op != "matmul" else 1
    rows = (channels[..., None] * area + torch.arange(area)).reshape(count, -1)
    p = consumer.input_major(weight).shape[0]
    if rows.shape[1] != consumer.group_size * len(s.offsets):  # group_size rows at each offset
        raise PlanError(f"consumer {consumer.weight} of the plan says group_size {consumer.group_size} at each of {len(s.offsets)} offset(s), its slice owns {rows.shape[1]} rows per structure")
    if rows.numel() != p or not torch.equal(rows.reshape(-1).sort().values, torch.arange(p)):
        raise PlanError(f"consumer {consumer.weight} is marked full but the group does not own each of its {p} input rows exactly once")
    return rows


def centred(grams: Grams, fqn: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(C, μ)`` of one consumer: its Gram centred on the mean input row μ (float64). Inputs whose
    centred variance is rounding noise (below 1e-5 of their raw second moment: XᵀX is summed in
    float32 blocks, so a constant input's variance comes out as ±1e-7 of it) get exact zero rows,
    so the solver treats them as dead."""
    h = grams.xtx[fqn].to(torch.float64)
    n = grams.rows.get(fqn, 0)
    if n == 0:
        return h, None
    mean = grams.xsum[fqn].to(device=h.device, dtype=torch.float64) / n
    c = h - n * torch.outer(mean, mean)
    flat = torch.diagonal(c) <= 1e-5 * torch.diagonal(h)
    if bool(flat.any()):
        idx = flat.nonzero().reshape(-1)
        c.index_fill_(0, idx, 0).index_fill_(1, idx, 0)
    return c, mean


def layer_problem(group: StructureGroup, grams: Grams, weight: Callable[[str], torch.Tensor], damp: float,
                  intercept: bool = False) -> LayerProblem:
    """Stack the group's full consumers into one solver problem (see the module docstring); with
    ``intercept`` each consumer's Gram is centred (``centred``) and its bias re-fitted too."""
    consumers = list({c.weight: c for c in group.consumers if c.full}.values())
    if not consumers:
        raise PlanError(f"group {group.name} has no full consumer to re-fit")
    hs, ws, orders, parts = [], [], [], []
    base = col = 0
    for c in consumers:
        if c.weight not in grams.xtx:
            raise PlanError(f"no Gram matrix for consumer {c.weight} of group {group.name}: calibrate did not see it")
        param = weight(c.weight)
        w = c.input_major(param.detach()).to(torch.float64).clone()
        h, mu = centred(grams, c.weight) if intercept else (grams.xtx[c.weight].to(torch.float64), None)
        h = h.to(w.device)
        diag = torch.diagonal(h)
        w[diag == 0] = 0  # dead inputs: never fire, so their rows carry nothing (as the reference)
        mean = float(diag.mean())
        lam = damp * mean if mean > 0 else 1.0
        hs.append(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
        ws.append(w)
        orders.append(structure_rows(c, param, group.count).to(w.device) + base)
        parts.append(_Part(c, base, w.shape[0], col, w.shape[1], mu))
        base, col = base + w.shape[0], col + w.shape[1]
    H = torch.block_diag(*hs) if len(hs) > 1 else hs[0]
    W = torch.block_diag(*ws) if len(ws) > 1 else ws[0]
    perm = torch.cat(orders, dim=1).reshape(-1)
    if torch.equal(perm, torch.arange(len(perm), device=perm.device)):
        perm = None
    else:
        H, W = H[perm][:, perm], W[perm]
    return LayerProblem(group.name, H, W, sum(o.shape[1] for o in orders), parts, perm)


@dataclass(frozen=True)
class GroupSolution:
    """One group solved at one width: its mask, re-fitted consumer weights, their bias shifts
    (with an intercept) and their losses."""

    mask: torch.Tensor  # bool (count,)
    weights: dict[str, torch.Tensor]  # consumer weight FQN -> re-fitted, parameter layout, on CPU
    shifts: dict[str, torch.Tensor]  # consumer weight FQN -> μ(Ŵ − W'), float32 (outputs,), on CPU
    losses: dict[str, float]  # consumer weight FQN -> objective increase


def solve_group(group: StructureGroup, grams: Grams, weight: Callable[[str], torch.Tensor], width: int,
                method: str, damp: float, intercept: bool = False) -> GroupSolution:
    """Keep ``width`` structures of ``group``, chosen by ``method`` on its layer problem (built from
    ``grams`` and the current ``weight``s), and re-fit its consumers."""
    problem = layer_problem(group, grams, weight, damp, intercept)
    return _solution(group, problem, _prune_task((problem.H, problem.W, problem.d, width, method)), weight)


def _prune_task(task: tuple[torch.Tensor, torch.Tensor, int, int, str]) -> solver.LayerSolution:
    """One layer problem solved at one width (module level, so a Ray worker can run it)."""
    H, W, d, width, method = task
    return solver.prune_layer(H, W, group_size=d, width=width, method=method, damp=0.0)


def refit_group(group: StructureGroup, grams: Grams, weight: Callable[[str], torch.Tensor], mask: torch.Tensor,
                damp: float, intercept: bool = False) -> GroupSolution:
    """Re-fit ``group``'s consumers on a support chosen elsewhere (``mask``, e.g. an error curve's)."""
    problem = layer_problem(group, grams, weight, damp, intercept)
    result = solver.refit(problem.H, problem.W, group_size=problem.d, mask=mask, damp=0.0)
    return _solution(group, problem, result, weight)


def _solution(group: StructureGroup, problem: LayerProblem, result: solver.LayerSolution,
              weight: Callable[[str], torch.Tensor]) -> GroupSolution:
    w = torch.as_tensor(result.weight, dtype=torch.float64, device=problem.W.device)
    weights, shifts = {}, {}
    for part, (fqn, wc) in zip(problem.parts, problem.split(w).items()):
        c, old = part.consumer, weight(fqn).detach()
        weights[fqn] = c.from_input_major(wc, like=old).cpu()
        if part.mean is not None:  # against the weight itself: rows zeroed as dead still count here
            shift = (c.input_major(old).to(wc) - wc).T @ part.mean.to(wc)
            shifts[fqn] = shift.to(torch.float32).cpu()
    return GroupSolution(torch.as_tensor(result.mask, dtype=torch.bool).cpu(), weights, shifts, problem.losses(w))


class Solve(Pass):
    """plan + calibration batches (+ dense Grams) -> every group's mask and re-fitted consumer weights.

    Groups keep ``widths[name]`` structures (groups not named are kept whole; naming a group that
    calibrate cannot serve with a smaller width is an error). In dense mode the state's Grams are
    used when present, else computed for the groups to prune. ``changed`` is False: it decides,
    the model is not altered. It also fills the per-consumer layer losses (consumer weight FQN ->
    ½‖X(W−Ŵ)‖² + ridge) the report shows, and with ``intercept`` the consumers' bias shifts.
    """

    name = "solve"
    requires = ("plan", "batches")
    ensures = ("masks", "weights", "shifts", "losses")

    def __init__(self, method: str = "osscar", mode: str = "sequential", widths: Mapping[str, int] | None = None,
                 damp: float = 0.01, progress: bool = True, intercept: bool = False, engine: Engine = Engine()):
        if method not in solver.METHODS:
            raise ValueError(f"method {method!r} is not one of {solver.METHODS}")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.method, self.mode, self.damp, self.progress, self.intercept = method, mode, damp, progress, intercept
        self.engine = engine
        self.widths = dict(widths or {})

    def check_input(self, state: PruneState) -> None:
        counts = {g.name: g.count for g in state.plan.groups}
        for name, width in self.widths.items():
            if name not in counts:
                raise PlanError(f"widths name group {name!r}, which the plan does not have")
            if not 1 <= width <= counts[name]:
                raise PlanError(f"width {width} for group {name!r} is outside 1..{counts[name]}")

    def run(self, state: PruneState) -> PassResult:
        plan, method = state.plan, self.method
        # sequential mode prunes its consumer weights in place; dense mode only reads them
        gm = writable_copy(plan, self.intercept) if self.mode == "sequential" else plan.program.module()
        blocked = dict(blocked_groups(plan, gm))
        todo = [g for g in plan.groups if self.widths.get(g.name, g.count) < g.count]
        for g in todo:
            if g.name in blocked:
                raise PlanError(f"group {g.name!r} cannot be pruned: {blocked[g.name]}")
        masks = {g.name: torch.ones(g.count, dtype=torch.bool) for g in plan.groups}
        weights: dict[str, torch.Tensor] = {}
        shifts: dict[str, torch.Tensor] = {}
        losses: dict[str, float] = {}

        def keep(group: StructureGroup, solution: GroupSolution) -> GroupSolution:
            masks[group.name] = solution.mask
            weights.update(solution.weights)
            shifts.update(solution.shifts)
            losses.update(solution.losses)
            return solution

        def solve(group: StructureGroup, grams: Grams) -> GroupSolution:
            return keep(group, solve_group(group, grams, gm.get_parameter, self.widths[group.name], method, self.damp,
                                           self.intercept))

        if self.mode == "dense":  # independent layer problems: ``engine`` may fan them out
            grams = state.grams
            if grams is None and todo:
                grams = dense_grams(plan, gm, check_batches(plan, state.batches), todo, self.progress)
            problems: list[LayerProblem | None] = []

            def tasks() -> Iterator[tuple]:
                for group in todo:
                    problems.append(layer_problem(group, grams, gm.get_parameter, self.damp, self.intercept))
                    yield problems[-1].H, problems[-1].W, problems[-1].d, self.widths[group.name], method

            results = self.engine.map(_prune_task, tasks())
            for i, (group, result) in enumerate(tqdm(zip(todo, results), total=len(todo), desc=f"solve ({method})",
                                                     disable=not self.progress, leave=False)):
                keep(group, _solution(group, problems[i], result, gm.get_parameter))
                problems[i] = None  # its Gram-sized matrices are no longer needed
        else:
            calibrator = SequentialCalibrator(plan, gm, check_batches(plan, state.batches))
            for group in tqdm(calibrator.order(todo), desc=f"prune ({method}, sequential)", disable=not self.progress, leave=False):
                solution = solve(group, calibrator.stage(group))
                zero_structures(gm, [group], {group.name: solution.mask}, solution.weights, solution.shifts)
        return PassResult(state.replace(masks=masks, weights=weights, shifts=shifts, losses=losses), changed=False)
