#!/usr/bin/env python
"""Validate the additive latency model: predicted (table) vs measured (materialized model).

On a small randomly initialised Llama-shaped LM (latency does not depend on weight values) it
builds the latency table, allocates widths at many budgets across the whole range, materializes
each allocation, measures it end to end on the same target and prints predicted vs measured with
the mean absolute percentage error. The loss curves are synthetic (random convex curves per group)
because only the spread of width configurations matters here, not their quality.

How the table is built and predicts: docs/design.md, "Latency"; the same check on the real
models, through the job: ``tools/eval_budget.py`` (docs/results.md, "Latency prediction").

    python tools/bench_latency.py --layers 4 --hidden 256 --seq 128 --points 12 --clock thread
    python tools/bench_latency.py --layers 1 --hidden 32 --ffn 64 --seq 16 --points 2 --repeats 2 --iters 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from osscar_export import find_structures, materialize
from osscar_export.allocate import tradeoff
from osscar_export.latency.build import measure_latency
from osscar_export.latency.timing import MeasureSettings, measure
from osscar_export.models import CausalLMLogits
from osscar_export.targets import get_target
from osscar_export.widths import first_mask


def small_llama(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
    )
    return CausalLMLogits(LlamaForCausalLM(config)).eval()


def synthetic_curves(plan, table, seed: int) -> dict:
    """A random convex loss curve per group on the table's widths: (1 - k/n) ** p, p in [1, 3]."""
    rng = np.random.default_rng(seed)
    curves = {}
    for g in plan.groups:
        widths = table.widths(g.name)
        p = rng.uniform(1.0, 3.0)
        curves[g.name] = (widths, [(1 - k / g.count) ** p for k in widths])
    return curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--target", default="ort-cpu")
    ap.add_argument("--points", type=int, default=12, help="allocations across the budget range")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: CPU time of the calling thread, robust to other jobs on a shared machine")
    ap.add_argument("--cache-dir", default=None, help="latency table folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = small_llama(args.layers, args.hidden, args.heads, args.kv_heads, args.ffn, args.vocab)
    inputs = (torch.randint(0, args.vocab, (1, args.seq)),)
    target = get_target(args.target).for_inputs(inputs)
    settings = MeasureSettings(repeats=args.repeats, iters=args.iters, clock=args.clock)

    t0 = time.perf_counter()
    plan = find_structures(model, inputs)
    print(f"plan: {len(plan.groups)} groups: " + ", ".join(f"{g.name} ({g.kind} x{g.count})" for g in plan.groups))
    with tempfile.TemporaryDirectory() as tmp:
        table = measure_latency(plan, target, settings=settings, cache_dir=args.cache_dir or tmp, log=print)
    signatures = len(set(table.groups.values()))
    print(
        f"table: {signatures} distinct regions, dense {table.dense_ms:.3f} ms, fastest {table.fastest_ms} ms, "
        f"fit: base {table.base_ms:.3f} ms + {table.scale:.3f} x regions, "
        f"{len(table.noisy)} noisy entries, built in {time.perf_counter() - t0:.0f} s"
    )
    for sig in sorted(set(table.groups.values())):
        names = [g for g, s in table.groups.items() if s == sig]
        curve = table.times[sig]
        print(f"  {names[0]} (+{len(names) - 1} same): " + " ".join(f"{k}:{ms:.3f}" for k, ms in sorted(curve.items())))

    allocations = tradeoff(synthetic_curves(plan, table, args.seed), table, points=args.points)
    rows = []
    for a in allocations:
        masks = {g.name: first_mask(g.count, a.widths[g.name]) for g in plan.groups}
        small = materialize(model, plan, masks)
        measured = measure(target.compile(small, inputs), inputs, settings)
        rows.append((a.budget_ms, a.predicted_ms, measured.ms, measured.noisy))
    dense = measure(target.compile(plan.program, inputs), inputs, settings)

    print(f"\ndense measured again: {dense.ms:.3f} ms (table: {table.dense_ms:.3f} ms)")
    print(f"{'budget ms':>10} {'predicted':>10} {'measured':>10} {'error %':>8}")
    errors = []
    for budget, pred, meas, noisy in rows:
        err = 100 * (pred - meas) / meas
        errors.append(abs(err))
        print(f"{budget:10.3f} {pred:10.3f} {meas:10.3f} {err:+8.1f}{'  (noisy)' if noisy else ''}")
    print(f"\nMAPE {np.mean(errors):.1f}% over {len(rows)} allocations "
          f"(max {np.max(errors):.1f}%); measured range {min(r[2] for r in rows):.3f}-{max(r[2] for r in rows):.3f} ms")


if __name__ == "__main__":
    main()
