"""The job's on-disk caches, keyed in one place (docs/design.md, "Caches").

Every cached value (a run's folder, Gram matrices, error curves, latency tables) is named by
``key(kind, ...)``: a hash of the content it was computed from *and* ``VERSIONS[kind]``, the
version of the code that computes it. Bump a kind's version whenever its code changes what it
produces; older entries then miss and are recomputed instead of being served stale. Dequantised
models keep a readable folder name that carries their version. Values are written atomically,
so an interrupted run resumes from whatever was finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from osscar_export.atomic import atomic_path
from osscar_export.passes.base import Grams
from osscar_export.passes.calibrate import calibrate
from osscar_export.plan import StructurePlan

# Bump on any change to how the kind's value is computed (see the module docstring).
VERSIONS: dict[str, int] = {
    "run": 1,
    "grams": 1,
    "curves": 1,
    "latency-table": 1,
    "dequantised": 1,
}

CurveArrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # widths, losses, masks (widths × count)


def root() -> Path:
    """The cache folder: ``$OSSCAR_CACHE``, else ``~/.cache/osscar-export``."""
    return Path(os.environ.get("OSSCAR_CACHE", Path.home() / ".cache" / "osscar-export"))


def digest(*parts: Any) -> str:
    """sha256 hex of ``parts``: tensors by dtype, shape and bytes, everything else as sorted JSON."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str, separators=(",", ":")).encode())
    return h.hexdigest()


def key(kind: str, *parts: Any, length: int = 20) -> str:
    """The cache key of a ``kind`` value computed from ``parts`` by the current code."""
    if kind not in VERSIONS:
        raise KeyError(f"unknown cache kind {kind!r}; one of {sorted(VERSIONS)}")
    return digest(kind, VERSIONS[kind], *parts)[:length]


def run_dir(*inputs: Any) -> Path:
    """The folder of one job's Grams and error curves, named by what decides its calibration
    data (``inputs``: the model spec, its input shape, the calibration source, count and seed)."""
    folder = root() / "runs" / key("run", *inputs)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def gram_key(plan: StructurePlan, batches: Sequence[tuple]) -> str:
    """What the Grams depend on: the graph's code, its weights (a retrained checkpoint of the
    same architecture must not re-use them) and every calibration tensor."""
    program = plan.program
    weights = {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}}
    names = sorted(weights)
    return key("grams", program.graph_module.code, names, *(weights[n] for n in names), *(t for b in batches for t in b))


def grams(plan: StructurePlan, batches: Sequence[tuple], folder: Path, log: Callable[[str], None]) -> Grams:
    """The dense Gram matrices of ``batches``: loaded from ``folder`` when ``gram_key`` matches,
    else computed by ``calibrate`` and saved there."""
    path = folder / f"grams-{gram_key(plan, batches)}.pt"
    if path.exists():
        log(f"re-using Gram matrices from {path}")
        saved = torch.load(path, weights_only=True)
        return Grams(saved["xtx"], saved["rows"], [tuple(b) for b in saved["blocked"]])
    result = calibrate(plan, batches)
    with atomic_path(path) as tmp:
        torch.save({"xtx": result.xtx, "rows": result.rows, "blocked": [list(b) for b in result.blocked]}, tmp)
    return result


def error_curve(folder: str | Path, group: str, settings: Mapping[str, Any], tensors: Sequence[torch.Tensor],
                compute: Callable[[], CurveArrays]) -> CurveArrays:
    """One group's error curve: loaded from its own ``.npz`` in ``folder`` when the problem
    (``settings`` and ``tensors``) matches, else ``compute()``-d and saved there."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", group)
    path = Path(folder) / f"{name}-{key('curves', settings, *tensors, length=16)}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["widths"], z["losses"], z["masks"]
    result = compute()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, widths=result[0], losses=result[1], masks=result[2])
    return result


def dequantised_dir(name: str) -> Path:
    """The folder of a model dequantised from the file ``name`` names: readable, and carrying
    the "dequantised" version so a changed conversion never re-uses an old folder."""
    return root() / f"{name}-dequantised-v{VERSIONS['dequantised']}"
