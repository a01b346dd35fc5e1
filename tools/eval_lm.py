#!/usr/bin/env python
"""Perplexity of pruned causal LMs on several text sources, against the dense model
(docs/results.md, "Quality at a budget").

Each OUT is the output folder of one `osscar-export` job (single budget: `model.pt2` and
`report.json` at its top). The sources are the held-out documents of the built-in corpora
(every 5th one, never calibrated on): Wikipedia lead sections, BBC News, and the Python standard
library's docstrings, a domain left out of every calibration mix the ablation uses. Windows are
consecutive and as long as the job's captured sequence, so every model is scored on the same tokens.

    python tools/eval_lm.py WORK/default WORK/intercept --model smollm2-135m --windows 32
    python tools/eval_lm.py WORK/* --json WORK/ablation.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from osscar_export import data, evaluate
from osscar_export.atomic import write_text
from osscar_export.models import load_model

SOURCES = ("wiki-summaries", "bbc-news", "python-docs")


def perplexities(model: torch.nn.Module, windows: dict[str, list]) -> dict[str, float]:
    return {source: evaluate.perplexity(model, batches) for source, batches in windows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+", type=Path, help="output folders of osscar-export jobs")
    parser.add_argument("--model", default="smollm2-135m", help="the dense model the jobs pruned")
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows per source")
    parser.add_argument("--seq-len", type=int, default=128, help="the jobs' --seq-len (their model.pt2 is captured at it)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    reports = {out: json.loads((out / "report.json").read_text()) for out in args.outs}
    loaded = load_model(args.model, seq_len=args.seq_len)
    seq = loaded.example_inputs[0].shape[1]
    windows = {s: data.eval_text_windows(s, loaded.tokenizer, seq, args.windows) for s in SOURCES}
    rows = [{"name": "dense", **perplexities(loaded.model, windows), "speedup": 1.0, "job_seconds": None}]
    for out, report in reports.items():
        model = torch.export.load(out / "model.pt2").module()
        rows.append({"name": out.name, **perplexities(model, windows), "speedup": report["dense_ms"] / report["measured_ms"],
                     "job_seconds": report.get("job_seconds")})

    dense = rows[0]
    table = Table(title=f"{args.model}: perplexity on {args.windows} held-out windows of {seq} tokens per source "
                        "(× dense in brackets)")
    for column in ("job", *SOURCES, "measured speedup", "job time"):
        table.add_column(column, justify="left" if column == "job" else "right")
    for row in rows:
        minutes = "" if row["job_seconds"] is None else f"{row['job_seconds'] / 60:.1f} min"
        table.add_row(row["name"], *(f"{row[s]:.1f} ({row[s] / dense[s]:.2f}×)" for s in SOURCES),
                      f"{row['speedup']:.2f}×", minutes)
    Console().print(table)
    if args.json:
        write_text(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
