"""Benchmark the layer solver: seconds and loss of every method on synthetic correlated layers.

Each case draws calibration inputs ``X = (Z · s) A · c`` (N = 1.25 p samples, latent scales
``s_i = (1+i)^-0.7``, a random Gaussian mixing matrix A, log-normal per-input scales c) and zeroes
a few inputs (and, for d > 1, one whole group) so dead inputs are exercised. The Gram
``XᵀX`` is formed in float32, as calibration does, and solved in float64.

"reference" is the straightforward float64 implementation of the gradual algorithm (OSSCAR's
``OSSCAR_fastprune``: full p×p ``torch.linalg.inv``, downdated in place, 10 groups per step for
d = 1 and 2 for d > 1, final re-fit with a fresh inverse). The speed ratios the solver promises
are printed at the end. Timings use ``torch.set_num_threads(2)`` (``--threads``), one run each,
as wall seconds and process CPU seconds: on a shared machine compare ratios from one run, not
absolute seconds (CPU seconds suffer less from other processes). "reference" and "greedy" take
many minutes above p = 4096 and are skipped there unless ``--slow-max-p`` is raised.

Results: docs/results.md, "Solver"; the methods: docs/design.md, "Solver".

    python tools/bench_solver.py            # all cases (p = 8192 takes minutes)
    python tools/bench_solver.py --small    # skip p >= 4096
    python tools/bench_solver.py --p 576    # one small case (p = 576, 9 groups of 64)
    python tools/bench_solver.py --json     # also print one JSON line per measurement
    python tools/bench_solver.py --quality  # loss ÷ exact optimum on 200 small instances (n <= 16)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from osscar_export.solver import METHODS, prune_layer
from osscar_export.solver.exact import EXACT_MAX_SUPPORTS

CASES = [(1536, 576, 1), (576, 576, 64), (2304, 256, 9), (4096, 1024, 1), (8192, 2048, 1)]
KEEPS = (0.5, 0.25)
DAMP = 0.01


def make_case(p: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A correlated Gram (float32 accumulation, returned float64) and a dense weight (p, m)."""
    g = torch.Generator().manual_seed(seed)
    N = p + p // 4
    scales = (1.0 + torch.arange(p, dtype=torch.float32)) ** -0.7
    Z = torch.randn(N, p, generator=g) * scales
    A = torch.randn(p, p, generator=g) / math.sqrt(p)
    X = (Z @ A) * torch.exp(0.5 * torch.randn(p, generator=g))
    dead = torch.randperm(p, generator=g)[: max(2, p // 256)]
    X[:, dead] = 0
    if d > 1:
        X[:, d : 2 * d] = 0  # one whole dead group
    XtX = (X.T @ X).double()
    W = torch.randn(p, m, generator=g, dtype=torch.float64) / math.sqrt(p)
    return XtX, W


def reference_gradual(XtX: torch.Tensor, W: torch.Tensor, d: int, width: int, damp: float = DAMP) -> tuple[torch.Tensor, float]:
    """OSSCAR_fastprune as published, in float64 with explicit masks; returns (mask, loss)."""
    n = XtX.shape[0] // d
    H = XtX.double().clone()
    W0 = W.double().clone()
    dead_rows = torch.diagonal(H) == 0
    W0[dead_rows] = 0
    H.diagonal().add_(damp * float(torch.diagonal(H).mean()))
    G = H @ W0
    Hinv = torch.linalg.inv(H)
    Wc = W0.clone()
    pruned = dead_rows.reshape(n, d).all(dim=1)
    gone = pruned.repeat_interleave(d)
    Hinv[gone] = 0
    Hinv[:, gone] = 0
    n0 = int(pruned.sum())
    total = max(0, n - width - n0)
    r = 10 if d == 1 else 2
    steps = max(1, total // r) if total > 0 else 0
    sizes = [total // steps + (1 if i < total % steps else 0) for i in range(steps)]
    for k in sizes:
        if d == 1:
            score = (Wc * Wc).sum(dim=1) / (2 * (torch.diagonal(Hinv) + pruned.double()))
        else:
            blocks = Hinv.view(n, d, n, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1) + torch.diag_embed(pruned.double()[:, None].expand(n, d))
            Wg = Wc.view(n, d, -1)
            score = 0.5 * (Wg * torch.linalg.solve(blocks, Wg)).sum(dim=(1, 2))
        score = score + 1e20 * pruned.double()
        sel = torch.argsort(score)[:k]
        U = (sel[:, None] * d + torch.arange(d)).reshape(-1)
        M = torch.linalg.inv(Hinv[U][:, U])
        HU = Hinv[:, U]
        Wc -= HU @ (M @ Wc[U])
        Hinv -= HU @ (M @ Hinv[U])
        Hinv[U] = 0
        Hinv[:, U] = 0
        Wc[U] = 0
        pruned[sel] = True
    kept = ~pruned
    extra = width - int(kept.sum())
    if extra > 0:
        kept[pruned.nonzero().reshape(-1)[:extra]] = True
    rows = (kept.nonzero().reshape(-1)[:, None] * d + torch.arange(d)).reshape(-1)
    Wf = torch.zeros_like(W0)
    Wf[rows] = torch.linalg.inv(H[rows][:, rows]) @ G[rows]
    diff = Wf - W0
    return kept, 0.5 * float((diff * (H @ diff)).sum())


def quality(console: Console, instances: int = 200) -> None:
    """Loss ÷ exact optimum over small correlated instances (the draw of tests/test_solver.py)."""
    g = torch.Generator().manual_seed(123)
    methods = ("osscar", "osscar-fast", "greedy", "mp+", "mp")
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(instances):
        n = int(torch.randint(6, 17, (1,), generator=g))
        d = [1, 2, 4][i % 3]
        s = max(1, min(n - 1, round(n * (0.15 + 0.6 * float(torch.rand(1, generator=g))))))
        m = int(torch.randint(2, 9, (1,), generator=g))
        gx = torch.Generator().manual_seed(1000 + i)  # same instance as correlated_layer(seed=1000+i)
        p, N = n * d, int(n * d * 1.5)
        Z = torch.randn(N, p, generator=gx, dtype=torch.float64) * (1.0 + torch.arange(p, dtype=torch.float64)) ** -0.8
        A = torch.randn(p, p, generator=gx, dtype=torch.float64)
        X = (Z @ A) * torch.exp(0.5 * torch.randn(p, generator=gx, dtype=torch.float64))
        W = torch.randn(p, m, generator=gx, dtype=torch.float64)
        XtX = X.T @ X
        best = prune_layer(XtX, W, d, s, "exact").loss
        for meth in methods:
            ratios[meth].append(prune_layer(XtX, W, d, s, meth).loss / best)
    table = Table(title=f"loss ÷ exact optimum, {instances} instances, n in 6..16, d in 1,2,4")
    for col in ("method", "median", "mean", "p90", "max", "share optimal (≤1+1e-9)"):
        table.add_column(col, justify="right")
    for meth, r in ratios.items():
        r = sorted(r)
        table.add_row(
            meth, f"{statistics.median(r):.5f}", f"{statistics.fmean(r):.5f}", f"{r[int(0.9 * len(r))]:.5f}",
            f"{r[-1]:.5f}", f"{sum(x <= 1 + 1e-9 for x in r) / len(r):.3f}",
        )
    console.print(table)


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="skip the large cases (p >= 4096)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--p", default="", help="comma-separated p values to run (default: all cases)")
    ap.add_argument("--slow-max-p", type=int, default=4096, help="largest p for reference and greedy")
    ap.add_argument("--quality", action="store_true", help="only the small-instance quality statistics")
    ap.add_argument("--methods", default=",".join(("reference",) + METHODS), help="comma-separated subset")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    console = Console()
    if args.quality:
        quality(console)
        return
    table = Table(title=f"layer solver, float64, {args.threads} threads (seconds / loss / loss ÷ reference)")
    for col in ("p", "m", "d", "n", "width", "method", "wall s", "cpu s", "loss", "÷ ref"):
        table.add_column(col, justify="right")
    results: dict[tuple, tuple[float, float, float]] = {}
    for p, m, d in CASES:
        if (args.small and p >= 4096) or (args.p and str(p) not in args.p.split(",")):
            continue
        XtX, W = make_case(p, m, d)
        n = p // d
        for frac in KEEPS:
            s = round(frac * n)
            for method in methods:
                if method == "exact" and math.comb(n, s) > EXACT_MAX_SUPPORTS:
                    continue
                if method in ("reference", "greedy") and p > args.slow_max_p:
                    continue
                if method == "reference":
                    sec, cpu, (_, loss) = _timed(lambda: reference_gradual(XtX, W, d, s))
                else:
                    sec, cpu, sol = _timed(lambda: prune_layer(XtX, W, group_size=d, width=s, method=method, damp=DAMP))
                    loss = sol.loss
                results[(p, m, d, s, method)] = (sec, cpu, loss)
                ref = results.get((p, m, d, s, "reference"))
                rel = f"{loss / ref[2]:.5f}" if ref and ref[2] > 0 else "-"
                table.add_row(str(p), str(m), str(d), str(n), str(s), method, f"{sec:.3f}", f"{cpu:.3f}", f"{loss:.6g}", rel)
                record = {"p": p, "m": m, "d": d, "n": n, "width": s, "method": method, "seconds": sec, "cpu_seconds": cpu, "loss": loss}
                if args.json:
                    print(json.dumps(record), flush=True)
            table.add_section()
    console.print(table)

    def ratio(p, m, d, s, slow, fast):
        a, b = results.get((p, m, d, s, slow)), results.get((p, m, d, s, fast))
        if a and b:
            console.print(
                f"p={p} m={m} d={d} width={s}: {slow} / {fast} wall {a[0] / b[0]:.2f}x, cpu {a[1] / b[1]:.2f}x; "
                f"loss {fast} / {slow} = {b[2] / a[2]:.5f}"
            )
    console.print("promised: reference / osscar-fast >= 8x at p=4096 width=2048; greedy / osscar-fast >= 5x at p=1536 width=768; loss within 0.5%")
    ratio(4096, 1024, 1, 2048, "reference", "osscar-fast")
    ratio(1536, 576, 1, 768, "greedy", "osscar-fast")
    for p, m, d in CASES:
        for frac in KEEPS:
            s = round(frac * (p // d))
            if (p, m, d) != (4096, 1024, 1) or s != 2048:
                ratio(p, m, d, s, "reference", "osscar-fast")


if __name__ == "__main__":
    main()
