"""The job's evidence: report.json (machine-readable), report.md (for people), tradeoff.png
(docs/design.md, "Pipeline").

report.json is strict JSON (no NaN or Infinity, which most parsers refuse) and follows
``REPORT_SCHEMA`` (one model) or ``SUMMARY_SCHEMA`` (a family's summary), JSON Schemas that the
tests check real reports against, so a consumer can rely on every field listed there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from osscar_export.allocate import Allocation  # noqa: E402
from osscar_export.atomic import atomic_path, write_text  # noqa: E402
from osscar_export.job import BUDGET_TOLERANCE, JobConfig, Outcome, Stages  # noqa: E402
from osscar_export.latency.table import LatencyTable  # noqa: E402
from osscar_export.plan import StructurePlan  # noqa: E402
from osscar_export.targets import Target  # noqa: E402
from osscar_export.tasks import Task  # noqa: E402


_MS = {"type": "number", "exclusiveMinimum": 0}
_MS_OR_NULL = {"anyOf": [_MS, {"type": "null"}]}
_NUMBER_OR_NULL = {"type": ["number", "null"]}  # null: a value that was not finite
_COUNT = {"type": "integer", "minimum": 0}


def _object(properties: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A JSON Schema object requiring exactly ``properties``."""
    return {"type": "object", "properties": dict(properties), "required": list(properties), "additionalProperties": False, **extra}


REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "osscar-export report.json (one model)",
    **_object({
        "model": {"type": "string"},
        "budget_ms": _MS,
        "dense_ms": _MS,
        "predicted_ms": _MS,
        "measured_ms": _MS,
        "measurement_noisy": {"type": "boolean"},
        "meets_budget": {"type": "boolean"},
        "budget_tolerance": {"type": "number", "minimum": 0},
        "budget_missed": {"type": ["string", "null"]},  # why, when meets_budget is false
        "prediction_error": {"type": "number"},
        "quality": {"type": "object", "additionalProperties": _NUMBER_OR_NULL},
        "method": {"type": "string"},
        "intercept": {"type": "boolean"},
        "recovery": {"type": ["object", "null"]},  # recover.Recovery and the one-shot model's quality; null: none
        "mode": {"enum": ["sequential", "dense"]},
        "mode_losses": {"type": "object", "additionalProperties": _NUMBER_OR_NULL},
        "calibration": _object({
            "source": {"type": "string"},
            "requested": {"type": "integer", "minimum": 1},
            "samples": {"type": "integer", "minimum": 1},
            "held_out_samples": _COUNT,
            "seed": {"type": "integer"},
        }),
        "target": {"type": "object", "required": ["name", "threads"]},
        "engine": _object({"engine": {"enum": ["local", "ray"]}, "workers": {"type": "integer", "minimum": 1},
                           "address": {"type": ["string", "null"]}}),
        "measurement": {"type": "object", "required": ["clock"]},
        "groups": {"type": "array", "minItems": 1, "items": _object({
            "name": {"type": "string"},
            "kind": {"type": "string"},
            "count": {"type": "integer", "minimum": 1},
            "kept": _COUNT,
            "allocated": _COUNT,
            "predicted_ms": _MS_OR_NULL,
            "layer_loss": {"type": "object", "additionalProperties": _NUMBER_OR_NULL},
        })},
        "blocked": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
        "parity": {"type": "object", "additionalProperties": _object({"max_abs_diff": {"type": "number", "minimum": 0},
                                                                      "runtime": {"type": "string"}})},
        "allocation_search": {"type": "array", "items": _object({
            "candidate": {"type": "string"},
            "predicted_ms": _MS,
            "normalised_loss": {"type": "number"},
            "held_out_loss": _NUMBER_OR_NULL,
            "chosen": {"type": "boolean"},
        })},
        "attempts": {"type": "array", "minItems": 1, "items": _object({
            "predicted_ms": _MS,
            "measured_ms": _MS,
            "timings_ms": {"type": "array", "minItems": 1, "maxItems": 2, "items": _MS},
            "timed_runs": {"type": "array", "minItems": 1, "maxItems": 2, "items": _COUNT},
            "meets_budget": {"type": "boolean"},
            "kept": {"type": "boolean"},
        })},
        "prune_seconds": {"type": "number", "minimum": 0},
        "versions": {"type": "object", "additionalProperties": {"type": "string"}},
        "job_seconds": {"type": "number", "minimum": 0},
        "stage_seconds": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        "stage_peak_rss_mb": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
    }),
}

