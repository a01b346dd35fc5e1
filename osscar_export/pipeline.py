"""The main job: model + latency budget → a smaller model that meets it, with the evidence.

capture → structures → calibrate → error curves → latency table → allocate (knapsack candidates
scored end to end) → sequential OSSCAR → materialize → export → measure (rebuilt for a tighter
budget when over) → report (docs/design.md, "Pipeline"). Expensive intermediate results (Gram
matrices, error curves, latency tables) are cached on disk keyed by what they depend on
(``cache``), so an interrupted run resumes where it stopped; every artifact is written
atomically and the output folder appears only when the whole job has succeeded. The job's data
(``JobConfig``, ``Prepared``, ``Outcome``) lives in ``job``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from osscar_export import __version__, cache
from osscar_export.allocate import Allocation, allocate, min_latency_ms, tradeoff
from osscar_export.atomic import sweep_staging
from osscar_export.errors import InfeasibleBudgetError, OsscarError, PlanError
from osscar_export import hf_folder
from osscar_export.export import export_hf, export_onnx, save_program
from osscar_export.job import (BUDGET_TOLERANCE, FORMATS, Attempt, JobConfig, Outcome, Prepared, Stages, calibration_data, check_budget,
                               meets_budget, samples)
from osscar_export.latency.build import measure_latency
from osscar_export.latency.table import LatencyTable, lookup_dirs
from osscar_export.latency.timing import MeasureSettings, Timing, measure, measure_settings
from osscar_export.models import LoadedModel, load_model
from osscar_export.output_dir import check_output_dir, check_writable, publishing
from osscar_export.passes.base import Grams
from osscar_export.passes.structures import find_structures
from osscar_export.plan import StructurePlan
from osscar_export.prune import MODES, PruneResult, error_curves, prune, resolve_widths
from osscar_export.recover import recover
from osscar_export.report import write_report
from osscar_export.search import Candidate, Scorer, search_allocation
from osscar_export.targets import Runnable, Target, get_target

Log = Callable[[str], None]

# A model that misses its budget (``job.meets_budget``: more than BUDGET_TOLERANCE over, on two
# timings) is rebuilt for a tighter one, at most BUDGET_RETRIES times (a retry costs a prune and
# an export).
BUDGET_RETRIES = 2


def _budgets(cfg: JobConfig, table: LatencyTable) -> list[tuple[str, float]]:
    budgets = [(f"{ms:g}ms", float(ms)) for ms in cfg.latency_ms]
    budgets += [(f"{s:g}x", table.dense_ms / s) for s in cfg.speedup]
    if not budgets:
        raise OsscarError("give a budget: --latency-ms X [Y ...] or --speedup S [T ...]")
    return budgets


def prepare(cfg: JobConfig, log: Log = print) -> Prepared:
    """Load → structures → calibration → Grams → error curves → latency table (all cached)."""
    torch.manual_seed(cfg.seed)
    target: Target = get_target(cfg.target, threads=cfg.threads)
    stages = Stages()

    log(f"loading {cfg.model}")
    with stages("load"):
        loaded = load_model(cfg.model, seq_len=cfg.seq_len, batch=cfg.batch, image_size=cfg.image_size)
    log("capturing the graph and finding structures")
    with stages("capture"):
        plan = find_structures(loaded.model, loaded.example_inputs)
    log(f"{len(plan.groups)} groups, {plan.structures} structures, {len(plan.blocked)} dims blocked")
    if not plan.groups:
        raise OsscarError(f"{cfg.model}: no prunable structures found; run `osscar-export inspect {cfg.model}` to see why")
    if cfg.keep_fraction:
        _fixed_widths(cfg, plan)  # a kind the model does not have is refused before any work

    with stages("calibration data"):
        data = calibration_data(cfg, loaded)
    task, n_calib, calibration, held_out, work = data.task, data.n_calib, data.calibration, data.held_out, data.work
    if (cfg.search or cfg.mode == "best") and not held_out:
        log(f"warning: only {len(calibration)} calibration batches, too few to hold any out; the allocation "
            "search and the choice of mode score on the calibration data, which favours over-fitted models")
    log(f"calibrating on {len(calibration)} batches (cache: {work})")
    with stages("calibrate"):
        grams = cache.grams(plan, calibration, work, log)
    settings = measure_settings(cfg.clock, target)
    curves, table = None, None
    if cfg.keep_fraction:
        log("fixed fractions: no error curves, latency table or search")
    else:
        log(f"error curves at {cfg.levels} widths per group ({cfg.engine.name}, {cfg.workers} worker(s))")
        with stages("error curves"):
            curves = error_curves(plan, grams, cfg.levels, cache_dir=work / "curves", intercept=cfg.intercept,
                                  engine=cfg.engine)
        log(f"latency table on {target.name} ({cfg.threads} thread(s), {settings.clock} clock)")
        with stages("latency table"):
            table = measure_latency(plan, target, {name: list(w) for name, (w, _) in curves.items()}, settings=settings,
                                    cache_dir=lookup_dirs(cfg.tables), log=log)
        log(f"dense {table.dense_ms:.2f} ms; fastest reachable {min_latency_ms(curves, table):.2f} ms (predicted)")
    return Prepared(loaded, task, plan, calibration, n_calib, held_out, grams, curves, work / "curves", table,
                    target.for_inputs(loaded.example_inputs), settings, stages)


def choose_allocation(prep: Prepared, cfg: JobConfig, budget_ms: float, log: Log = print) -> tuple[Allocation, list[Candidate]]:
    """The knapsack's allocation, or with ``cfg.search`` the best candidate scored end to end."""
    if not cfg.search:
        return allocate(prep.curves, prep.table, budget_ms), []
    scorer = _scorer(prep, cfg)
    log(f"searching allocations for {budget_ms:.2f} ms (end-to-end loss on {len(scorer.batches)} "
        f"{'held-out' if prep.held_out else 'calibration'} batches)")
    kinds = {name: prep.plan.group(name).kind for name in prep.curves}
    return search_allocation(prep.curves, prep.table, budget_ms, kinds, scorer, log)


