"""The swap local search of "osscar", run from the gradual support at the chosen width.

``Swept`` holds the sweep of ``[H | G]`` on the kept rows: the kept block is ``−H_RR⁻¹``, the
pruned block is the Schur complement ``S`` and the G columns hold ``W_R`` (kept rows) and the
negative gradient ``g`` (pruned rows). The exact loss change of removing or re-adding a group is
``−½ tr(T_JGᵀ T_JJ⁻¹ T_JG)`` in either direction, a candidate swap is scored from the dropped
rows alone, and an accepted swap is two sweeps: the search never needs a fresh inverse
(docs/design.md, "Solver").
"""

from __future__ import annotations

import torch

from osscar_export.solver.layer import Layer, chol, group_rows, spd_inverse

# Swap size starts near SWAP_FRACTION of the groups and halves on each failed round; at size 1 up
# to SINGLE_SWAP_TRIES drop candidates (cheapest first) are tried before giving up. At most
# MAX_SWAP_ROUNDS rounds run (the reference's local_iter is 20–30): late rounds of a large layer
# gain little and each accepted swap costs two sweeps of the p × (p+m) matrix.
SWAP_FRACTION = 1 / 100
SINGLE_SWAP_TRIES = 16
MAX_SWAP_ROUNDS = 30


class Swept:
    """The sweep of ``[H | G]`` (p × (p+m)) on the kept rows; see the module docstring."""

    def __init__(self, layer: Layer, mask: torch.Tensor):
        """Built from ``A = H_RR⁻¹`` directly: ``T_RR = −A``, ``T_RP = A H_RP``, ``T_PP = S``,
        ``W_R = Ŵ_R + A H_RP Ŵ_P`` and ``g_P = S Ŵ_P`` (since G = HŴ), with no full G."""
        self.layer = layer
        H, W0, p = layer.H, layer.W0, layer.p
        R, P = layer.rows(mask.nonzero()), layer.rows((~mask).nonzero())
        self.T = T = torch.empty(p, p + W0.shape[1], dtype=H.dtype, device=H.device)
        if len(R) == 0:
            T[:, :p], T[:, p:] = H, H @ W0
            return
        A = spd_inverse(H[R][:, R])
        if len(P) == 0:
            T[:, :p], T[:, p:] = -A, W0
            return
        HRP = H[R][:, P]
        Y = A @ HRP
        S = torch.addmm(H[P][:, P], HRP.mT, Y, alpha=-1.0)
        T[R[:, None], R] = -A
        T[R[:, None], P] = Y
        T[P[:, None], R] = Y.mT
        T[P[:, None], P] = S
        T[R, p:] = torch.addmm(W0[R], Y, W0[P])
        T[P, p:] = S @ W0[P]

    def deltas(self, groups: torch.Tensor, add: bool) -> torch.Tensor:
        """Exact loss change of toggling each group alone: −γ_J (add a pruned group) or +ρ_J (remove)."""
        d, p = self.layer.d, self.layer.p
        rows = group_rows(groups, d).reshape(-1, d)
        B = self.T[rows[:, :, None], rows[:, None, :]]
        L = chol(B if add else -B, "a pivot block of the swept Gram")
        Y = torch.linalg.solve_triangular(L, self.T[rows, p:], upper=False)
        change = 0.5 * (Y * Y).sum(dim=(1, 2))
        return -change if add else change

    def pruned_side(self, pruned: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per pruned group: its Schur block, its gradient rows g (contiguous) and ``g gᵀ``."""
        d, p = self.layer.d, self.layer.p
        blocks = group_rows(pruned, d).view(-1, d)
        g = self.T[blocks.reshape(-1), p:]
        gv = g.view(len(pruned), d, -1)
        return blocks, self.T[blocks[:, :, None], blocks[:, None, :]], g, gv @ gv.mT

    def swap(self, drop: torch.Tensor, pruned: torch.Tensor, t: int, side: tuple) -> tuple[torch.Tensor, float]:
        """The t groups of ``pruned`` that re-enter best once ``drop`` leaves, and the swap's exact loss change.

        Nothing is swept: a sweep only mixes a block with the pivot rows, so with ``−T_DD = LLᵀ``,
        ``Q = L⁻¹T_DP`` and ``y = L⁻¹T_DG`` the post-drop Schur blocks are ``S + QᵀQ`` and the
        post-drop gradients ``g + Qᵀy``; a candidate swap costs one read of g, not a sweep.
        """
        d, p, T = self.layer.d, self.layer.p, self.T
        blocks, S, g, K = side
        rd = group_rows(drop, d)
        L = chol(-T[rd][:, rd], "a pivot block of the swept Gram")
        y = torch.linalg.solve_triangular(L, T[rd, p:], upper=False)
        Q = torch.linalg.solve_triangular(L, T[rd][:, blocks.reshape(-1)], upper=False)
        Q = Q.view(len(rd), len(pruned), d).permute(1, 0, 2)  # (nP, kd, d)
        MQ = (g @ y.mT).view(len(pruned), d, -1) @ Q  # g_J yᵀ Q_J
        X = K + MQ + MQ.mT + Q.mT @ (y @ y.mT) @ Q  # g'g'ᵀ per group
        gains = 0.5 * torch.cholesky_solve(X, chol(S + Q.mT @ Q, "a Schur block of the swept Gram")).diagonal(dim1=1, dim2=2).sum(1)
        best = torch.topk(gains, t).indices
        QE = Q[best].permute(1, 0, 2).reshape(len(rd), -1)
        re = blocks[best].reshape(-1)
        LE = chol(T[re][:, re] + QE.mT @ QE, "a Schur block of the swept Gram")
        YE = torch.linalg.solve_triangular(LE, T[re, p:] + QE.mT @ y, upper=False)
        return pruned[best], 0.5 * float((y * y).sum()) - 0.5 * float((YE * YE).sum())

    def sweep(self, rows: torch.Tensor, add: bool) -> None:
        """Sweep rows in (add: pruned → kept) or out (reverse sweep: kept → pruned), in place."""
        p, T = self.layer.p, self.T
        sign = 1.0 if add else -1.0
        L = chol(sign * T[rows][:, rows], "a pivot block of the swept Gram")
        X = sign * torch.cholesky_solve(T[rows], L)  # T_KK⁻¹ T_K:
        Binv = sign * torch.cholesky_inverse(L)
        T.addmm_(T[:, rows], X, alpha=-1.0)
        T[rows] = sign * X
        T[:, rows] = sign * X[:, :p].mT
        T[rows[:, None], rows] = -Binv


def local_search(layer: Layer, mask: torch.Tensor, loss: float) -> torch.Tensor:
    """Swap search from ``mask``: drop the t cheapest, add back the t best, keep only strict gains.

    Drop costs, re-entry gains and each swap's joint loss change are exact (``Swept``), so a swap
    is made only when the new support's loss is lower. t halves after a failed round; at t = 1
    up to SINGLE_SWAP_TRIES drop candidates (cheapest first) are tried before the search stops.
    """
    n, s = layer.n, int(mask.sum())
    if s == 0 or s == n:
        return mask
    t = max(1, min(s, n - s, round(n * SWAP_FRACTION)))
    state = Swept(layer, mask)
    mask = mask.clone()
    for _ in range(MAX_SWAP_ROUNDS):
        kept, pruned = mask.nonzero().reshape(-1), (~mask).nonzero().reshape(-1)
        order = kept[torch.argsort(state.deltas(kept, add=False))]
        side = state.pruned_side(pruned)
        candidates = [order[:t]] if t > 1 else [order[i : i + 1] for i in range(min(s, SINGLE_SWAP_TRIES))]
        for drop in candidates:
            add, change = state.swap(drop, pruned, t, side)
            if change < -1e-12 * loss:
                state.sweep(layer.rows(drop), add=False)
                state.sweep(layer.rows(add), add=True)
                mask[drop], mask[add] = False, True
                loss += change
                break
        else:
            if t == 1:
                break
            t = max(1, t // 2)
    return mask
