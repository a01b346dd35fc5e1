"""Prune: the one-call API, and every group's error curve for the allocator.

``prune`` runs the prune passes (docs/design.md, "Passes"): find the structure plan unless one is
given, then Calibrate (dense mode, when no Grams are given) → Solve → Materialize.
``error_curves`` gives the allocator each group's loss at every width of its grid
(``widths.width_grid``) from dense Grams, on the same layer problems as ``Solve``
(``passes.solve.layer_problem``; docs/design.md, "Solver").
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from osscar_export import cache, solver
from osscar_export.cache import CurveArrays
from osscar_export.errors import CalibrationDataError, PlanError
from osscar_export.fanout import Engine
from osscar_export.passes.base import PruneState, run_passes
from osscar_export.passes.base import Grams
from osscar_export.passes.calibrate import Calibrate, blocked_groups, check_batches
from osscar_export.passes.materialize import Materialize
from osscar_export.passes.solve import MODES, Solve, layer_problem
from osscar_export.passes.structures import find_structures
from osscar_export.plan import StructureGroup, StructurePlan
from osscar_export.solver import METHODS
from osscar_export.widths import width_grid


@dataclass
class PruneResult:
    """Everything ``prune`` decided, and the materialized model."""

    model: GraphModule  # physically smaller
    program: torch.export.ExportedProgram  # its capture, which the exporters take as it is
    masks: dict[str, torch.Tensor]  # group name -> bool (count,)
    layer_losses: dict[str, float]  # consumer weight FQN -> ½‖X(W−Ŵ)‖² + ridge, on its own inputs
    weights: dict[str, torch.Tensor]  # consumer weight FQN -> re-fitted, dense layout, pruned rows zero
    shifts: dict[str, torch.Tensor]  # consumer weight FQN -> added to its bias (the re-fit's intercept)
    plan: StructurePlan
    blocked: list[tuple[str, str]] = field(default_factory=list)  # groups left whole, and why
    seconds: float = 0.0


def resolve_widths(
    plan: StructurePlan,
    keep_fraction: float | Mapping[str, float] | None,
    widths: Mapping[str, int] | None,
) -> dict[str, int]:
    """Kept structures per group: ``max(1, round(f·n))`` from fractions, or the widths given.

    A fraction mapping may name groups or group kinds (a name wins over its kind); groups it does
    not cover are kept whole. Unknown keys are an error, not a silent no-op.
    """
    if widths is not None and keep_fraction is not None:
        raise PlanError("pass keep_fraction or widths, not both")
    names = {g.name: g for g in plan.groups}
    if widths is not None:
        unknown = sorted(set(widths) - set(names))
        if unknown:
            raise PlanError(f"widths names unknown groups {unknown[:5]}; see plan.groups[i].name")
        counts = {g.name: g.count for g in plan.groups}
        for name, k in widths.items():
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):  # 2.7 must not become 2
                raise PlanError(f"widths[{name!r}] = {k!r} is a {type(k).__name__}; give an integer count of structures to keep")
            if not 1 <= k <= names[name].count:
                raise PlanError(f"widths[{name!r}] = {k}, must be in 1..{names[name].count}")
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
        f = per_group[g.name]
        if isinstance(f, bool) or not isinstance(f, numbers.Real):  # '0.5' or True must not pass as numbers
            raise PlanError(f"keep fraction {f!r} for group {g.name!r} is a {type(f).__name__}; give a number in (0, 1]")
        f = float(f)
        if not 0.0 < f <= 1.0:
            raise PlanError(f"keep fraction {f} for group {g.name!r} must be in (0, 1]")
        counts[g.name] = max(1, round(f * g.count))
    return counts


def prune(
    model: nn.Module | None,
    calibration: Iterable,
    keep_fraction: float | Mapping[str, float] | None = None,
    method: str = "osscar",
    mode: str = "sequential",
    plan: StructurePlan | None = None,
    example_inputs: tuple | None = None,
    widths: Mapping[str, int] | None = None,
    damp: float = 0.01,
    progress: bool = True,
    grams: Grams | None = None,
    intercept: bool = False,
    engine: Engine = Engine(),
) -> PruneResult:
    """Prune ``model`` one-shot: every group keeps its width, consumers re-fit on calibration data.

    ``calibration`` is an iterable of batches, each a tensor or a tuple shaped like the model's
    inputs. ``keep_fraction`` (default 0.5 for every group) or ``widths`` says how many
    structures survive. ``mode="sequential"`` (default) solves groups in graph order on inputs
    propagated through the already-pruned model; ``"dense"`` solves every group on the unpruned
    model's inputs. ``model`` may be None when ``plan`` is given (its captured program is used).
    ``grams``: the dense Grams of ``calibration`` when already computed (``calibrate``'s), so
    dense mode does not run the calibration forward again; sequential mode ignores them.
    ``intercept``: every re-fitted consumer also re-fits its bias (one is added where it had
    none), which takes the mean of what the removed structures contributed (docs/design.md, "Solver").
    ``engine``: where dense mode's independent layer problems are solved (``fanout.Engine``).
    """
    t0 = time.perf_counter()
    if method not in METHODS:  # Solve checks both too; here they fail before the structure search
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if isinstance(calibration, torch.Tensor):
        raise CalibrationDataError("calibration must be an iterable of batches (e.g. [x] or a DataLoader), not one tensor")
    batches = list(calibration)
    if not batches:
        raise CalibrationDataError("calibration data is empty: pass at least one batch of real inputs")
    if plan is None:
        if model is None:
            raise PlanError("pass a model or a plan")
        first = batches[0]
        plan = find_structures(model, example_inputs or ((first,) if isinstance(first, torch.Tensor) else tuple(first)))
    batches = check_batches(plan, batches)
    counts = resolve_widths(plan, keep_fraction, widths)

    blocked = blocked_groups(plan, plan.program.module())
    asked = widths or (keep_fraction if isinstance(keep_fraction, Mapping) else {})
    for name, reason in blocked:
        if name in asked and counts[name] < plan.group(name).count:
            raise PlanError(f"group {name!r} cannot be pruned: {reason}")
    skip = {name for name, _ in blocked}
    counts = {name: k for name, k in counts.items() if name not in skip}
    narrowed = any(k < plan.group(name).count for name, k in counts.items())

    dense = mode == "dense"
    passes = [Calibrate(progress)] if dense and grams is None and narrowed else []
    state = PruneState(
        model=model if model is not None else plan.program.module(), example_inputs=tuple(plan.example_inputs),
        program=plan.program, plan=plan, batches=batches, grams=grams if dense else None,
    )
    out = run_passes([*passes, Solve(method, mode, counts, damp, progress, intercept, engine), Materialize()], state).state
    return PruneResult(out.model, out.program, out.masks, out.losses, out.weights, out.shifts, plan, blocked,
                       time.perf_counter() - t0)


def _solve_curve(task: tuple[torch.Tensor, torch.Tensor, int, list[int], str]) -> CurveArrays:
    """One layer problem's error curve (module level, so a Ray worker can run it)."""
    H, W, d, widths, method = task
    curve = solver.error_curve(H, W, group_size=d, levels=widths, method=method, damp=0.0)
    return np.asarray(curve.levels, dtype=np.int64), curve.losses.cpu().numpy(), curve.masks.cpu().numpy()


@dataclass(frozen=True)
class _CurveJob:
    """One group's curve to compute: its solver task and where its result is kept."""

    name: str
    task: tuple[torch.Tensor, torch.Tensor, int, list[int], str]
    path: Path | None


def _curve_job(group: StructureGroup, grams: Grams, weight: Callable[[str], torch.Tensor], widths: list[int], method: str,
               damp: float, cache_dir: str | Path | None, intercept: bool) -> tuple[_CurveJob, CurveArrays | None]:
    """The group's curve job, and its cached result when ``cache_dir`` holds one (keyed by the
    problem, widths and method: an interrupted run resumes, a changed input never re-uses it)."""
    problem = layer_problem(group, grams, weight, damp, intercept)
    job = _CurveJob(group.name, (problem.H, problem.W, problem.d, widths, method), None)
    if cache_dir is None:
        return job, None
    settings = {"group": problem.group, "widths": widths, "method": method, "damp": damp, "d": problem.d}
    path = cache.curve_path(cache_dir, group.name, settings, (problem.H, problem.W))
    shapes = {"widths": (len(widths),), "losses": (len(widths),), "masks": (len(widths), group.count)}
    return dataclasses.replace(job, path=path), cache.load_curve(path, shapes)


def group_curve(
    group: StructureGroup,
    grams: Grams,
    weight: Callable[[str], torch.Tensor],
    widths: list[int],
    method: str = "osscar-fast",
    damp: float = 0.01,
    cache_dir: str | Path | None = None,
    intercept: bool = False,
) -> CurveArrays:
    """One group's error curve: widths, losses and the nested masks (bool, widths × count),
    kept in ``cache_dir`` when one is given (``cache.curve_path``)."""
    job, cached = _curve_job(group, grams, weight, widths, method, damp, cache_dir, intercept)
    if cached is not None:
        return cached
    result = _solve_curve(job.task)
    if job.path is not None:
        cache.save_curve(job.path, result)
    return result


def error_curves(
    plan: StructurePlan,
    grams: Grams,
    levels: int | Sequence[float] | Mapping[str, Sequence[int]],
    method: str = "osscar-fast",
    damp: float = 0.01,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    intercept: bool = False,
    engine: Engine = Engine(),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every solvable group's ``(widths, losses)`` from dense Grams: the allocator's input.

    ``levels`` is what ``width_grid`` takes (a count of evenly spaced fractions, the fractions, or
    explicit widths per group). Losses are the layer objective increase over the dense layer at
    each width (nested supports, one gradual run per group; ``group_curve``, cached in
    ``cache_dir``). The curves not cached are independent solver runs: ``engine`` runs them here or
    as Ray tasks, with the same results; layer problems are built one at a time as tasks start.
    """
    state = plan.program.state_dict
    skip = {name for name, _ in grams.blocked}
    groups = [g for g in plan.groups if g.name not in skip]
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    solving: list[_CurveJob | None] = []
    bar = tqdm(total=len(groups), desc="error curves", disable=not progress, leave=False)

    def tasks() -> Iterator[tuple]:
        for group in groups:
            job, cached = _curve_job(group, grams, state.__getitem__, width_grid(group, levels), method, damp, cache_dir,
                                     intercept)
            if cached is not None:
                curves[group.name] = cached[:2]
                bar.update()
                continue
            solving.append(job)
            yield job.task

    for job_index, result in enumerate(engine.map(_solve_curve, tasks())):
        job = solving[job_index]
        if job.path is not None:
            cache.save_curve(job.path, result)
        curves[job.name] = result[:2]
        solving[job_index] = None  # its layer problem is no longer needed
        bar.update()
    bar.close()
    return {g.name: curves[g.name] for g in groups}