def _scorer(prep: Prepared, cfg: JobConfig) -> Scorer:
    if prep.scorer is None:
        scored = _reference(prep)[0]
        widths = {g: w for g, (w, _) in prep.curves.items()}
        prep.scorer = Scorer(prep.plan, _grams(prep), prep.curves, scored, prep.task, cache_dir=prep.curves_dir,
                             scores_file=cache.scores_path(prep.plan, prep.calibration, scored, prep.task.name, widths,
                                                           prep.curves_dir.parent, cfg.intercept),
                             intercept=cfg.intercept, dense_outputs=_reference(prep)[1])
    return prep.scorer


def _reference(prep: Prepared) -> tuple[list[tuple], list[torch.Tensor | None]]:
    """The batches the search and the choice of prune mode score on (held out when there are
    any), and the dense model's outputs there, computed once per job."""
    if prep.reference is None:
        scored = prep.held_out or prep.calibration
        prep.reference = (scored, prep.task.reference_outputs(prep.plan.program.module(), scored))
    return prep.reference


def _grams(prep: Prepared) -> Grams:
    """The dense Gram matrices, read back from the run's cache when the job dropped them to make
    room for an export (``_release``)."""
    if prep.grams is None:
        prep.grams = cache.grams(prep.plan, prep.calibration, prep.curves_dir.parent, lambda _: None)
    return prep.grams


def _release(prep: Prepared) -> None:
    """Drop what only allocating and pruning need before the exports, whose checks load the model
    two more times (on the large-vocabulary stand-in this made the job's peak): the search's
    working copy, memoised solves and paused runs, and the Gram matrices. Both are rebuilt from the
    cache if a retry allocates again."""
    prep.scorer = None
    prep.grams = None


def final_prune(prep: Prepared, cfg: JobConfig, widths: dict[str, int], log: Log = print) -> tuple[PruneResult, str, dict[str, float]]:
    """The model pruned at ``widths`` in ``cfg.mode``, that mode, and the held-out loss of each
    mode tried. ``best`` prunes in both and keeps the lower held-out loss: sequential mode feeds
    each layer the pruned model's inputs, which helps language models, but with few distinct
    calibration photos it compounds their over-fitting (measured in docs/results.md)."""
    def pruned(mode: str) -> PruneResult:
        return prune(None, prep.calibration, method=cfg.method, mode=mode, plan=prep.plan, widths=widths, grams=_grams(prep),
                     intercept=cfg.intercept, engine=cfg.engine)

    if cfg.mode != "best":
        return pruned(cfg.mode), cfg.mode, {}
    scored, dense_outputs = _reference(prep)
    kept, best, losses = None, "", {}
    for mode in MODES:  # one pruned model in memory besides the one kept
        result = pruned(mode)
        losses[mode] = prep.task.end_to_end_loss(result.model, scored, dense_outputs)
        if kept is None or losses[mode] < losses[best]:
            kept, best = result, mode
        del result
    log("held-out loss " + ", ".join(f"{m} {v:.4f}" for m, v in losses.items()) + f": keeping {best}")
    return kept, best, losses


