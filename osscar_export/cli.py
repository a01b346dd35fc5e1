"""``osscar-export``: the command line.

    osscar-export MODEL --latency-ms 8 [6 4 ...] | --speedup 1.5 [2 ...] | --keep-fraction F [options]
    osscar-export inspect MODEL

Exit codes: EXIT_OK, EXIT_ERROR, EXIT_BUDGET_MISSED, EXIT_INTERRUPTED (also in ``--help``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from osscar_export.errors import OsscarError
from osscar_export.solver import METHODS
from osscar_export.tasks import TASKS

BUILTINS = ("smollm2-135m", "efficientnet-lite0", "minilm-l6")
EXIT_OK = 0
EXIT_ERROR = 2  # argparse's code for bad arguments; also every OsscarError
EXIT_BUDGET_MISSED = 3  # the job finished and published, but a model is over its budget: scripts must notice
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
MODEL_HELP = (
    f"a built-in real model ({', '.join(BUILTINS)}), a torchvision model name, "
    "a folder holding a Hugging Face model, or a `module:factory` Python path"
)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--seq-len", type=int, default=128, help="sequence length of the captured language model (default 128)")
    p.add_argument("--batch", type=int, default=1, help="batch size the model is captured and timed with (default 1)")
    p.add_argument("--image-size", type=int, default=None, help="image size for vision models (default: the model's own)")


def _job_parser() -> argparse.ArgumentParser:
    from osscar_export.job import BUDGET_TOLERANCE
    p = argparse.ArgumentParser(
        prog="osscar-export",
        description="Prune MODEL one-shot with OSSCAR to a latency budget and export it (ONNX, .pt2). "
        "Run `osscar-export inspect MODEL` to list its prunable structures.",
        epilog=f"exit codes: {EXIT_OK} every model meets its budget; {EXIT_ERROR} an error (nothing written); "
        f"{EXIT_BUDGET_MISSED} the job finished and wrote --out, but a model measured over its budget even after "
        "rebuilds (report.json: \"meets_budget\": false, \"budget_missed\" says by how much); "
        f"{EXIT_INTERRUPTED} interrupted (Ctrl-C). A model meets its budget when it measures at most "
        f"{100 * BUDGET_TOLERANCE:g}% over it; one timed over it is timed again and the lower timing counts.",
    )
    _model_args(p)
    budget = p.add_argument_group("budget (one or more values make a family of models)")
    budget.add_argument("--latency-ms", nargs="+", default=[], metavar="MS", help="latency budgets in milliseconds (finite, above 0)")
    budget.add_argument("--speedup", nargs="+", default=[], metavar="S",
                        help="speedups over the dense model's measured latency (finite, above 1: 1 is the dense model itself)")
    budget.add_argument("--keep-fraction", default=None, metavar="F",
                        help="instead of a budget, keep this fraction of every group (0.5), or per kind "
                             "(neuron=0.5,kv_group=0.67; kinds not named stay whole): no latency table, search or timing")
    p.add_argument("--target", default="ort-cpu", choices=["ort-cpu", "ort-cuda", "tensorrt", "torch"], help="runtime to measure and meet the budget on")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the target (default 1)")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "thread"],
                   help="latency clock: wall time, or CPU time of the calling thread, which a shared machine's other "
                   "load does not inflate (default auto: thread for single-threaded CPU targets, else wall)")
    p.add_argument("--calib", default=None, help="calibration data: bbc-news, natural-calib, a text file/folder, an image folder or a .pt file (default: by task)")
    p.add_argument("--n-calib", type=int, default=None,
                   help=f"calibration samples: token windows (default {TASKS['causal-lm'].n_calib}), sentences "
                   f"({TASKS['encoder'].n_calib}) or image crops ({TASKS['image-classification'].n_calib})")
    p.add_argument("--n-eval", type=int, default=16, help="held-out samples for the quality metric (default 16)")
    p.add_argument("--levels", type=int, default=16, help="kept-width levels per group for error curves and latency tables (default 16)")
    p.add_argument("--method", default="osscar", choices=[m for m in METHODS if m != "exact"],  # "exact" enumerates supports: tiny layers only
                   help="layer solver (default osscar)")
    p.add_argument("--mode", default="best", choices=["best", "sequential", "dense"],
                   help="calibration of the final prune: sequential, dense, or best (default: both, keeping the lower "
                   "end-to-end loss on the held-out calibration samples)")
    p.add_argument("--intercept", action="store_true",
                   help="re-fit each re-fitted layer's bias too (one is added where it had none), taking the mean of "
                        "what the removed structures contributed on the calibration data (off by default: on SmolLM2 "
                        "it raised held-out perplexity, most on text unlike the calibration data)")
    p.add_argument("--recover-minutes", type=float, default=0.0, metavar="M",
                   help="after pruning, distil the model against the dense one for M minutes on the calibration data "
                        "(kept only if it lowers the held-out loss; default 0: off)")
    p.add_argument("--recover-params", choices=("all", "norms-biases"), default="all",
                   help="what recovery trains (default all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where recovery trains (default cpu)")
    p.add_argument("--formats", default="",
                   help="comma-separated artifacts to write: onnx, pt2, hf (a Hugging Face folder of a pruned Llama, "
                        "Qwen2 or Mistral, loaded back with trust_remote_code=True); default: every one that applies")
    p.add_argument("--workers", type=int, default=1,
                   help="solve the error curves and dense-mode layer problems as Ray tasks on this many local workers "
                        "(default 1: in this process; needs the [ray] extra)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="run those Ray tasks on an existing cluster instead")
    p.add_argument("--no-search", action="store_true",
                   help="take the knapsack's allocation as is instead of measuring each group's end-to-end "
                   "sensitivity and scoring candidate allocations (re-weighted knapsacks and uniform) on held-out "
                   f"calibration samples ({TASKS['causal-lm'].n_score} windows or {TASKS['encoder'].n_score} sentences "
                   f"beyond --n-calib, or {TASKS['image-classification'].n_score} crops of photos held out whole)")
    p.add_argument("--out", type=Path, default=Path("out"),
                   help="output folder (default ./out), created only when the whole job succeeds; a folder that holds files "
                   "(even one another job wrote while this one ran) is never replaced without --force. It cannot be the "
                   "current folder or one above it")
    p.add_argument("--force", action="store_true",
                   help="replace an output folder that an earlier osscar-export job wrote (one holding report.json), "
                   "deleting everything in it, including files added since; a folder without report.json is never replaced")
    p.add_argument("--tables", type=Path, default=None,
                   help="folder of latency tables, read first and saved to (the user cache instead when it is read-only); "
                   "default: the user cache, $OSSCAR_CACHE/latency_tables. The tables shipped with osscar-export are read "
                   "too, from any working directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (groups; whether Grams, error curves and the latency table are cached, and why a "
                   "table is stale; estimated time per stage) after one load and capture, and stop")
    return p


def _inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osscar-export inspect", description="List MODEL's prunable structure groups and the dims left fixed, with reasons.")
    _model_args(p)
    p.add_argument("--all-blocked", action="store_true", help="list every blocked dim (default: the first 40)")
    return p


def inspect(argv: list[str], console: Console) -> None:
    args = _inspect_parser().parse_args(argv)
    from osscar_export.models import load_model
    from osscar_export.passes.structures import find_structures

    with console.status(f"loading and capturing {args.model}"):
        loaded = load_model(args.model, seq_len=args.seq_len, batch=args.batch, image_size=args.image_size)
        plan = find_structures(loaded.model, loaded.example_inputs)
    groups = Table(title=f"{args.model}: {len(plan.groups)} groups, {plan.structures} structures")
    for col in ("group", "kind", "n", "d", "consumers", "producers", "followers"):
        groups.add_column(col, justify="right" if col in ("n", "d") else "left", overflow="fold")
    for g in plan.groups:
        groups.add_row(g.name, g.kind, str(g.count), str(g.unit), ", ".join(c.weight for c in g.consumers),
                       str(len(g.producers)), str(len(g.followers)))
    console.print(groups)
    blocked = Table(title=f"{len(plan.blocked)} dims left fixed")
    blocked.add_column("where", overflow="fold")
    blocked.add_column("reason", overflow="fold")
    for where, reason in plan.blocked if args.all_blocked else plan.blocked[:40]:
        blocked.add_row(where, reason)
    console.print(blocked)


def run(argv: list[str], console: Console) -> int:
    """Run the job; EXIT_BUDGET_MISSED when a model it wrote is over its budget."""
    args = _job_parser().parse_args(argv)
    from osscar_export.job import JobConfig, parse_keep_fraction
    from osscar_export.pipeline import parse_budgets, run_job

    cfg = JobConfig(
        model=args.model, latency_ms=parse_budgets(args.latency_ms, "--latency-ms"), speedup=parse_budgets(args.speedup, "--speedup"),
        target=args.target, threads=args.threads, calib=args.calib, n_calib=args.n_calib, seq_len=args.seq_len,
        batch=args.batch, image_size=args.image_size, levels=args.levels, method=args.method, mode=args.mode, n_eval=args.n_eval,
        out=args.out, force=args.force, tables=args.tables, seed=args.seed, clock=args.clock,
        search=not args.no_search,
        intercept=args.intercept, recover_minutes=args.recover_minutes, recover_params=args.recover_params,
        device=args.device, formats=tuple(f for f in args.formats.split(",") if f),
        keep_fraction=parse_keep_fraction(args.keep_fraction) if args.keep_fraction is not None else (),
        workers=args.workers, ray_address=args.ray_address,
    )
    if not cfg.latency_ms and not cfg.speedup and not cfg.keep_fraction:
        raise OsscarError("give a budget: --latency-ms MS [MS ...] or --speedup S [S ...], or fixed fractions: --keep-fraction F")
    if args.dry_run:
        return dry_run(cfg, console)
    outcomes = run_job(cfg, log=lambda msg: console.log(msg))
    summary = Table(title=f"{args.model} → {args.out}")
    for col in ("model", "budget ms", "predicted ms", "measured ms", "budget", "quality"):
        summary.add_column(col)
    for o in outcomes:
        timed = o.budget_ms is not None
        summary.add_row(o.label, f"{o.budget_ms:.2f}" if timed else "-", f"{o.allocation.predicted_ms:.2f}" if timed else "-",
                        f"{o.measured_ms:.2f}" + (" (noisy)" if o.noisy else "") if timed else "-",
                        ("met" if o.meets_budget else "[bold red]MISSED[/]") if timed else "none",
                        ", ".join(f"{k} {v:.4g}" for k, v in o.quality.items()))
    console.print(summary)
    missed = [o for o in outcomes if not o.meets_budget]
    for o in missed:
        console.print(f"[bold red]budget missed:[/] {o.label} measured {o.measured_ms:.3f} ms, "
                      f"{100 * (o.measured_ms / o.budget_ms - 1):.1f}% over its budget of {o.budget_ms:.3f} ms; "
                      f"it was written to {args.out} anyway (exit code {EXIT_BUDGET_MISSED})")
    return EXIT_BUDGET_MISSED if missed else EXIT_OK


def dry_run(cfg, console: Console) -> int:
    """Print what the job ``cfg`` would do, stage by stage, with estimated minutes."""
    from osscar_export.dry_run import dry_run as plan_job

    with console.status(f"loading and capturing {cfg.model}"):
        plan, stages = plan_job(cfg)
    kinds = Counter(g.kind for g in plan.groups)
    console.print(f"{cfg.model}: {len(plan.groups)} groups ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
                  f"{plan.structures} structures, {len(plan.blocked)} dims blocked")
    table = Table(title=f"dry run: about {sum(s.seconds for s in stages) / 60:.0f} min in all (estimates)")
    for col in ("stage", "what", "minutes"):
        table.add_column(col, overflow="fold")
    for s in stages:
        table.add_row(s.stage, escape(s.status), f"{s.seconds / 60:.1f}")
    console.print(table)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console(stderr=True)
    try:
        if argv and argv[0] == "inspect":
            inspect(argv[1:], console)
        else:
            return run(argv, console)
    except OsscarError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)  # paths may hold [..]
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: cached Gram matrices, error curves and latency tables are kept; run the same command again to resume")
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
