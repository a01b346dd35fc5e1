"""The job's evidence: report.json (machine-readable), report.md (for people), tradeoff.png
(docs/design.md, "Pipeline")."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from osscar_export.allocate import Allocation  # noqa: E402
from osscar_export.atomic import atomic_path, write_text  # noqa: E402
from osscar_export.job import JobConfig, Outcome  # noqa: E402
from osscar_export.latency.table import LatencyTable  # noqa: E402
from osscar_export.plan import StructurePlan  # noqa: E402
from osscar_export.targets import Target  # noqa: E402
from osscar_export.tasks import Task  # noqa: E402


def outcome_json(o: Outcome, *, table: LatencyTable, plan: StructurePlan, cfg: JobConfig,
                 target: Target, environment: Mapping[str, str]) -> dict[str, Any]:
    """One model's report: the budget, the three latencies, per-group decisions and quality."""
    groups = []
    for g in plan.groups:
        width = o.allocation.widths.get(g.name, g.count)
        groups.append({
            "name": g.name,
            "kind": g.kind,
            "count": g.count,
            "kept": int(o.result.masks[g.name].sum()) if g.name in o.result.masks else width,
            "allocated": width,
            "predicted_ms": table.ms(g.name, width) if g.name in table.groups else None,
            "layer_loss": {c.weight: o.result.layer_losses.get(c.weight) for c in g.consumers},
        })
    parity = {k: {"max_abs_diff": r.max_abs_diff, "runtime": r.runtime} for k, r in o.artifacts.items()}
    return {
        "model": cfg.model,
        "budget_ms": o.budget_ms,
        "dense_ms": table.dense_ms,
        "predicted_ms": o.allocation.predicted_ms,
        "measured_ms": o.measured_ms,
        "measurement_noisy": o.noisy,
        "meets_budget": o.measured_ms <= o.budget_ms,
        "prediction_error": (o.allocation.predicted_ms - o.measured_ms) / o.measured_ms,
        "quality": o.quality,
        "method": cfg.method,
        "mode": o.mode,
        "mode_losses": o.mode_losses,
        "calibration": {"source": cfg.calib or "default", "samples": cfg.n_calib, "seed": cfg.seed},
        "target": target.settings(),
        "measurement": table.measurement,
        "groups": groups,
        "blocked": [list(b) for b in plan.blocked],
        "parity": parity,
        "allocation_search": [
            {"candidate": c.name, "predicted_ms": c.allocation.predicted_ms, "normalised_loss": c.allocation.loss,
             "held_out_loss": c.score, "chosen": c.allocation is o.allocation}
            for c in o.candidates
        ],
        "attempts": o.attempts,
        "prune_seconds": o.result.seconds,
        "versions": dict(environment),
    }


def _markdown(r: Mapping[str, Any], label: str, loss_name: str) -> str:
    lines = [
        f"# osscar-export: {r['model']} ({label})",
        "",
        "| | ms |",
        "|---|---|",
        f"| budget | {r['budget_ms']:.3f} |",
        f"| dense (table) | {r['dense_ms']:.3f} |",
        f"| predicted | {r['predicted_ms']:.3f} |",
        f"| measured | {r['measured_ms']:.3f}{' (noisy)' if r['measurement_noisy'] else ''} |",
        "",
        f"Budget {'met' if r['meets_budget'] else 'missed'} ({100 * (r['measured_ms'] / r['budget_ms'] - 1):+.1f}%); "
        f"prediction error {100 * r['prediction_error']:+.1f}%; {len(r['attempts'])} model(s) built.",
        f"Method {r['method']} ({r['mode']}), target {r['target']['name']} with {r['target']['threads']} thread(s), "
        f"{r['measurement']['clock']} clock.",
        "",
        "Quality (held-out data): " + (", ".join(f"{k} = {v:.4g}" for k, v in r["quality"].items()) or "no metric for this task"),
        "",
        *([f"Allocation search ({loss_name} on held-out calibration samples; lowest chosen):", "",
            "| candidate | predicted ms | held-out loss | |", "|---|---|---|---|",
            *(f"| {c['candidate']} | {c['predicted_ms']:.3f} | {c['held_out_loss']:.5g} | {'chosen' if c['chosen'] else ''} |"
              for c in r["allocation_search"]), ""] if r["allocation_search"] else []),
        "| group | kind | kept / total |",
        "|---|---|---|",
        *(f"| {g['name']} | {g['kind']} | {g['kept']} / {g['count']} |" for g in r["groups"]),
        "",
        f"Blocked dims: {len(r['blocked'])}. Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def plot_tradeoff(path: Path, explored: Sequence[Allocation], chosen: Sequence[tuple[str, Allocation]], dense_ms: float) -> None:
    """Predicted latency vs summed normalised loss of every allocation explored, chosen points marked."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([a.predicted_ms for a in explored], [a.loss for a in explored], "o-", ms=3, color="tab:blue", label="allocations explored")
    for label, a in chosen:
        ax.plot([a.predicted_ms], [a.loss], "*", ms=14, color="tab:red")
        ax.annotate(label, (a.predicted_ms, a.loss), textcoords="offset points", xytext=(6, 6))
    ax.axvline(dense_ms, ls="--", color="gray", label=f"dense {dense_ms:.2f} ms")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("summed normalised layer loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(folder: Path, *, cfg: JobConfig, task: Task, plan: StructurePlan, table: LatencyTable,
                 target: Target, explored: Sequence[Allocation],
                 outcomes: Sequence[Outcome], environment: Mapping[str, str], seconds: float) -> None:
    """Write report.json / report.md per model and tradeoff.png (plus a family summary) into ``folder``."""
    reports = []
    for o in outcomes:
        sub = folder if len(outcomes) == 1 else folder / o.label
        r = outcome_json(o, table=table, plan=plan, cfg=cfg, target=target, environment=environment)
        r["job_seconds"] = seconds
        write_text(sub / "report.json", json.dumps(r, indent=2))
        write_text(sub / "report.md", _markdown(r, o.label, task.loss_name))
        reports.append((o.label, r))
    plot_tradeoff(folder / "tradeoff.png", explored, [(o.label, o.allocation) for o in outcomes], table.dense_ms)
    if len(outcomes) > 1:
        summary = {"model": cfg.model, "job_seconds": seconds, "models": {label: {k: r[k] for k in
                   ("budget_ms", "dense_ms", "predicted_ms", "measured_ms", "meets_budget", "quality")} for label, r in reports}}
        write_text(folder / "report.json", json.dumps(summary, indent=2))
        write_text(folder / "report.md", "\n".join(_markdown(r, label, task.loss_name) for label, r in reports))