# what only a model built for a latency budget has: a budget, the latencies and the search
BUDGET_FIELDS = ("budget_ms", "dense_ms", "predicted_ms", "measured_ms", "measurement_noisy", "meets_budget",
                 "budget_tolerance", "budget_missed", "prediction_error", "measurement", "allocation_search", "attempts")
FIXED_REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "osscar-export report.json (one model pruned to fixed fractions: --keep-fraction)",
    **_object({
        **{k: v for k, v in REPORT_SCHEMA["properties"].items() if k not in BUDGET_FIELDS},
        "keep_fraction": {"type": "object", "minProperties": 1,
                          "additionalProperties": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
    }),
}

SUMMARY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "osscar-export report.json (a family's summary; each model's own report is in its subfolder)",
    **_object({
        "model": {"type": "string"},
        "job_seconds": {"type": "number", "minimum": 0},
        "stage_seconds": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        "budgets_met": {"type": "boolean"},
        "models": {"type": "object", "minProperties": 2, "additionalProperties": _object(
            {k: REPORT_SCHEMA["properties"][k] for k in
             ("budget_ms", "dense_ms", "predicted_ms", "measured_ms", "meets_budget", "budget_missed", "quality")})},
    }),
}


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (an overflowed perplexity, say) replaced by None, so
    that report.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(report: Mapping[str, Any]) -> str:
    return json.dumps(_finite(report), indent=2, allow_nan=False)


def _missed(o: Outcome) -> str | None:
    """Why a model does not meet its budget, for the report and the command's message; None if it does."""
    if o.meets_budget:
        return None
    return (f"measured {o.measured_ms:.3f} ms, {100 * (o.measured_ms / o.budget_ms - 1):.1f}% over the budget "
            f"{o.budget_ms:.3f} ms (tolerance {100 * BUDGET_TOLERANCE:g}%); the fastest of {len(o.attempts)} model(s) built is kept")


def outcome_json(o: Outcome, *, table: LatencyTable | None, plan: StructurePlan, cfg: JobConfig, target: Target,
                 calibration_samples: int, held_out_samples: int, environment: Mapping[str, str]) -> dict[str, Any]:
    """One model's report: per-group decisions, quality and parity, and for a budget the three
    latencies and the search (``REPORT_SCHEMA``; ``FIXED_REPORT_SCHEMA`` with ``--keep-fraction``)."""
    groups = []
    for g in plan.groups:
        kept = int(o.result.masks[g.name].sum()) if g.name in o.result.masks else g.count
        width = o.allocation.widths.get(g.name, g.count) if o.allocation is not None else kept
        groups.append({
            "name": g.name,
            "kind": g.kind,
            "count": g.count,
            "kept": kept,
            "allocated": width,
            "predicted_ms": table.ms(g.name, width) if table is not None and g.name in table.groups else None,
            "layer_loss": {c.weight: o.result.layer_losses.get(c.weight) for c in g.consumers},
        })
    report = {
        "model": cfg.model,
        "quality": o.quality,
        "method": cfg.method,
        "intercept": cfg.intercept,
        "recovery": o.recovery,
        "mode": o.mode,
        "mode_losses": o.mode_losses,
        # what was asked for, and what the Grams and the held-out scoring really used (whole
        # batches; a tensor file gives every batch it holds)
        "calibration": {"source": cfg.calib or "default", "requested": cfg.n_calib, "samples": calibration_samples,
                        "held_out_samples": held_out_samples, "seed": cfg.seed},
        "target": target.settings(),
        "engine": cfg.engine.describe(),
        "groups": groups,
        "blocked": [list(b) for b in plan.blocked],
        "parity": {k: {"max_abs_diff": r.max_abs_diff, "runtime": r.runtime} for k, r in o.artifacts.items()},
        "prune_seconds": o.result.seconds,
        "versions": dict(environment),
    }
    if o.budget_ms is None:
        return {**report, "keep_fraction": dict(cfg.keep_fraction)}
    return {
        **report,
        "budget_ms": o.budget_ms,
        "dense_ms": table.dense_ms,
        "predicted_ms": o.allocation.predicted_ms,
        "measured_ms": o.measured_ms,
        "measurement_noisy": o.noisy,
        "meets_budget": o.meets_budget,
        "budget_tolerance": BUDGET_TOLERANCE,
        "budget_missed": _missed(o),
        "prediction_error": (o.allocation.predicted_ms - o.measured_ms) / o.measured_ms,
        "measurement": table.measurement,
        "allocation_search": [
            {"candidate": c.name, "predicted_ms": c.allocation.predicted_ms, "normalised_loss": c.allocation.loss,
             "held_out_loss": c.score, "chosen": c.allocation is o.allocation}
            for c in o.candidates
        ],
        "attempts": o.attempts,
    }