def _tighter_allocation(prep: Prepared, cfg: JobConfig, budget_ms: float, alloc: Allocation, measured_ms: float,
                        attempts: int, log: Log) -> tuple[Allocation, list[Candidate]] | None:
    """When the exported model missed the budget (``meets_budget``), the allocation for a budget
    tightened by the miss ratio; None when it is met, the attempts are spent, or nothing faster
    exists. The table predicts regions that do not add up exactly in context, so the
    measurement has the last word."""
    if meets_budget(measured_ms, budget_ms) or attempts > BUDGET_RETRIES:
        return None
    goal = alloc.predicted_ms * budget_ms / measured_ms
    log(f"{100 * (measured_ms / budget_ms - 1):.1f}% over the budget: allocating again for a predicted {goal:.2f} ms")
    try:
        tighter = choose_allocation(prep, cfg, goal, log)
    except InfeasibleBudgetError as e:
        log(f"no faster allocation: {e}")
        return None
    return None if tighter[0].widths == alloc.widths else tighter


def _timings(runnable: Runnable, inputs: tuple, settings: MeasureSettings, budget_ms: float, label: str, log: Log) -> list[Timing]:
    """One timing of a built model, or two when the first misses the budget: a miss rebuilds the
    model, so one disturbed timing must not decide it. The lower counts, as within ``measure``:
    interference only ever slows a run down."""
    timings = [measure(runnable, inputs, settings)]
    if not meets_budget(timings[0].ms, budget_ms):
        log(f"[{label}] measured {timings[0].ms:.2f} ms, over the budget {budget_ms:.2f} ms: timing it again")
        timings.append(measure(runnable, inputs, settings))
    best = min(timings, key=lambda t: t.ms)
    log(f"[{label}] measured {best.ms:.2f} ms ({best.runs} timed runs{', noisy' if best.noisy else ''}) vs budget {budget_ms:.2f} ms")
    return timings


def _faster(new: Attempt, best: Attempt | None) -> Attempt:
    """The faster of a new attempt and the best so far; the other's artifacts are deleted.
    Models are rebuilt only while they miss the budget, so the fastest is also the one that met
    it, if any; a rebuild can measure slower (the table errs differently for each allocation)
    and must not replace a faster model. A tie keeps the earlier, less pruned one."""
    if best is None:
        return new
    keep, drop = (best, new) if best.measured_ms <= new.measured_ms else (new, best)
    shutil.rmtree(drop.folder)
    return keep


def output_formats(cfg: JobConfig, loaded: LoadedModel, target: Target) -> tuple[str, ...]:
    """The formats the job writes: ``cfg.formats``, or every one that applies (``hf`` for a
    Llama, Qwen2 or Mistral causal LM). An onnxruntime target times model.onnx, so it always
    gets one."""
    lm = getattr(loaded.model, "lm", None) if loaded.task == "causal-lm" else None
    applies = ("onnx", "pt2") + (("hf",) if lm is not None and hf_folder.supported(lm) else ())
    formats = cfg.formats or applies
    if "hf" in formats and "hf" not in applies:
        raise OsscarError(f"--formats hf: {loaded.name!r} is not a Llama, Qwen2 or Mistral causal LM, which is what "
                          "a Hugging Face folder can be written for")
    if target.runs_onnx and "onnx" not in formats:
        raise OsscarError(f"--formats without onnx: the {target.name} target measures model.onnx; keep onnx in the list")
    return tuple(f for f in FORMATS if f in formats)


def _recover(prep: Prepared, cfg: JobConfig, kept: Attempt, dense: torch.nn.Module, label: str, log: Log) -> dict[str, Any]:
    """Distil the kept model (``recover.recover``) and, when that helped, export it again over its
    artifacts: recovery changes weights, not shapes, so the measured latency still holds."""
    loaded, stages = prep.loaded, prep.stages
    with stages("quality"):
        one_shot = prep.task.quality(loaded, kept.result.model, dense, cfg.n_eval)
    log(f"[{label}] one-shot {one_shot}; recovering for {cfg.recover_minutes:g} min ({cfg.recover_params}, {cfg.device})")
    with stages("recover"):
        program, done = recover(kept.result.program, loaded.example_inputs, dense, prep.calibration,
                                prep.held_out or prep.calibration, prep.task, cfg.recover_minutes, cfg.recover_params,
                                cfg.device, log)
    if done.kept:
        kept.result = dataclasses.replace(kept.result, program=program, model=program.module())
        with stages("export"):
            kept.artifacts = _export(program, loaded.example_inputs, kept.folder, cfg.formats)
    return {**dataclasses.asdict(done), "quality_one_shot": one_shot}


