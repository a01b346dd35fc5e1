#!/usr/bin/env python
"""Evidence for the latency-budget job: budgets met, predictions right, allocator wins.

For one model and a family of speedups it

1. runs the main job (``run_job``, exactly what ``osscar-export MODEL --speedup ...`` runs) or
   re-uses the output folder of such a run (``--run DIR``), re-measures every exported
   ``model.onnx`` afresh and compares it with its budget and with the table's prediction;
2. builds the UNIFORM baseline at the same measured latency: every prunable group at one keep
   fraction, the fraction found by bisection on the latency table's prediction (linear in width
   between the table's measured widths), then corrected from end-to-end measurements of the
   materialized model until the two measured latencies agree; pruned with the same OSSCAR
   pipeline (``final_prune``: the job's mode, by default the better of sequential and dense on
   held-out calibration samples) and exported the same way;
   both models are then timed alternately in the same rounds (interference hits both alike) and
   scored on the same held-out data by running their ONNX files in onnxruntime, with the task's
   quality metric (``Task.quality``, as in the job's report);
3. materializes ``--points`` allocations across the whole budget range (keep-first masks: the
   weights do not change a latency), compiles each on the target and reports predicted vs
   measured latency with the mean absolute percentage error.

Results and the commands that made them: docs/results.md, "Allocation vs uniform" (step 2) and
"Latency prediction" (step 3); how the table predicts: docs/design.md, "Latency".

    python tools/eval_budget.py --model smollm2-135m --speedup 1.5 2.0 --points 0 --run DIR --out WORK
    python tools/eval_budget.py --model smollm2-135m --skip-family --points 10 --out WORK

``--model`` is any model spec ``osscar-export`` takes; ``--calib``, ``--n-calib`` and ``--levels``
are the job's options of the same names (a ``module:factory`` model needs ``--calib FILE.pt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from osscar_export import data, evaluate, export_onnx, materialize
from osscar_export.allocate import tradeoff
from osscar_export.atomic import write_text
from osscar_export.job import JobConfig, Prepared
from osscar_export.latency.table import LatencyTable
from osscar_export.latency.timing import measure
from osscar_export.pipeline import final_prune, prepare, run_job
from osscar_export.widths import first_mask, width_grid

Log = Callable[[str], None]


# ------------------------------------------------------------------------------ latency helpers


def interp_ms(table: LatencyTable, group: str, width: float) -> float:
    """A group's region time at any width: linear between the table's measured widths."""
    widths = table.widths(group)
    return float(np.interp(width, widths, [table.ms(group, w) for w in widths]))


def predict_any(table: LatencyTable, widths: Mapping[str, int]) -> float:
    """``table.predict`` for widths the table did not measure (uniform fractions fall between)."""
    return table.base_ms + table.scale * sum(
        interp_ms(table, g, widths.get(g, table.full_width(g))) for g in table.groups
    )


@dataclass
class Timer:
    """Times compiled models on the job's target with the job's measurement settings."""

    prep: Prepared

    def compile(self, model: torch.nn.Module | Path) -> Any:
        return self.prep.target.compile(model, self.prep.loaded.example_inputs)

    def ms(self, runnable: Any) -> tuple[float, bool]:
        t = measure(runnable, self.prep.loaded.example_inputs, self.prep.settings)
        return t.ms, t.noisy

    def interleaved(self, runnables: Mapping[str, Any], rounds: int) -> dict[str, tuple[float, bool]]:
        """Each model's fastest time over ``rounds`` alternating measurements: interference that
        comes and goes hits every model, so their ratio is fair even when absolute ms drift."""
        best: dict[str, tuple[float, bool]] = {}
        for _ in range(rounds):
            for name, r in runnables.items():
                ms, noisy = self.ms(r)
                if name not in best or ms < best[name][0]:
                    best[name] = (ms, noisy)
        return best


class OrtModel:
    """An exported ONNX file as a callable on torch tensors, for the quality metrics."""

    def __init__(self, runnable: Any):
        self.runnable = runnable

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runnable(*self.runnable.prepare(inputs))[0])


# ------------------------------------------------------------------------------ quality


def quality_fn(prep: Prepared, n_eval: int) -> Callable[[Callable], dict[str, float]]:
    """The task's held-out metric (``Task.quality``, what the job's report gives) for a model
    callable, on the same data for every model scored; image classifiers also get top-1 accuracy
    on the labelled photos."""
    loaded, task = prep.loaded, prep.task
    dense = prep.plan.program.module()
    if task.name == "image-classification" and loaded.preprocess is not None:
        labelled, labels = data.imagenet_labelled(loaded.preprocess, loaded.example_inputs[0].shape[0])

        def score(m: Callable) -> dict[str, float]:
            top1 = evaluate.classification_metrics(m, dense, labelled, labels)
            return {**task.quality(loaded, m, dense, n_eval), "top1_labelled": top1["top1"],
                    "top1_labelled_dense": top1["top1_dense"]}

        return score
    return lambda m: task.quality(loaded, m, dense, n_eval)


# ------------------------------------------------------------------------------ uniform baseline


def uniform_widths(prep: Prepared, fraction: float) -> dict[str, int]:
    """Every prunable group at one keep fraction, rounded as the table's grid is (``width_grid``)."""
    return {g.name: width_grid(g, [fraction])[0] for g in prep.plan.groups if g.name in prep.curves}