def _budget_lines(r: Mapping[str, Any]) -> list[str]:
    """The markdown report's latency part: the budget, the latencies, whether it was met."""
    return [
        "| | ms |",
        "|---|---|",
        f"| budget | {r['budget_ms']:.3f} |",
        f"| dense (table) | {r['dense_ms']:.3f} |",
        f"| predicted | {r['predicted_ms']:.3f} |",
        f"| measured | {r['measured_ms']:.3f}{' (noisy)' if r['measurement_noisy'] else ''} |",
        "",
        (f"Budget met ({100 * (r['measured_ms'] / r['budget_ms'] - 1):+.1f}%, tolerance {100 * r['budget_tolerance']:g}%); "
         if r["meets_budget"] else f"**BUDGET MISSED**: {r['budget_missed']}. ")
        + f"Prediction error {100 * r['prediction_error']:+.1f}%; {len(r['attempts'])} model(s) built.",
        f"Method {r['method']} ({r['mode']}), target {r['target']['name']} with {r['target']['threads']} thread(s), "
        f"{r['measurement']['clock']} clock.",
    ]


def _markdown(r: Mapping[str, Any], label: str, loss_name: str) -> str:
    fixed = "keep_fraction" in r
    lines = [
        f"# osscar-export: {r['model']} ({label})",
        "",
        *([f"Pruned to fixed fractions ({', '.join(f'{k} {v:g}' for k, v in r['keep_fraction'].items())}) with "
           f"{r['method']} ({r['mode']}): no latency budget, nothing timed."] if fixed else _budget_lines(r)),
        "",
        "Quality (held-out data): " + (", ".join(f"{k} = {v:.4g}" for k, v in r["quality"].items()) or "no metric for this task"),
        "",
        *([f"Allocation search ({loss_name} on held-out calibration samples; lowest chosen):", "",
            "| candidate | predicted ms | held-out loss | |", "|---|---|---|---|",
            *(f"| {c['candidate']} | {c['predicted_ms']:.3f} | {c['held_out_loss']:.5g} | {'chosen' if c['chosen'] else ''} |"
              for c in r["allocation_search"]), ""] if r.get("allocation_search") else []),
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


def write_report(folder: Path, *, cfg: JobConfig, task: Task, plan: StructurePlan, table: LatencyTable | None,
                 target: Target, explored: Sequence[Allocation], outcomes: Sequence[Outcome],
                 calibration_samples: int, held_out_samples: int, environment: Mapping[str, str], seconds: float,
                 stages: Stages) -> None:
    """Write report.json / report.md per model and tradeoff.png (plus a family summary) into
    ``folder``; without a latency table (``--keep-fraction``) there is no tradeoff.png."""
    reports = []
    for o in outcomes:
        sub = folder if len(outcomes) == 1 else folder / o.label
        r = outcome_json(o, table=table, plan=plan, cfg=cfg, target=target, calibration_samples=calibration_samples,
                         held_out_samples=held_out_samples, environment=environment)
        r["job_seconds"] = seconds
        r["stage_seconds"] = dict(stages.seconds)
        r["stage_peak_rss_mb"] = dict(stages.peak_rss_mb)
        write_text(sub / "report.json", _dumps(r))
        write_text(sub / "report.md", _markdown(r, o.label, task.loss_name))
        reports.append((o.label, r))
    if table is not None:  # fixed fractions have no latency table, so no trade-off to plot
        plot_tradeoff(folder / "tradeoff.png", explored, [(o.label, o.allocation) for o in outcomes], table.dense_ms)
    if len(outcomes) > 1:
        summary = {"model": cfg.model, "job_seconds": seconds, "stage_seconds": dict(stages.seconds), "budgets_met": all(o.meets_budget for o in outcomes),
                   "models": {label: {k: r[k] for k in SUMMARY_SCHEMA["properties"]["models"]["additionalProperties"]["properties"]}
                              for label, r in reports}}
        write_text(folder / "report.json", _dumps(summary))
        write_text(folder / "report.md", "\n".join(_markdown(r, label, task.loss_name) for label, r in reports))
