"""``osscar-export MODEL ... --dry-run``: what the job would do, and roughly for how long.

It loads and captures the model once and finds its structures; nothing is calibrated, solved,
exported or timed. What each stage would cost comes from what is cached (Gram matrices, error
curves, the latency table: cached, stale and why, or missing) and from one forward pass of the
model, scaled by the work each stage does (``COST``). The constants were fitted to the cold
SmolLM2-135M run on the 2-core development machine (docs/results.md, "Job speed"): the estimate
is a guide to the order of magnitude, not a promise.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from osscar_export import cache
from osscar_export.job import JobConfig, calibration_data
from osscar_export.latency.table import graph_signature, lookup_dirs, table_status
from osscar_export.latency.timing import measure_settings
from osscar_export.models import load_model
from osscar_export.passes.structures import find_structures
from osscar_export.plan import StructurePlan
from osscar_export.targets import get_target
from osscar_export.widths import width_grid

# Seconds of each stage in units of what drives it: forward passes of the dense model in torch
# (``fwd``), millions of parameters (``mparams``, exports) or fixed seconds. Fitted to the cold
# SmolLM2-135M job on the 2-core machine (docs/results.md, "Job speed").
COST = {
    "calibrate_fwd": 1.8,  # per calibration sample: a forward with Gram accumulation
    "curve_s": 0.008,  # per group and width level: the solver at SmolLM2's layer sizes
    "solve_s": 0.35,  # per group: the final prune's solve and re-fit
    "region_s": 1.2,  # per distinct region and width: materialize, export, session, timing
    "fit_export_s_per_mparam": 0.06,  # the dense ONNX the fit points are sliced from
    "export_s_per_mparam": 0.2,  # model.onnx (optimized) and model.pt2, each checked
    "timing_s": 4.0,  # one end-to-end measurement: session, warm-up, ~2 s of timed runs, checks
    "probe_fwd": 0.75,  # per held-out sample of a one-group probe (it resumes at the group)
    "candidate_fwd": 1.3,  # per held-out sample of a candidate allocation
}
CANDIDATES = 7  # allocations the search scores per budget (search.candidates), about
FIT_POINTS = 5  # end-to-end allocations of a fresh table (latency.build.fit_plan)
@dataclass(frozen=True)
class StagePlan:
    """One stage of the job: what it will do and the estimated seconds (0 when cached)."""

    stage: str
    status: str
    seconds: float


def _region_widths(plan: StructurePlan, levels: int) -> int:
    """Region timings a fresh table takes: groups with equal kinds, counts and consumer shapes
    are identical layers of a stack, timed once (``latency.regions``), at up to ``levels`` widths."""
    shapes = plan.program.state_dict
    kinds = {(g.kind, g.count, tuple(tuple(shapes[c.weight].shape) for c in g.consumers if c.weight in shapes))
             for g in plan.groups}
    return sum(min(levels, count) for _, count, _ in kinds)


def dry_run(cfg: JobConfig) -> tuple[StructurePlan, list[StagePlan]]:
    """The plan of the job ``cfg`` describes, stage by stage, without running it."""
    target = get_target(cfg.target, threads=cfg.threads)
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, seq_len=cfg.seq_len, batch=cfg.batch, image_size=cfg.image_size)
    load_s = time.perf_counter() - t0
    plan = find_structures(loaded.model, loaded.example_inputs)
    data = calibration_data(cfg, loaded)
    task, source, calibration, held_out, work = data.task, data.source, data.calibration, data.held_out, data.work
    with torch.no_grad():  # one forward, after one to warm up: the unit of most stages' cost
        loaded.model(*loaded.example_inputs)
        t0 = time.perf_counter()
        loaded.model(*loaded.example_inputs)
        fwd = time.perf_counter() - t0
    mparams = sum(t.numel() for t in plan.program.state_dict.values()) / 1e6
    batch = loaded.example_inputs[0].shape[0]

    grams_cached = cache.gram_path(plan, calibration, work).exists()
    curves = work / "curves"
    cached_curves = {g.name for g in plan.groups if curves.is_dir() and any(curves.glob(f"{cache.file_stem(g.name)}-*.npz"))}
    settings = measure_settings(cfg.clock, target)
    found, table = table_status(lookup_dirs(cfg.tables), target.for_inputs(loaded.example_inputs),
                                graph_signature(plan.program), asdict(settings))
    budgets = len(cfg.latency_ms) + len(cfg.speedup) or 1  # --keep-fraction: one model, nothing timed
    modes = 2 if cfg.mode == "best" else 1
    samples, held = len(calibration) * batch, (len(held_out) or len(calibration)) * batch
    groups = len(plan.groups)
    grids = {g.name: width_grid(g, cfg.levels) for g in plan.groups}
    scored = cache.scores_path(plan, calibration, held_out or calibration, task.name, grids, work, cfg.intercept).exists()
    stages = [
        StagePlan("load", f"{loaded.task} model (measured)", load_s),
        StagePlan("calibrate", f"Gram matrices {'cached' if grams_cached else 'to compute'} from {samples} "
                  f"samples of {source}", 0.0 if grams_cached else COST["calibrate_fwd"] * samples * fwd),
        StagePlan("error curves", f"{len(cached_curves)} of {groups} groups cached, {cfg.levels} widths each",
                  COST["curve_s"] * cfg.levels * (groups - len(cached_curves))),
        StagePlan("latency table", table, 0.0 if found else
                  COST["region_s"] * _region_widths(plan, cfg.levels) + COST["fit_export_s_per_mparam"] * mparams
                  + 2 * FIT_POINTS * COST["timing_s"]),
        StagePlan("allocate", f"{budgets} budget(s), " + (f"{groups} sensitivity probes and about {CANDIDATES} "
                  f"candidates each, on {held} held-out samples ({'scores cached' if scored else 'none scored yet'})"
                  if cfg.search else "knapsack only"),
                  budgets * held * fwd * (groups * COST["probe_fwd"] + CANDIDATES * COST["candidate_fwd"])
                  if cfg.search and not scored else 0.0),
        StagePlan("prune", f"{budgets} model(s), mode {cfg.mode}",
                  budgets * (COST["calibrate_fwd"] * samples * fwd + modes * COST["solve_s"] * groups)),
        StagePlan("export", "model.onnx and model.pt2 per model, each checked", budgets * COST["export_s_per_mparam"] * mparams),
        StagePlan("measure", "each model timed (twice when over its budget)", budgets * COST["timing_s"]),
        StagePlan("quality", f"{cfg.n_eval} held-out samples per model", budgets * 2 * cfg.n_eval * fwd),
    ]
    if cfg.keep_fraction:
        stages = [s for s in stages if s.stage not in ("error curves", "latency table", "allocate", "measure")]
    return plan, stages
