"""Gradual backward elimination: the engine of "osscar-fast", "greedy" and error curves.

``Gradual`` holds ``A = H_RR⁻¹`` and ``W_R`` for the kept rows only and removes several groups
per step with one joint downdate (a GEMM); the matrix is compacted as rows leave, so late steps
are cheap. Greedy OBS is the same engine with one group a step, so a speed comparison between
them is about the schedule, not the code (docs/design.md, "Solver").
"""

from __future__ import annotations

import math

import torch

from osscar_export.solver.layer import Layer, chol, group_rows, spd_inverse, with_dead

# A step removes about STEP_FRACTION of the groups still kept, but never more than TAPER of the
# distance to the final width, so steps are large while most groups remain and shrink to single
# removals near the target (where a wrong choice is not corrected later).
STEP_FRACTION = 1 / 48
TAPER = 1 / 4
COMPACT_BELOW = 0.8  # compact the active inverse when fewer than this share of its rows are kept


class Gradual:
    """``A = H_RR⁻¹`` and ``W_R`` on an active block of rows, with exact joint group removal."""

    def __init__(self, layer: Layer, groups: torch.Tensor):
        self.d = layer.d
        self.groups = groups  # group index of each active block position
        self.alive = torch.ones(len(groups), dtype=torch.bool, device=groups.device)
        rows = layer.rows(groups)
        self.A = spd_inverse(layer.H if len(rows) == layer.p else layer.H[rows][:, rows])
        self.W = layer.W0[rows].clone()  # Ŵ is the optimum of the full support since G = HŴ

    @property
    def kept(self) -> int:
        return int(self.alive.sum())

    def costs(self) -> torch.Tensor:
        """Exact single-group removal costs ρ_J = ½ tr(W_Jᵀ (A_JJ)⁻¹ W_J); +inf where removed."""
        d, na = self.d, len(self.groups)
        if d == 1:
            rho = 0.5 * (self.W * self.W).sum(dim=1) / torch.diagonal(self.A)
        else:
            blocks = self.A.view(na, d, na, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            pos = self.alive.nonzero().reshape(-1)
            L = chol(blocks[pos], "a diagonal block of H_RR⁻¹")
            Y = torch.linalg.solve_triangular(L, self.W.view(na, d, -1)[pos], upper=False)
            rho = torch.full((na,), math.inf, dtype=self.A.dtype, device=self.A.device)
            rho[pos] = 0.5 * (Y * Y).sum(dim=(1, 2))
        return rho.masked_fill(~self.alive, math.inf)

    def remove(self, pos: torch.Tensor) -> float:
        """Remove the groups at block positions ``pos`` jointly; return the exact loss increase."""
        u = group_rows(pos, self.d)
        Au = self.A[u]
        Lc = chol(Au[:, u], "H_RR⁻¹ on the removed rows")
        Z = torch.linalg.solve_triangular(Lc, Au, upper=False)
        Yw = torch.linalg.solve_triangular(Lc, self.W[u], upper=False)
        self.A.addmm_(Z.mT, Z, alpha=-1.0)
        self.W.addmm_(Z.mT, Yw, alpha=-1.0)
        self.alive[pos] = False
        if self.kept < COMPACT_BELOW * len(self.groups):
            self._compact()
        return 0.5 * float((Yw * Yw).sum())

    def _compact(self) -> None:
        pos = self.alive.nonzero().reshape(-1)
        rows = group_rows(pos, self.d)
        self.A = self.A.index_select(0, rows).index_select(1, rows)
        self.W = self.W.index_select(0, rows)
        self.groups = self.groups[pos]
        self.alive = torch.ones(len(pos), dtype=torch.bool, device=pos.device)

    def mask(self, n: int) -> torch.Tensor:
        """The kept groups as a mask over all ``n`` groups of the layer."""
        mask = torch.zeros(n, dtype=torch.bool, device=self.groups.device)
        mask[self.groups[self.alive]] = True
        return mask

    def weight(self, layer: Layer) -> torch.Tensor:
        """The re-fitted weight on the kept rows, in the layer's full (p, m) layout."""
        W = torch.zeros_like(layer.W0)
        pos = self.alive.nonzero().reshape(-1)
        W[layer.rows(self.groups[pos])] = self.W[group_rows(pos, self.d)]
        return W


def _step(kept: int, next_width: int, final: int, greedy: bool) -> int:
    if greedy:
        return 1
    size = min(math.ceil(kept * STEP_FRACTION), math.ceil((kept - final) * TAPER))
    return min(kept - next_width, max(1, size))


def gradual_run(
    layer: Layer, widths: list[int], greedy: bool, weights: bool
) -> tuple[list[torch.Tensor], list[float], list[torch.Tensor]]:
    """Eliminate through every width (descending): the mask, loss and (with ``weights``) re-fitted
    weight at each. Dead groups go first, at no cost; the loss is the sum of exact removal costs."""
    live = (~layer.dead).nonzero().reshape(-1)
    n, n_live = layer.n, len(live)
    masks, losses, ws = [], [], []
    engine = Gradual(layer, live) if n_live and min(widths) < n_live else None
    loss = 0.0
    for width in widths:
        if engine is not None:
            while engine.kept > width:
                order = torch.argsort(engine.costs())
                k = _step(engine.kept, width, widths[-1], greedy)
                loss += engine.remove(order[:k])
        if engine is None:
            live_mask = torch.zeros(n, dtype=torch.bool, device=live.device)
            live_mask[live] = True
        else:
            live_mask = engine.mask(n)
        masks.append(with_dead(layer, live_mask, width))
        losses.append(loss)
        if weights:
            ws.append(engine.weight(layer) if engine is not None else layer.W0.clone())
    return masks, losses, ws
