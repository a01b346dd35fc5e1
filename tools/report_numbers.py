#!/usr/bin/env python
"""Print the numbers of a job's report.json that the seed decides (widths, losses, quality), not
the timings, so two runs of the same command can be compared: before and after a refactor, or
on two machines with the same latency table. Every report.json under the folder is printed
(a family has one per budget and a summary); the report's fields: docs/design.md, "Pipeline".

    osscar-export MODEL --speedup 1.5 --out OUT && python tools/report_numbers.py OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

VOLATILE = {"measured_ms", "measurement_noisy", "meets_budget", "budget_missed", "budgets_met", "prediction_error",
            "attempts", "prune_seconds", "job_seconds", "versions", "parity", "target", "measurement"}


def numbers(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` without its timings, with floats rounded to 6 significant digits."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return float(f"{x:.6g}")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in sorted(x.items()) if k not in VOLATILE}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="a job's output folder")
    args = p.parse_args(argv)
    reports = sorted(args.out.glob("**/report.json"))
    if not reports:
        p.error(f"no report.json under {args.out}")
    print(json.dumps({str(r.relative_to(args.out)): numbers(json.loads(r.read_text())) for r in reports}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
