"""The prune pipeline: calibrate, solve every group's layer problem, materialize (DESIGN.md §2, §4, §5).

``prune`` is the one-call API; ``error_curves`` gives the allocator each group's loss at every
width from dense Gram matrices. Both build a group's solver problem the same way
(``layer_problem``): each full consumer's Gram is damped on its own (λ_c = damp·mean diag),
dead inputs' weight rows are zeroed (the reference's treatment), and a group with several
consumers is stacked into one problem whose structure ``i`` owns the rows of structure ``i`` in
every consumer (``d = Σ d_c``, H permuted block diagonal, W block diagonal). The layer problems
are independent given the support, so the stacked objective is exactly the sum and its solution
splits back per consumer.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from osscar_export import solver
from osscar_export.atomic import atomic_path
from osscar_export.digest import digest
from osscar_export.errors import CalibrationDataError, PlanError
from osscar_export.passes.calibrate import (
    Grams,
    SequentialCalibrator,
    blocked_groups,
    check_batches,
    dense_grams,
)
from osscar_export.passes.materialize import materialize
from osscar_export.plan import Consumer, StructureGroup, StructurePlan

METHODS = ("osscar", "osscar-fast", "greedy", "mp", "mp+", "exact")
MODES = ("dense", "sequential")
ALIGN = 8  # channel / neuron error-curve widths are multiples of this (see curve_widths)


@dataclass(frozen=True)
class _Part:
    """Where one consumer sits inside a stacked group problem."""

    consumer: Consumer
    base: int  # first row of its block in the block-diagonal layout
    rows: int  # p_c
    col: int  # first output column of its block
    cols: int  # m_c


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
    if rows.shape[1] != consumer.group_size:
        raise PlanError(f"consumer {consumer.weight} of the plan says group_size {consumer.group_size}, its slice owns {rows.shape[1]} rows per structure")
    if rows.numel() != p or not torch.equal(rows.reshape(-1).sort().values, torch.arange(p)):
        raise PlanError(f"consumer {consumer.weight} is marked full but the group does not own each of its {p} input rows exactly once")
    return rows


def layer_problem(group: StructureGroup, grams: Grams, weight: Callable[[str], torch.Tensor], damp: float) -> LayerProblem:
    """Stack the group's full consumers into one solver problem (see the module docstring)."""
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
        h = grams.xtx[c.weight].to(device=w.device, dtype=torch.float64)
        diag = torch.diagonal(h)
        w[diag == 0] = 0  # dead inputs: never fire, so their rows carry nothing (as the reference)
        mean = float(diag.mean())
        lam = damp * mean if mean > 0 else 1.0
        hs.append(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
        ws.append(w)
        orders.append(structure_rows(c, param, group.count).to(w.device) + base)
        parts.append(_Part(c, base, w.shape[0], col, w.shape[1]))
        base, col = base + w.shape[0], col + w.shape[1]
    H = torch.block_diag(*hs) if len(hs) > 1 else hs[0]
    W = torch.block_diag(*ws) if len(ws) > 1 else ws[0]
    perm = torch.cat(orders, dim=1).reshape(-1)
    if torch.equal(perm, torch.arange(len(perm), device=perm.device)):
        perm = None
    else:
        H, W = H[perm][:, perm], W[perm]
    return LayerProblem(group.name, H, W, sum(o.shape[1] for o in orders), parts, perm)


@dataclass
class PruneResult:
    """Everything ``prune`` decided, and the materialized model."""

    model: GraphModule  # physically smaller
    keep: dict[str, torch.Tensor]  # group name -> bool (count,)
    layer_losses: dict[str, float]  # consumer weight FQN -> ½‖X(W−Ŵ)‖² + ridge, on its own inputs
    weights: dict[str, torch.Tensor]  # consumer weight FQN -> re-fitted, dense layout, pruned rows zero
    plan: StructurePlan
    blocked: list[tuple[str, str]] = field(default_factory=list)  # groups left whole, and why
    seconds: float = 0.0


def resolve_keep_counts(
    plan: StructurePlan,
    keep_fraction: float | Mapping[str, float] | None,
    keep_counts: Mapping[str, int] | None,
) -> dict[str, int]:
    """Kept structures per group: ``max(1, round(f·n))`` from fractions, or the counts given.

    A fraction mapping may name groups or group kinds (a name wins over its kind); groups it does
    not cover are kept whole. Unknown keys are an error, not a silent no-op.
    """
    if keep_counts is not None and keep_fraction is not None:
        raise PlanError("pass keep_fraction or keep_counts, not both")
    names = {g.name: g for g in plan.groups}
    if keep_counts is not None:
        unknown = sorted(set(keep_counts) - set(names))
        if unknown:
            raise PlanError(f"keep_counts names unknown groups {unknown[:5]}; see plan.groups[i].name")
        counts = {g.name: g.count for g in plan.groups}
        for name, k in keep_counts.items():
            if not 1 <= int(k) <= names[name].count:
                raise PlanError(f"keep_counts[{name!r}] = {k}, must be in 1..{names[name].count}")
            counts[name] = int(k)
        return counts
    fraction = 0.5 if keep_fraction is None else keep_fraction
    if isinstance(fraction, Mapping):
        kinds = {g.kind for g in plan.groups}
        unknown = sorted(set(fraction) - set(names) - kinds)
        if unknown:
            raise PlanError(f"keep_fraction names {unknown[:5]}, which are neither group names nor kinds present ({sorted(kinds)})")
        per_group = {g.name: fraction.get(g.name, fraction.get(g.kind, 1.0)) for g in plan.groups}
    else:
        per_group = {g.name: fraction for g in plan.groups}
    counts = {}
    for g in plan.groups:
        f = float(per_group[g.name])
        if not 0.0 < f <= 1.0:
            raise PlanError(f"keep fraction {f} for group {g.name!r} must be in (0, 1]")
        counts[g.name] = max(1, round(f * g.count))
    return counts


def write_group(gm: nn.Module, group: StructureGroup, keep: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> None:
    """Apply one group's decision to a working model in place (what ``apply_masks`` does to a copy)."""
    gone = (~keep).nonzero().reshape(-1)
    with torch.no_grad():
        for c in group.consumers:
            param = gm.get_parameter(c.weight)
            if c.weight in weights:
                param.copy_(weights[c.weight])
            param.index_fill_(c.input.dim, c.input.indices(gone).to(param.device), 0)


@dataclass(frozen=True)
class GroupSolution:
    """One group solved at one width: its support, re-fitted consumer weights and their losses."""

    keep: torch.Tensor  # bool (count,)
    weights: dict[str, torch.Tensor]  # consumer weight FQN -> re-fitted, parameter layout, on CPU
    losses: dict[str, float]  # consumer weight FQN -> objective increase


def solve_group(group: StructureGroup, grams: Grams, weight: Callable[[str], torch.Tensor], keep: int | torch.Tensor,
                method: str, damp: float) -> GroupSolution:
    """Build the group's layer problem from ``grams`` and the current weights and solve it: choose
    ``keep`` structures with ``method``, or, given a support (bool per structure), re-fit on it."""
    problem = layer_problem(group, grams, weight, damp)
    if isinstance(keep, torch.Tensor):
        result = solver.refit(problem.H, problem.W, group_size=problem.d, keep=keep, damp=0.0)
    else:
        result = solver.prune_layer(problem.H, problem.W, group_size=problem.d, keep=keep, method=method, damp=0.0)
    w = torch.as_tensor(result.weight, dtype=torch.float64, device=problem.W.device)
    weights = {}
    for fqn, wc in problem.split(w).items():
        c = next(c for c in group.consumers if c.weight == fqn)
        weights[fqn] = c.from_input_major(wc, like=weight(fqn)).detach().cpu()
    return GroupSolution(torch.as_tensor(result.keep, dtype=torch.bool).cpu(), weights, problem.losses(w))


def prune(
    model: nn.Module | None,
    calibration: Iterable,
    keep_fraction: float | Mapping[str, float] | None = None,
    method: str = "osscar",
    mode: str = "sequential",
    plan: StructurePlan | None = None,
    example_inputs: tuple | None = None,
    keep_counts: Mapping[str, int] | None = None,
    damp: float = 0.01,
    progress: bool = True,
    grams: Grams | None = None,
) -> PruneResult:
    """Prune ``model`` one-shot: every group keeps its count, consumers re-fit on calibration data.

    ``calibration`` is an iterable of batches, each a tensor or a tuple shaped like the model's
    inputs. ``keep_fraction`` (default 0.5 for every group) or ``keep_counts`` says how many
    structures survive. ``mode="sequential"`` (default) solves groups in graph order on inputs
    propagated through the already-pruned model; ``"dense"`` solves every group on the unpruned
    model's inputs. ``model`` may be None when ``plan`` is given (its captured program is used).
    ``grams``: the dense Grams of ``calibration`` when already computed (the ``Calibrate`` pass's),
    so dense mode does not run the calibration forward again; sequential mode ignores them.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if isinstance(calibration, torch.Tensor):
        raise CalibrationDataError("calibration must be an iterable of batches (e.g. [x] or a DataLoader), not one tensor")
    batches = list(calibration)
    if not batches:
        raise CalibrationDataError("calibration data is empty: pass at least one batch of real inputs")
    if plan is None:
        from osscar_export.passes.structures import find_structures

        if model is None:
            raise PlanError("pass a model or a plan")
        first = batches[0]
        plan = find_structures(model, example_inputs or ((first,) if isinstance(first, torch.Tensor) else tuple(first)))
    batches = check_batches(plan, batches)
    counts = resolve_keep_counts(plan, keep_fraction, keep_counts)

    gm = copy.deepcopy(plan.program.module())
    blocked = blocked_groups(plan, gm)
    asked = keep_counts or (keep_fraction if isinstance(keep_fraction, Mapping) else {})
    for name, reason in blocked:
        if name in asked and counts[name] < plan.group(name).count:
            raise PlanError(f"group {name!r} cannot be pruned: {reason}")
    skip = {name for name, _ in blocked}
    todo = [g for g in plan.groups if g.name not in skip and counts[g.name] < g.count]

    keep = {g.name: torch.ones(g.count, dtype=torch.bool) for g in plan.groups}
    weights: dict[str, torch.Tensor] = {}
    losses: dict[str, float] = {}

    def solve(group: StructureGroup, grams: Grams) -> None:
        solution = solve_group(group, grams, gm.get_parameter, counts[group.name], method, damp)
        keep[group.name] = solution.keep
        losses.update(solution.losses)
        weights.update(solution.weights)
        if mode == "sequential":
            write_group(gm, group, solution.keep, weights)

    if mode == "dense":
        grams = grams if grams is not None else dense_grams(plan, gm, batches, todo, progress)
        for group in tqdm(todo, desc=f"solve ({method})", disable=not progress, leave=False):
            solve(group, grams)
    else:
        calibrator = SequentialCalibrator(plan, gm, batches)
        for group in tqdm(calibrator.order(todo), desc=f"prune ({method}, sequential)", disable=not progress, leave=False):
            solve(group, calibrator.stage(group))

    small = materialize(model if model is not None else plan.program.module(), plan, keep, weights)
    return PruneResult(small, keep, losses, weights, plan, blocked, time.perf_counter() - t0)


def curve_widths(group: StructureGroup, levels: Sequence[float] | Mapping[str, Sequence[int]]) -> list[int]:
    """Kept widths for a group: fractions of its count, or explicit widths per group name.

    Fractions of channel and neuron groups of at least 2·``ALIGN`` round to multiples of
    ``ALIGN``: runtimes vectorise over 8 lanes, and on onnxruntime CPU an unaligned width of an
    EfficientNet-Lite0 group ran 2-3x slower than its aligned neighbours (and breaks the
    blocked memory layout of the whole network), so the allocator would never want it.
    """
    if isinstance(levels, Mapping):
        if group.name not in levels:
            raise PlanError(f"levels has no widths for group {group.name!r}")
        widths = [int(k) for k in levels[group.name]]
    elif group.kind in ("channel", "neuron") and group.count >= 2 * ALIGN:
        widths = [min(group.count, max(ALIGN, ALIGN * round(float(f) * group.count / ALIGN))) for f in levels]
    else:
        widths = [max(1, round(float(f) * group.count)) for f in levels]
    bad = [k for k in widths if not 1 <= k <= group.count]
    if bad:
        raise PlanError(f"widths {bad} for group {group.name!r} are outside 1..{group.count}")
    return sorted(set(widths))


def _cache_key(problem: LayerProblem, widths: list[int], method: str, damp: float) -> str:
    return digest({"group": problem.group, "widths": widths, "method": method, "damp": damp, "d": problem.d}, problem.H, problem.W)


def group_curve(
    group: StructureGroup,
    grams: Grams,
    weight: Callable[[str], torch.Tensor],
    widths: list[int],
    method: str = "osscar-fast",
    damp: float = 0.01,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One group's error curve: kept widths, losses and the nested supports (bool, widths × count).

    With ``cache_dir`` it is written atomically to its own ``.npz``, named by a hash of the
    problem, widths and method: an interrupted run resumes where it stopped and a changed input
    never re-uses a stale curve.
    """
    problem = layer_problem(group, grams, weight, damp)
    path = None
    if cache_dir is not None:
        key = _cache_key(problem, widths, method, damp)
        path = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', group.name)}-{key[:16]}.npz"
        if path.exists():
            with np.load(path) as z:
                if "keep" in z:  # files from before supports were stored are recomputed
                    return z["widths"], z["losses"], z["keep"]
    curve = solver.error_curve(problem.H, problem.W, group_size=problem.d, levels=widths, method=method, damp=0.0)
    result = (np.asarray(curve.levels, dtype=np.int64), curve.losses.cpu().numpy(), curve.keep.cpu().numpy())
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, widths=result[0], losses=result[1], keep=result[2])
    return result


def error_curves(
    plan: StructurePlan,
    grams: Grams,
    levels: Sequence[float] | Mapping[str, Sequence[int]],
    method: str = "osscar-fast",
    damp: float = 0.01,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every solvable group's ``(widths, losses)`` from dense Grams: the allocator's input.

    Losses are the layer objective increase over the dense layer at each kept width (nested
    supports, one gradual run per group; ``group_curve``, cached in ``cache_dir``).
    """
    state = plan.program.state_dict
    skip = {name for name, _ in grams.blocked}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for group in tqdm([g for g in plan.groups if g.name not in skip], desc="error curves", disable=not progress, leave=False):
        widths, losses, _ = group_curve(group, grams, state.__getitem__, curve_widths(group, levels), method, damp, cache_dir)
        curves[group.name] = (widths, losses)
    return curves
