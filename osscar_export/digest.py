"""Content hashes for on-disk caches: a changed input never re-uses a stale result."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def digest(*parts: Any) -> str:
    """sha256 hex of ``parts``: tensors by their bytes, everything else as sorted JSON."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()
