"""The job's on-disk caches, keyed in one place (docs/design.md, "Caches").

Every cached value (a run's folder, Gram matrices, error curves, latency tables, the allocation
search's end-to-end scores) is named by
``key(kind, ...)``: a hash of the content it was computed from *and* ``VERSIONS[kind]``, the
version of the code that computes it. Bump a kind's version whenever its code changes what it
produces; older entries then miss and are recomputed instead of being served stale. Dequantised
models keep a readable folder name that carries their version. Values are written atomically,
so an interrupted run resumes from whatever was finished.

A Gram or error-curve file also stores the ``digest`` of its content (which covers every array's
shape and dtype), and its arrays must have the shapes the problem asks for. A file that fails
either check, or cannot be read, would poison every model built from it or fail every re-run the
same way: it is reported (a warning naming it), deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from osscar_export.atomic import atomic_path, write_text
from osscar_export.passes.base import Grams
from osscar_export.passes.calibrate import calibrate
from osscar_export.plan import StructurePlan

# Bump on any change to how the kind's value is computed (see the module docstring).
VERSIONS: dict[str, int] = {
    "run": 1,
    "grams": 3,  # 2: files carry a digest of their content; 3: and the column sums
    "curves": 2,  # 2: files carry a digest of their content
    "latency-table": 1,
    "dequantised": 1,
    "scores": 2,  # 2: the re-fit has an intercept
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


def tables_dir() -> Path:
    """The user's folder of measured latency tables (``$OSSCAR_CACHE/latency_tables``)."""
    return root() / "latency_tables"


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


def _discard(path: Path, error: Exception) -> None:
    """Warn that the cached ``path`` is unusable and why, and delete it so it is recomputed."""
    why = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    warnings.warn(f"cache file {path} is unusable ({why}): deleted, recomputing it", stacklevel=3)
    path.unlink(missing_ok=True)


def _check_shapes(arrays: Mapping[str, Any], expected: Mapping[str, Sequence[int]]) -> None:
    """ValueError unless ``arrays`` holds exactly the ``expected`` names with those shapes."""
    if set(arrays) != set(expected):
        raise ValueError(f"it holds {sorted(arrays)[:6]}, expected {sorted(expected)[:6]}")
    for name, want in expected.items():
        if tuple(arrays[name].shape) != tuple(want):
            raise ValueError(f"{name} has shape {tuple(arrays[name].shape)}, expected {tuple(want)}")


def _gram_digest(grams: Grams, blocked: Sequence[Sequence[str]]) -> str:
    names = sorted(grams.xtx)
    return digest(names, *(grams.xtx[n] for n in names), sorted(grams.xsum), *(grams.xsum[n] for n in sorted(grams.xsum)),
                  dict(grams.rows), [list(b) for b in blocked])


def gram_shapes(plan: StructurePlan, blocked: Sequence[Sequence[str]]) -> dict[str, tuple[int, int]]:
    """``p x p`` per full consumer of every group not ``blocked`` (rows as ``Consumer.input_major``):
    what ``calibrate`` produces for this plan, so Grams of another model are refused."""
    program = plan.program
    weights = {**program.state_dict, **program.constants}
    skip = {b[0] for b in blocked}
    shapes = {}
    for g in plan.groups:
        for c in g.consumers:
            if c.full and g.name not in skip:
                p = c.input_major(weights[c.weight]).shape[0]
                shapes[c.weight] = (p, p)
    return shapes


def _load_grams(path: Path, plan: StructurePlan) -> Grams:
    """The Grams stored at ``path``; ValueError (or the loader's error) when anything is off."""
    saved = torch.load(path, weights_only=True)
    if not (isinstance(saved, dict) and set(saved) == {"xtx", "rows", "xsum", "blocked", "digest"}):
        raise ValueError("not a Gram file of this osscar-export")
    grams = Grams(saved["xtx"], saved["rows"], saved["xsum"], [tuple(b) for b in saved["blocked"]])
    if saved["digest"] != _gram_digest(grams, saved["blocked"]):
        raise ValueError("its content does not match its digest")
    shapes = gram_shapes(plan, saved["blocked"])
    _check_shapes(grams.xtx, shapes)
    _check_shapes(grams.xsum, {name: shape[:1] for name, shape in shapes.items()})
    return grams