def _export(program: torch.export.ExportedProgram, inputs: tuple, where: Path, formats: Sequence[str]) -> dict[str, Any]:
    """The model's ONNX and ``.pt2`` files, those of ``formats``, each parity-checked."""
    out = {}
    if "onnx" in formats:
        out["onnx"] = export_onnx(program, inputs, where / "model.onnx")
    if "pt2" in formats:
        out["pt2"] = save_program(program, inputs, where / "model.pt2")
    return out


def _publish_attempt(kept: Attempt, folder: Path) -> None:
    """Move the kept attempt's files up into the model's folder."""
    for f in kept.folder.iterdir():
        os.replace(f, folder / f.name)
    kept.folder.rmdir()


def run_job(cfg: JobConfig, log: Log = print) -> list[Outcome]:
    """Run the whole job; the output folder appears only if every step succeeded."""
    cfg = dataclasses.replace(cfg, out=check_output_dir(cfg.out, cfg.force))
    check_writable(cache.root(), "the cache folder", "set OSSCAR_CACHE to a writable folder")
    for stale in sweep_staging(cfg.out):
        log(f"removed {stale}, the staging folder of an earlier job that was killed")
    t_start = time.perf_counter()
    prep = prepare(cfg, log)
    cfg = dataclasses.replace(cfg, n_calib=prep.n_calib)  # the report says what was asked for (and what was used)
    formats = output_formats(cfg, prep.loaded, prep.target)
    cfg = dataclasses.replace(cfg, formats=formats)
    with publishing(cfg.out, cfg.force) as staging:
        if cfg.keep_fraction:
            outcomes, explored = [_fixed_fractions(prep, cfg, staging, log)], []
        else:
            outcomes, explored = _budget_family(prep, cfg, staging, log)
        write_report(staging, cfg=cfg, task=prep.task, plan=prep.plan, table=prep.table, target=prep.target,
                     explored=explored, outcomes=outcomes, calibration_samples=samples(prep.calibration),
                     held_out_samples=samples(prep.held_out), environment=_environment(), seconds=time.perf_counter() - t_start,
                     stages=prep.stages)
    log(f"wrote {cfg.out} in {time.perf_counter() - t_start:.0f} s ({prep.stages.summary()})")
    return outcomes


def _budget_family(prep: Prepared, cfg: JobConfig, staging: Path, log: Log) -> tuple[list[Outcome], list[Allocation]]:
    """One model per budget, each rebuilt while it misses its budget, and the allocations
    explored along the way (for tradeoff.png)."""
    loaded, stages, compiled_target = prep.loaded, prep.stages, prep.target
    budgets = _budgets(cfg, prep.table)
    with stages("allocate"):
        allocations = [(label, ms, *choose_allocation(prep, cfg, ms, log)) for label, ms in budgets]
        explored = tradeoff(prep.curves, prep.table, points=24)
    outcomes: list[Outcome] = []
    for label, budget, alloc, candidates in allocations:
        folder = staging if len(allocations) == 1 else staging / label
        folder.mkdir(parents=True, exist_ok=True)
        attempts: list[dict[str, Any]] = []
        kept: Attempt | None = None
        while True:
            log(f"[{label}] pruning to {budget:.2f} ms (predicted {alloc.predicted_ms:.2f} ms) with {cfg.method}/{cfg.mode}")
            built = _build(prep, cfg, alloc.widths, folder / f".attempt{len(attempts) + 1}", label, log)
            timed = built.folder / "model.onnx" if compiled_target.runs_onnx else built.result.model
            with stages("measure"):
                timings = _timings(compiled_target.compile(timed, loaded.example_inputs), loaded.example_inputs,
                                   prep.settings, budget, label, log)
            fastest = min(timings, key=lambda t: t.ms)
            built = dataclasses.replace(built, number=len(attempts) + 1, allocation=alloc, candidates=candidates,
                                        measured_ms=fastest.ms, noisy=fastest.noisy)
            attempts.append({"predicted_ms": alloc.predicted_ms, "measured_ms": fastest.ms, "timings_ms": [t.ms for t in timings],
                             "timed_runs": [t.runs for t in timings], "meets_budget": meets_budget(fastest.ms, budget)})
            kept = _faster(built, kept)
            with stages("allocate"):
                retry = _tighter_allocation(prep, cfg, budget, alloc, fastest.ms, len(attempts), log)
            if retry is None:
                break
            alloc, candidates = retry
        for number, a in enumerate(attempts, 1):
            a["kept"] = number == kept.number
        if not meets_budget(kept.measured_ms, budget):
            log(f"[{label}] BUDGET MISSED: the fastest of {len(attempts)} model(s) measured {kept.measured_ms:.2f} ms, "
                f"{100 * (kept.measured_ms / budget - 1):.1f}% over {budget:.2f} ms (tolerance {100 * BUDGET_TOLERANCE:g}%); "
                "keeping it")
        outcomes.append(_finish(prep, cfg, kept, label, budget, folder, attempts, log))
    return outcomes, explored


