#!/usr/bin/env python
"""Wall time of the error curves in this process against Ray workers (``--workers``), and that
they agree. The job's own Gram matrices are used (calibrated, or read from the job's cache), and
every curve is solved afresh (no curve cache). Results: docs/results.md, "Scale".

    python tools/bench_fanout.py --model smollm2-135m --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from osscar_export import cache
from osscar_export.fanout import Engine
from osscar_export.job import JobConfig, calibration_data
from osscar_export.models import load_model
from osscar_export.passes.structures import find_structures
from osscar_export.prune import error_curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--levels", type=int, default=16, help="widths per group, as the job's --levels")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="engines to time: 1 is this process")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console()
    cfg = JobConfig(model=args.model, levels=args.levels)
    loaded = load_model(cfg.model, seq_len=cfg.seq_len, batch=cfg.batch, image_size=cfg.image_size)
    plan = find_structures(loaded.model, loaded.example_inputs)
    data = calibration_data(cfg, loaded)
    grams = cache.grams(plan, data.calibration, data.work, console.log)
    table = Table(title=f"error curves of {args.model}: {len(plan.groups)} groups, {args.levels} widths each")
    for col in ("engine", "workers", "start s", "curves s", "max relative difference"):
        table.add_column(col)
    reference = None
    for workers in args.workers:
        engine = Engine(workers)
        t0 = time.perf_counter()
        if engine.name == "ray":
            import ray

            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter() - t0
        t0 = time.perf_counter()
        curves = error_curves(plan, grams, args.levels, engine=engine, progress=False)
        seconds = time.perf_counter() - t0
        if engine.name == "ray":
            ray.shutdown()
        reference = reference or curves
        diff = max(float(np.max(np.abs(curves[g][1] - reference[g][1]) / np.maximum(np.abs(reference[g][1]), 1e-30)))
                   for g in reference)
        table.add_row(engine.name, str(workers), f"{started:.1f}", f"{seconds:.1f}", f"{diff:.1e}")
        console.log(f"{workers} worker(s): {seconds:.1f} s")
    console.print(table)


if __name__ == "__main__":
    main()
