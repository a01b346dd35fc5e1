"""Width grids: the kept structure counts at which error curves and latency tables are sampled.

A *width* is a count of kept structures (an int); a *mask* is the boolean per structure that
says which ones (see docs/design.md, "Vocabulary").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from osscar_export.errors import PlanError
from osscar_export.plan import StructureGroup

# Channel and neuron widths are multiples of this: runtimes vectorise over 8 lanes, and on
# onnxruntime CPU an unaligned channel width runs slower than its aligned neighbours (it breaks
# the blocked memory layout of the whole network), so the allocator would never want one.
ALIGN = 8


def fractions(levels: int) -> list[float]:
    """``levels`` evenly spaced kept fractions ``1/levels … 1``."""
    return [i / levels for i in range(1, levels + 1)]


def width_grid(group: StructureGroup, levels: int | Sequence[float] | Mapping[str, Sequence[int]] = 16) -> list[int]:
    """The sorted kept widths of ``group``: at ``levels`` evenly spaced fractions of its count (an
    int), at the given fractions, or the explicit widths listed for it by name.

    Fractions of channel and neuron groups of at least 2·``ALIGN`` round to multiples of ``ALIGN``.
    """
    if isinstance(levels, int):
        levels = fractions(levels)
    if isinstance(levels, Mapping):
        if group.name not in levels:
            raise PlanError(f"levels has no widths for group {group.name!r}")
        widths = [int(k) for k in levels[group.name]]
    elif group.kind in ("channel", "neuron") and group.count >= 2 * ALIGN:
        widths = [min(group.count, max(ALIGN, ALIGN * round(float(f) * group.count / ALIGN))) for f in levels]
    else:
        widths = [max(1, round(float(f) * group.count)) for f in levels]
    bad = [k for k in widths if not 1 <= k <= group.count]
    if bad:
        raise PlanError(f"widths {bad} for group {group.name!r} are outside 1..{group.count}")
    return sorted(set(widths))


def first_mask(count: int, width: int) -> torch.Tensor:
    """The mask keeping the first ``width`` of ``count`` structures (latency does not depend on which)."""
    if not 1 <= width <= count:
        raise PlanError(f"kept width {width} is outside 1..{count}")
    mask = torch.zeros(count, dtype=torch.bool)
    mask[:width] = True
    return mask