def _fixed_fractions(prep: Prepared, cfg: JobConfig, staging: Path, log: Log) -> Outcome:
    """``--keep-fraction``: the model pruned to the asked fractions, with no budget to meet, so
    nothing is timed."""
    widths = _fixed_widths(cfg, prep.plan)
    label = "keep " + ",".join(f"{k}={f:g}" if k != "*" else f"{f:g}" for k, f in cfg.keep_fraction)
    log(f"[{label}] pruning {sum(w < prep.plan.group(g).count for g, w in widths.items())} of {len(widths)} groups "
        f"with {cfg.method}/{cfg.mode}")
    built = _build(prep, cfg, widths, staging / ".attempt1", label, log)
    return _finish(prep, cfg, built, label, None, staging, [], log)


def _fixed_widths(cfg: JobConfig, plan: StructurePlan) -> dict[str, int]:
    """``--keep-fraction``'s width per group: ``round(f·count)``, at least 1 (``prune.resolve_widths``,
    as the Python API's ``keep_fraction``); kinds not named stay whole."""
    (first, fraction), *_ = cfg.keep_fraction
    try:
        return resolve_widths(plan, fraction if first == "*" else dict(cfg.keep_fraction), None)
    except PlanError as e:
        raise OsscarError(f"--keep-fraction: {e}") from None


def _build(prep: Prepared, cfg: JobConfig, widths: dict[str, int], where: Path, label: str, log: Log) -> Attempt:
    """The model pruned to ``widths`` and exported into ``where`` (an attempt of its own, not
    yet timed)."""
    with prep.stages("prune"):
        result, mode, mode_losses = final_prune(prep, cfg, widths, log)
        _release(prep)
    log(f"[{label}] pruned in {result.seconds:.0f} s; exporting")
    stage = time.perf_counter()
    where.mkdir()
    with prep.stages("export"):
        artifacts = _export(result.program, prep.loaded.example_inputs, where, cfg.formats)
    log(f"[{label}] exported {', '.join(artifacts) or 'nothing yet'} in {time.perf_counter() - stage:.0f} s")
    return Attempt(1, None, [], result, mode, mode_losses, where, artifacts, None, False)


def _finish(prep: Prepared, cfg: JobConfig, kept: Attempt, label: str, budget: float | None, folder: Path,
            attempts: list[dict[str, Any]], log: Log) -> Outcome:
    """Recover, write the Hugging Face folder, publish the kept attempt into ``folder`` and score it."""
    loaded, stages = prep.loaded, prep.stages
    dense_module = prep.plan.program.module()
    recovery = _recover(prep, cfg, kept, dense_module, label, log) if cfg.recover_minutes else None
    if "hf" in cfg.formats:
        with stages("export"):
            kept.artifacts["hf"] = export_hf(loaded.model.lm, kept.result.program, loaded.example_inputs,
                                             kept.folder / "hf", loaded.tokenizer)
        log(f"[{label}] Hugging Face folder written and loaded back")
    _publish_attempt(kept, folder)
    stage = time.perf_counter()
    with stages("quality"):
        quality = prep.task.quality(loaded, kept.result.model, dense_module, cfg.n_eval)
    log(f"[{label}] {quality} ({time.perf_counter() - stage:.0f} s)")
    return Outcome(label, budget, kept.allocation, kept.candidates, kept.result, kept.mode, kept.mode_losses,
                   kept.measured_ms, kept.noisy, quality, kept.artifacts, attempts, recovery)


def _environment() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "osscar_export": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def parse_budgets(values: Sequence[str] | None, flag: str) -> tuple[float, ...]:
    """The budgets given to ``flag`` (``--latency-ms`` or ``--speedup``) as floats, each a usable
    budget (``job.check_budget``: finite, above 0 or above 1), with a specific error otherwise."""
    out = []
    for v in values or ():
        try:
            x = float(v)
        except ValueError:
            raise OsscarError(f"{flag} {v!r} is not a number") from None
        out.append(check_budget(x, flag))
    return tuple(out)