def fraction_for(prep: Prepared, target_ms: float) -> float:
    """The largest uniform keep fraction whose predicted latency is at most ``target_ms``."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if predict_any(prep.table, uniform_widths(prep, mid)) <= target_ms:
            lo = mid
        else:
            hi = mid
    return lo


def materialized(prep: Prepared, widths: Mapping[str, int]) -> torch.nn.Module:
    """The allocation as a physically smaller model (keep-first masks, weights unchanged)."""
    masks = {g: first_mask(prep.plan.group(g).count, k) for g, k in widths.items()}
    return materialize(prep.plan.program.module(), prep.plan, masks)


def match_uniform(prep: Prepared, timer: Timer, reference: Any, reference_predicted_ms: float, log: Log,
                  tol: float = 0.03, tries: int = 6) -> dict[str, Any]:
    """A uniform fraction whose measured latency matches the reference model's measured one.

    The first goal is the reference's own prediction (whatever error the table makes on the
    allocated model it likely makes on the uniform one too). While every try lands on one side,
    the next rescales the goal by the measured ratio ``reference / uniform``; once tries lie on
    both sides, the fraction is interpolated between the closest two (regula falsi), because the
    table can mispredict uniform widths by far more than a ratio corrects.
    Both models are timed in alternation; stops within ``tol``. Returns the best try.
    """
    history: list[dict[str, float]] = []
    goal = reference_predicted_ms
    fraction = fraction_for(prep, goal)
    best: dict[str, Any] | None = None
    for attempt in range(tries):
        widths = uniform_widths(prep, fraction)
        times = timer.interleaved({"ref": reference, "uniform": timer.compile(materialized(prep, widths))}, rounds=1)
        ref_ms, uni_ms = times["ref"][0], times["uniform"][0]
        gap = (uni_ms - ref_ms) / ref_ms
        history.append({"fraction": fraction, "predicted_ms": predict_any(prep.table, widths), "goal_ms": goal,
                        "uniform_ms": uni_ms, "reference_ms": ref_ms, "gap": gap})
        log(f"  uniform try {attempt + 1}: fraction {fraction:.4f} → {uni_ms:.2f} ms vs allocated {ref_ms:.2f} ms ({100 * gap:+.1f}%)")
        if best is None or abs(gap) < abs(best["gap"]):
            best = {"fraction": fraction, "widths": widths, "gap": gap}
        if abs(gap) <= tol:
            break
        below = [h for h in history if h["gap"] < 0]
        above = [h for h in history if h["gap"] > 0]
        if below and above:
            lo = max(below, key=lambda h: h["fraction"])
            hi = min(above, key=lambda h: h["fraction"])
            fraction = lo["fraction"] + (hi["fraction"] - lo["fraction"]) * -lo["gap"] / (hi["gap"] - lo["gap"])
        else:
            goal *= ref_ms / uni_ms
            fraction = fraction_for(prep, goal)
        if uniform_widths(prep, fraction) == widths:
            break  # the widths are discrete: no closer uniform model exists
    assert best is not None
    return {**best, "history": history}


# ------------------------------------------------------------------------------ the three checks


def family(args: argparse.Namespace, cfg: JobConfig, prep: Prepared, log: Log) -> list[dict[str, Any]]:
    """Allocated models (from the job) vs budget, prediction, and the uniform baseline."""
    run_dir = Path(args.run) if args.run else args.out / "family"
    if not args.run:
        t0 = time.perf_counter()
        run_job(dataclasses.replace(cfg, out=run_dir), log=log)
        log(f"family job took {time.perf_counter() - t0:.0f} s")
    timer = Timer(prep)
    score = quality_fn(prep, args.n_eval)
    rows = []
    for s in args.speedup:
        label = f"{s:g}x"
        folder = run_dir if len(args.speedup) == 1 else run_dir / label
        report = json.loads((folder / "report.json").read_text())
        budget = report["budget_ms"]  # the job's own (the table may have been re-calibrated since)
        widths = {g["name"]: g["allocated"] for g in report["groups"] if g["name"] in prep.curves}
        if abs(report["dense_ms"] - prep.table.dense_ms) > 1e-9 * prep.table.dense_ms:
            log(f"[yellow]{label}: the job used another latency table (dense {report['dense_ms']:.2f} ms, "
                f"now {prep.table.dense_ms:.2f} ms); predictions below use the current one")
        predicted = prep.table.predict(widths)
        log(f"[{label}] matching a uniform model to the allocated model's measured latency")
        allocated = timer.compile(folder / "model.onnx")
        match = match_uniform(prep, timer, allocated, predicted, log)
        uni, uni_mode, _ = final_prune(prep, cfg, match["widths"], log)
        uni_path = args.out / f"uniform-{label}" / "model.onnx"
        export_onnx(uni.model, prep.loaded.example_inputs, uni_path)
        uniform = timer.compile(uni_path)
        times = timer.interleaved({"allocated": allocated, "uniform": uniform}, rounds=args.rounds)
        q_alloc, q_uni = score(OrtModel(allocated)), score(OrtModel(uniform))
        measured = times["allocated"][0]
        rows.append({
            "label": label, "budget_ms": budget, "dense_ms": prep.table.dense_ms,
            "predicted_ms": predicted, "job_measured_ms": report["measured_ms"],
            "measured_ms": measured, "measured_noisy": times["allocated"][1],
            "over_budget": (measured - budget) / budget, "prediction_error": (predicted - measured) / measured,
            "uniform_fraction": match["fraction"], "uniform_widths": match["widths"],
            "uniform_ms": times["uniform"][0], "uniform_noisy": times["uniform"][1],
            "uniform_match_history": match["history"],
            "allocated_quality": q_alloc, "uniform_quality": q_uni, "allocated_widths": widths,
            "job_quality": report["quality"], "prune_seconds_uniform": uni.seconds,
            "allocated_mode": report["mode"], "uniform_mode": uni_mode,
        })
        log(f"[{label}] allocated {measured:.2f} ms {q_alloc} | uniform {times['uniform'][0]:.2f} ms {q_uni}")
    return rows


def points(args: argparse.Namespace, prep: Prepared, log: Log) -> list[dict[str, Any]]:
    """Predicted vs measured latency of allocations spread over the whole budget range."""
    timer = Timer(prep)
    rows = []
    for i, a in enumerate(tradeoff(prep.curves, prep.table, points=args.points)):
        t0 = time.perf_counter()
        runnable = timer.compile(materialized(prep, a.widths))
        ms, noisy = timer.ms(runnable)
        rows.append({"budget_ms": a.budget_ms, "predicted_ms": a.predicted_ms, "measured_ms": ms, "noisy": noisy,
                     "error": (a.predicted_ms - ms) / ms, "kept_structures": sum(a.widths.values()), "widths": a.widths})
        log(f"point {i + 1}/{args.points}: predicted {a.predicted_ms:.2f} ms, measured {ms:.2f} ms "
            f"({time.perf_counter() - t0:.0f} s)")
    return rows


def fit_ablation(table: LatencyTable, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """MAPE over ``rows`` when the table's line is fitted to its first k fit points only (the
    dense model first, then the fastest, then the mid points): how many end-to-end points the
    fit needs. Refits a copy; the table itself is untouched."""
    out = []
    for k in range(1, len(table.fit_points) + 1):
        trial = dataclasses.replace(table)
        trial.fit(table.fit_points[:k])
        errors = [abs(trial.predict(r["widths"]) - r["measured_ms"]) / r["measured_ms"] for r in rows]
        out.append({"points": [p.label for p in table.fit_points[:k]], "mape": float(np.mean(errors)),
                    "worst": float(np.max(errors))})
    return out


# ------------------------------------------------------------------------------ output


def family_table(rows: Sequence[dict[str, Any]]) -> Table:
    t = Table(title="allocated (OSSCAR + allocator) vs uniform at the same measured latency")
    for col in ("budget", "ms budget", "ms predicted", "ms measured", "over budget", "pred. error",
                "uniform f", "ms uniform", "quality allocated", "quality uniform"):
        t.add_column(col, justify="right")
    for r in rows:
        fmt = lambda q: ", ".join(f"{k} {v:.4g}" for k, v in q.items())  # noqa: E731
        t.add_row(r["label"], f"{r['budget_ms']:.2f}", f"{r['predicted_ms']:.2f}",
                  f"{r['measured_ms']:.2f}" + (" (noisy)" if r["measured_noisy"] else ""),
                  f"{100 * r['over_budget']:+.1f}%", f"{100 * r['prediction_error']:+.1f}%",
                  f"{r['uniform_fraction']:.3f}", f"{r['uniform_ms']:.2f}" + (" (noisy)" if r["uniform_noisy"] else ""),
                  fmt(r["allocated_quality"]), fmt(r["uniform_quality"]))
    return t


def points_table(rows: Sequence[dict[str, Any]]) -> Table:
    mape = 100 * float(np.mean([abs(r["error"]) for r in rows]))
    t = Table(title=f"predicted vs measured latency, {len(rows)} allocations: MAPE {mape:.1f}%")
    for col in ("#", "budget ms", "predicted ms", "measured ms", "error", "kept structures"):
        t.add_column(col, justify="right")
    for i, r in enumerate(rows):
        t.add_row(str(i + 1), f"{r['budget_ms']:.2f}", f"{r['predicted_ms']:.2f}",
                  f"{r['measured_ms']:.2f}" + (" (noisy)" if r["noisy"] else ""), f"{100 * r['error']:+.1f}%",
                  str(r["kept_structures"]))
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="any model spec osscar-export takes (default smollm2-135m)")
    ap.add_argument("--calib", default=None, help="calibration data, as the job's --calib (default: by task)")
    ap.add_argument("--n-calib", type=int, default=None, help="calibration samples, as the job's --n-calib (default: by task)")
    ap.add_argument("--levels", type=int, default=16, help="widths per group of the error curves and latency table, as the job's --levels")
    ap.add_argument("--speedup", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--points", type=int, default=10, help="allocations for predicted vs measured (0: skip)")
    ap.add_argument("--out", type=Path, required=True, help="working folder (uniform models, the family if run here)")
    ap.add_argument("--run", default=None, help="output folder of an earlier `osscar-export MODEL --speedup ...` run to re-use")
    ap.add_argument("--tables", type=Path, default=Path("latency_tables"))
    ap.add_argument("--n-eval", type=int, default=32, help="held-out windows / images for the quality comparison")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timing rounds of allocated vs uniform")
    ap.add_argument("--clock", choices=["auto", "wall", "thread"], default="auto", help="latency clock, as the job's --clock")
    ap.add_argument("--skip-family", action="store_true", help="only the predicted-vs-measured points")
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    console = Console(stderr=True, width=200)
    log: Log = lambda msg: console.log(msg)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = JobConfig(model=args.model, speedup=tuple(args.speedup), tables=args.tables, clock=args.clock,
                    calib=args.calib, n_calib=args.n_calib, levels=args.levels)
    t0 = time.perf_counter()
    prep = prepare(cfg, log)
    result: dict[str, Any] = {"model": args.model, "clock": prep.settings.clock, "dense_ms": prep.table.dense_ms,
                              "table": {"base_ms": prep.table.base_ms, "scale": prep.table.scale,
                                        "fastest_ms": prep.table.fastest_ms, "noisy": prep.table.noisy}}
    if not args.skip_family:
        result["family"] = family(args, cfg, prep, log)
        console.print(family_table(result["family"]))
    if args.points:
        result["points"] = points(args, prep, log)
        result["mape"] = float(np.mean([abs(r["error"]) for r in result["points"]]))
        console.print(points_table(result["points"]))
        result["fit_ablation"] = fit_ablation(prep.table, result["points"])
        t = Table(title="prediction error by the end-to-end points the fit uses")
        for col in ("fit points", "MAPE", "worst"):
            t.add_column(col)
        for r in result["fit_ablation"]:
            t.add_row(", ".join(r["points"]), f"{100 * r['mape']:.1f}%", f"{100 * r['worst']:.1f}%")
        console.print(t)
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        write_text(args.json, json.dumps(result, indent=2, default=float))
    print(json.dumps({k: v for k, v in result.items() if k in ("model", "dense_ms", "mape", "seconds")}, default=float))


if __name__ == "__main__":
    main()
