"""Run find_structures over every torchvision classification model and print what it finds.

    python tools/coverage.py                 # all models, randomly initialised
    python tools/coverage.py resnet50 vit_b_16 --meta

Per model: groups, structures, blocked dims, capture and analysis seconds; then a summary line
(models with at least one group / total, crashes). A crash (capture or analysis raising, or an
op rule failing on its arguments) is a bug in the op table: it is caught per model and reported.
Models are built with 10 classes at a small input size, falling back to 224 for models whose
architecture needs more. ``--meta`` builds models on the meta device (no weights allocated): the
analysis reads only shapes, so the groups are the same. Results: docs/results.md, "Structure
pass"; the analysis and its op table: docs/design.md, "Structures" and "Op rules". The exit
status is 1 when any model crashed.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torchvision

from osscar_export import capture, find_structures

SIZES = (64, 224)


def analyse(name: str, meta: bool) -> dict:
    """Capture ``name`` at the smallest size it accepts and run the pass; never raises."""
    row: dict = {"model": name}
    device = torch.device("meta") if meta else torch.device("cpu")
    try:
        try:
            with device:
                model = torchvision.models.get_model(name, num_classes=10)
        except NotImplementedError:  # initialisers that copy data (RegNet) need real weights
            device = torch.device("cpu")
            model = torchvision.models.get_model(name, num_classes=10)
    except Exception as exc:  # a model we cannot even build is reported, not fatal
        return {**row, "crash": f"build: {type(exc).__name__}: {exc}"}
    ep, errors = None, []
    t0 = time.perf_counter()
    for size in SIZES:
        try:
            ep = capture(model, (torch.randn(1, 3, size, size, device=device),))
            row["size"] = size
            break
        except Exception as exc:
            errors.append(f"{size}: {str(exc)[:160]}")
    row["capture_s"] = time.perf_counter() - t0
    del model
    if ep is None:
        return {**row, "crash": "capture: " + " | ".join(errors)}
    t0 = time.perf_counter()
    try:
        plan = find_structures(ep)
    except Exception as exc:
        return {**row, "crash": f"find_structures: {type(exc).__name__}: {exc}"}
    row["pass_s"] = time.perf_counter() - t0
    rule_errors = [r for w, r in plan.blocked if w == "op rule"]
    row.update(
        groups=len(plan.groups),
        structures=plan.structures,
        blocked=len(plan.blocked) - len(rule_errors),
        kinds=dict(Counter(g.kind for g in plan.groups)),
    )
    if rule_errors:
        row["crash"] = f"{len(rule_errors)} op rule error(s): {rule_errors[0]}"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="torchvision model names (default: all classifiers)")
    parser.add_argument("--meta", action="store_true", help="build models on the meta device (no weights)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows = []
    print(f"{'model':<22} {'size':>4} {'groups':>6} {'structs':>8} {'blocked':>7} {'capture_s':>9} {'pass_s':>7}  kinds / crash")
    for name in names:
        row = analyse(name, args.meta)
        rows.append(row)
        tail = row.get("crash") or " ".join(f"{k}:{v}" for k, v in sorted(row["kinds"].items()))
        print(
            f"{name:<22} {row.get('size', '-'):>4} {row.get('groups', '-'):>6} {row.get('structures', '-'):>8} "
            f"{row.get('blocked', '-'):>7} {row.get('capture_s', 0):>9.1f} {row.get('pass_s', 0):>7.2f}  {tail}",
            flush=True,
        )
    with_groups = sum(1 for r in rows if r.get("groups", 0) > 0)
    crashes = [r["model"] for r in rows if "crash" in r]
    slowest = max((r.get("pass_s", 0.0), r["model"]) for r in rows)
    print(
        f"SUMMARY: {with_groups}/{len(rows)} models with >=1 group, {len(crashes)} crashes"
        + (f" ({', '.join(crashes)})" if crashes else "")
        + f", slowest pass {slowest[0]:.2f}s ({slowest[1]})"
    )
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