def gram_path(plan: StructurePlan, batches: Sequence[tuple], folder: Path) -> Path:
    """Where the Gram matrices of ``batches`` are cached in ``folder``."""
    return folder / f"grams-{gram_key(plan, batches)}.pt"


def grams(plan: StructurePlan, batches: Sequence[tuple], folder: Path, log: Callable[[str], None]) -> Grams:
    """The dense Gram matrices of ``batches``: loaded from ``folder`` when ``gram_key`` matches
    and the file passes its checks (else it is discarded, see the module docstring), otherwise
    computed by ``calibrate`` and saved there."""
    path = gram_path(plan, batches, folder)
    if path.exists():
        try:
            loaded = _load_grams(path, plan)
            log(f"re-using Gram matrices from {path}")
            return loaded
        except Exception as e:  # any defect of a cache file means: compute it again
            _discard(path, e)
    result = calibrate(plan, batches)
    blocked = [list(b) for b in result.blocked]
    with atomic_path(path) as tmp:
        torch.save({"xtx": result.xtx, "rows": result.rows, "xsum": result.xsum, "blocked": blocked,
                    "digest": _gram_digest(result, blocked)}, tmp)
    return result


def scores_path(plan: StructurePlan, calibration: Sequence[tuple], held_out: Sequence[tuple], task: str,
                widths: Mapping[str, Sequence[int]], folder: Path, intercept: bool) -> Path:
    """Where the allocation search's end-to-end scores are cached: they depend on what the Grams
    do (``gram_key``), the curves' width grids (their supports), whether the re-fit has an
    intercept, the scored batches and the task."""
    grids = sorted((g, [int(w) for w in ws]) for g, ws in widths.items())
    name = key("scores", gram_key(plan, calibration), task, grids, intercept, *(t for b in held_out for t in b))
    return folder / f"scores-{name}.json"


def load_scores(path: Path) -> dict[str, float]:
    """The scores saved at ``path`` (none when it does not exist; an unusable file is discarded)."""
    if not path.exists():
        return {}
    try:
        scores = json.loads(path.read_text())
        if not isinstance(scores, dict) or not all(isinstance(v, float) and np.isfinite(v) for v in scores.values()):
            raise ValueError("not a mapping of finite scores")
        return scores
    except (OSError, UnicodeDecodeError, ValueError) as e:
        _discard(path, e)
        return {}


def save_scores(path: Path, scores: Mapping[str, float]) -> None:
    write_text(path, json.dumps(dict(scores), sort_keys=True))


def _curve_digest(arrays: CurveArrays) -> str:
    return digest(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))


def _load_curve(path: Path, shapes: Mapping[str, Sequence[int]]) -> CurveArrays:
    """The curve stored at ``path``; ValueError (or the loader's error) when anything is off."""
    with np.load(path) as z:
        stored = {name: z[name] for name in z.files}
    saved = stored.pop("digest", None)
    _check_shapes(stored, shapes)
    arrays = (stored["widths"], stored["losses"], stored["masks"])
    if saved is None or str(saved) != _curve_digest(arrays):
        raise ValueError("its content does not match its digest")
    return arrays


def file_stem(group: str) -> str:
    """A group's name as the start of its error-curve file names."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", group)


def curve_path(folder: str | Path, group: str, settings: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> Path:
    """Where one group's error curve is kept: keyed by its problem (``settings`` and ``tensors``)."""
    return Path(folder) / f"{file_stem(group)}-{key('curves', settings, *tensors, length=16)}.npz"


def load_curve(path: Path, shapes: Mapping[str, Sequence[int]]) -> CurveArrays | None:
    """The curve saved at ``path``, or None when there is none or it fails its checks (its
    digest, and the ``shapes`` of widths, losses and masks; a defective file is discarded)."""
    if path.exists():
        try:
            return _load_curve(path, shapes)
        except Exception as e:  # any defect of a cache file means: compute it again
            _discard(path, e)
    return None


def save_curve(path: Path, result: CurveArrays) -> None:
    """Keep a computed curve at ``path`` (``curve_path``), with the digest ``load_curve`` checks."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, widths=result[0], losses=result[1], masks=result[2], digest=np.array(_curve_digest(result)))


def dequantised_dir(name: str) -> Path:
    """The folder of a model dequantised from the file ``name`` names: readable, and carrying
    the "dequantised" version so a changed conversion never re-uses an old folder."""
    return root() / f"{name}-dequantised-v{VERSIONS['dequantised']}"
