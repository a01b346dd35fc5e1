"""The "exact" method: the optimal support by enumeration, the quality oracle for small layers.

It enumerates every C(n, width) support with batched Cholesky solves and is refused above
``EXACT_MAX_SUPPORTS`` (docs/design.md, "Solver").
"""

from __future__ import annotations

import itertools
import math

import torch

from osscar_export.solver.layer import Layer, chol, group_rows

EXACT_MAX_SUPPORTS = 20_000  # "exact" enumerates C(n, width) supports; refused above this


def exact_support(layer: Layer, width: int) -> torch.Tensor:
    """The mask of the optimal support of ``width`` groups (ties: the first in enumeration order)."""
    n = layer.n
    count = math.comb(n, width)
    if count > EXACT_MAX_SUPPORTS:
        raise ValueError(
            f'method "exact" would enumerate C({n}, {width}) = {count} supports, above the limit '
            f'{EXACT_MAX_SUPPORTS}; use method="osscar" for a layer this size'
        )
    device = layer.H.device
    best_val, best = -math.inf, torch.zeros(n, dtype=torch.bool, device=device)
    if width == 0:
        return best
    r = width * layer.d
    batch = max(1, int(2e7 // (r * (r + layer.G.shape[1]))))
    combos = itertools.combinations(range(n), width)
    while chunk := list(itertools.islice(combos, batch)):
        groups = torch.tensor(chunk, dtype=torch.long, device=device)
        rows = group_rows(groups, layer.d).reshape(len(chunk), r)
        L = chol(layer.H[rows[:, :, None], rows[:, None, :]], "H restricted to a support")
        Y = torch.linalg.solve_triangular(L, layer.G[rows], upper=False)
        val = (Y * Y).sum(dim=(1, 2))  # −2 f*(R): larger is better
        i = int(val.argmax())
        if float(val[i]) > best_val:
            best_val = float(val[i])
            best = torch.zeros(n, dtype=torch.bool, device=device)
            best[groups[i]] = True
    return best
