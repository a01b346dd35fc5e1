"""The OSSCAR layer problem (DESIGN.md §4): which input groups of one layer survive, and their re-fit.

For damped ``H = XᵀX + λI`` and ``G = H Ŵ`` the loss of a weight ``W'`` is
``½ tr((W'−Ŵ)ᵀ H (W'−Ŵ)) = f(W') − f(Ŵ) ≥ 0``; for a kept row set R its minimum is reached by
``W_R = H_RR⁻¹ G_R`` (zero elsewhere). Every method picks a support of ``keep`` groups; all but
"mp" then return that re-fit.

Two engines carry the algebra, both exact (block Schur complements, float64, batched over groups):

* ``_Gradual`` holds ``A = H_RR⁻¹`` and ``W_R`` for the kept rows only and removes several groups
  per step with one joint downdate (a GEMM); the matrix is compacted as rows leave, so late steps
  are cheap. Gradual pruning ("osscar-fast", error curves) and greedy OBS (one group a step) both
  run on it, so their speed comparison is about the schedule, not the code.
* ``_Swept`` holds the sweep of ``[H | G]`` on the kept rows: the kept block is ``−H_RR⁻¹``, the
  pruned block is the Schur complement ``S`` and the G columns hold ``W_R`` (kept rows) and the
  negative gradient ``g`` (pruned rows). The exact loss change of removing or re-adding a group
  is ``−½ tr(T_JGᵀ T_JJ⁻¹ T_JG)`` in either direction, a candidate swap is scored from the
  dropped rows alone, and an accepted swap is two sweeps: the local search of "osscar" never
  needs a fresh inverse.

Dead inputs (zero diagonal of ``XtX``) never fire: their weight rows are zeroed before ``G`` is
formed (as the reference does), so their groups cost nothing and go first. The loss is therefore
measured against Ŵ with those rows zeroed, which changes no layer output.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import torch

METHODS = ("osscar", "osscar-fast", "greedy", "mp", "mp+", "exact")
EXACT_MAX_SUPPORTS = 20_000  # "exact" enumerates C(n, keep) supports; refused above this

# Gradual schedule: a step removes about STEP_FRACTION of the groups still kept, but never more
# than TAPER of the distance to the final level, so steps are large while most groups remain and
# shrink to single removals near the target (where a wrong choice is not corrected later).
STEP_FRACTION = 1 / 48
TAPER = 1 / 4
COMPACT_BELOW = 0.8  # compact the active inverse when fewer than this share of its rows are kept

# Local search: swap size starts near 1% of the groups and halves on each failed round; at size 1
# up to SINGLE_SWAP_TRIES drop candidates (cheapest first) are tried before giving up. At most
# MAX_SWAP_ROUNDS rounds run (the reference's local_iter is 20–30): late rounds of a large layer
# gain ~1e-4 of the loss and each accepted swap costs two sweeps of the p × (p+m) matrix.
SWAP_FRACTION = 1 / 100
SINGLE_SWAP_TRIES = 16
MAX_SWAP_ROUNDS = 30


@dataclass(frozen=True)
class LayerSolution:
    """The support (``keep``, bool (n,)), the weight on it (float64 (p, m)) and its loss."""

    keep: torch.Tensor
    weight: torch.Tensor
    loss: float
    method: str


@dataclass(frozen=True)
class ErrorCurve:
    """Loss per kept count; ``keep[i]`` is the support at ``levels[i]`` (ascending, nested)."""

    levels: tuple[int, ...]
    keep: torch.Tensor  # bool (len(levels), n); keep[i] ⊆ keep[i+1]
    losses: torch.Tensor  # float64 (len(levels),)
    weights: tuple[torch.Tensor, ...] | None  # float64 (p, m) per level when asked for
    method: str

    def loss_at(self, kept: int) -> float:
        """Loss at one recorded kept count."""
        if kept not in self.levels:
            raise ValueError(f"kept count {kept} is not a level of this curve (levels {list(self.levels)})")
        return float(self.losses[self.levels.index(kept)])


@dataclass
class _Layer:
    """One validated problem in float64: damped H, Ŵ with dead rows zeroed, and G = HŴ on demand."""

    H: torch.Tensor
    W0: torch.Tensor
    d: int
    dead: torch.Tensor  # bool (n,): every row of the group is dead

    @cached_property
    def G(self) -> torch.Tensor:
        return self.H @ self.W0

    @property
    def p(self) -> int:
        return self.H.shape[0]

    @property
    def n(self) -> int:
        return self.p // self.d

    def rows(self, groups: torch.Tensor) -> torch.Tensor:
        return _rows(groups, self.d)


def _rows(groups: torch.Tensor, d: int) -> torch.Tensor:
    """Row indices of the given group indices (group-major, in the order given)."""
    groups = groups.reshape(-1)
    return (groups[:, None] * d + torch.arange(d, device=groups.device)).reshape(-1)


# ----------------------------------------------------------------------------- validation


def _prepare(XtX: torch.Tensor, W: torch.Tensor, group_size: int, damp: float) -> _Layer:
    if not isinstance(XtX, torch.Tensor) or not isinstance(W, torch.Tensor):
        raise TypeError(f"XtX and W must be torch tensors, got {type(XtX).__name__} and {type(W).__name__}")
    if XtX.ndim != 2 or XtX.shape[0] != XtX.shape[1]:
        raise ValueError(f"XtX must be a square (p, p) Gram matrix, got shape {tuple(XtX.shape)}")
    p = XtX.shape[0]
    if W.ndim != 2 or W.shape[0] != p or W.shape[1] == 0:
        raise ValueError(f"W must be input-major (p, m) = ({p}, m>0) to match XtX, got shape {tuple(W.shape)}")
    if XtX.device != W.device:
        raise ValueError(f"XtX is on {XtX.device} but W is on {W.device}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if p == 0 or p % group_size:
        raise ValueError(f"p = {p} input rows do not split into groups of group_size = {group_size}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    H = XtX.detach().to(torch.float64, copy=True)
    W0 = W.detach().to(torch.float64, copy=True)
    if not math.isfinite(float(H.sum())) and not torch.isfinite(H).all():  # the sum is the cheap test
        raise ValueError("XtX contains NaN or inf: the calibration statistics are corrupt")
    if not math.isfinite(float(W0.sum())) and not torch.isfinite(W0).all():
        raise ValueError("W contains NaN or inf")
    diag = torch.diagonal(H)
    if float(diag.min()) < 0:
        raise ValueError(f"XtX has a negative diagonal entry ({float(diag.min()):.3g}): it is not a Gram matrix")
    # Symmetry is checked on sampled rows (a full transposed pass costs more than it tells).
    probe = torch.randperm(p, generator=torch.Generator().manual_seed(0))[:64].to(H.device)
    if float((H[probe] - H[:, probe].mT).abs().max()) > 1e-6 * float(diag.max()):
        raise ValueError("XtX is not symmetric (|XtX - XtXᵀ| exceeds 1e-6 of its largest diagonal entry)")
    dead_rows = diag == 0
    if bool(dead_rows.any()):  # a Gram row with zero diagonal is zero; enforce it so dead inputs decouple
        idx = dead_rows.nonzero().reshape(-1)
        H.index_fill_(0, idx, 0).index_fill_(1, idx, 0)
        W0.index_fill_(0, idx, 0)
    mean = float(diag.mean())
    lam = damp * mean if mean > 0 else 1.0  # all inputs dead: any λ > 0 gives the zero solution
    diag.add_(lam)
    if float(diag.min()) <= 0:
        raise ValueError("XtX + λI is singular (an input has zero variance and damp = 0): use damp > 0")
    dead = dead_rows.reshape(-1, group_size).all(dim=1)
    return _Layer(H, W0, group_size, dead)


def _check_keep(keep: int, n: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int number of groups, got {keep!r}")
    if not 0 <= keep <= n:
        raise ValueError(f"keep = {keep} is out of range: the layer has n = {n} groups (0 <= keep <= n)")
    return keep


def _spd_inverse(H: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """Inverse of an SPD matrix by 2×2 block recursion on Schur complements.

    It costs 4/3 p³ flops against p³ for Cholesky + ``cholesky_inverse``, but they are GEMMs,
    which run about twice as fast as LAPACK's triangular inverse on a few CPU cores.
    """
    p = H.shape[0]
    if p <= leaf:
        return torch.cholesky_inverse(_chol(H, "H"))
    h = p // 2
    Ai = _spd_inverse(H[:h, :h], leaf)
    AiB = Ai @ H[:h, h:]
    Si = _spd_inverse(torch.addmm(H[h:, h:], H[:h, h:].mT, AiB, alpha=-1.0), leaf)
    X = AiB @ Si
    out = torch.empty_like(H)
    torch.addmm(Ai, X, AiB.mT, out=out[:h, :h])
    out[:h, h:] = -X
    out[h:, :h] = -X.mT
    out[h:, h:] = Si
    return out


def _chol(A: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info.max()) != 0:
        raise ValueError(f"{what} is not positive definite in float64: the Gram matrix is too ill-conditioned, raise damp")
    return L


# ----------------------------------------------------------------------------- re-fit and losses


def _refit(layer: _Layer, keep: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Exact re-fit on a support from a fresh Cholesky: ``W_R = H_RR⁻¹ G_R`` and its loss.

    With ``B = H_RP Ŵ_P``: ``W_R = Ŵ_R + H_RR⁻¹ B`` and the loss is ``½ tr(Ŵ_Pᵀ S Ŵ_P)`` for the
    Schur complement S, i.e. ``½ (tr(Ŵ_Pᵀ H_PP Ŵ_P) − ‖L⁻¹B‖²)``: no full-energy cancellation.
    """
    rows = layer.rows(keep.nonzero())
    gone = layer.rows((~keep).nonzero())
    if gone.numel() == 0:
        return layer.W0.clone(), 0.0
    Wp = layer.W0[gone]
    masked = float((Wp * (layer.H[gone][:, gone] @ Wp)).sum())
    W = torch.zeros_like(layer.W0)
    if rows.numel() == 0:
        return W, 0.5 * masked
    L = _chol(layer.H[rows][:, rows], "H restricted to the kept rows")
    Y = torch.linalg.solve_triangular(L, layer.H[rows][:, gone] @ Wp, upper=False)
    W[rows] = layer.W0[rows] + torch.linalg.solve_triangular(L.mT, Y, upper=True)
    return W, max(0.0, 0.5 * (masked - float((Y * Y).sum())))


def _masked_losses(layer: _Layer, order: torch.Tensor, levels: list[int]) -> list[float]:
    """Loss of Ŵ with all but the prefix ``order[:k]`` zeroed and no re-fit (the "mp" weight).

    The pruned sets are nested, so each level adds only the newly pruned block B:
    ``loss(P ∪ B) = loss(P) + tr(Ŵ_Bᵀ H_BP Ŵ_P) + ½ tr(Ŵ_Bᵀ H_BB Ŵ_B)``.
    """
    H, W0 = layer.H, layer.W0
    gone = order.flip(0)
    out, total, done = {}, 0.0, 0
    for k in sorted(levels, reverse=True):
        new, old = layer.rows(gone[done : layer.n - k]), layer.rows(gone[:done])
        Wn = W0[new]
        total += float((Wn * (H[new][:, old] @ W0[old])).sum()) + 0.5 * float((Wn * (H[new][:, new] @ Wn)).sum())
        out[k], done = total, layer.n - k
    return [out[k] for k in levels]


def _nested_refit_losses(layer: _Layer, order: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """Re-fit loss of every prefix support ``order[:k]``, k in levels, from one Cholesky.

    The Cholesky factor of a leading block is the leading block of the factor, so with
    ``Y = L⁻¹ G`` (rows in that order) the loss of keeping the first r rows is ``½‖Y[r:]‖²``.
    """
    rows = layer.rows(order)
    L = _chol(layer.H[rows][:, rows], "H")
    Y = torch.linalg.solve_triangular(L, layer.G[rows], upper=False)
    tail = (Y * Y).sum(dim=1).flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j≥i} ‖Y_j‖²
    tail = torch.cat([tail, tail.new_zeros(1)])
    return torch.stack([0.5 * tail[k * layer.d] for k in levels])


def _with_dead(layer: _Layer, live_keep: torch.Tensor, kept: int) -> torch.Tensor:
    """Fill a support of live groups up to ``kept`` groups with dead ones (lowest index first)."""
    keep = live_keep.clone()
    extra = kept - int(keep.sum())
    if extra > 0:
        keep[layer.dead.nonzero().reshape(-1)[:extra]] = True
    return keep


# ----------------------------------------------------------------------------- gradual engine


class _Gradual:
    """``A = H_RR⁻¹`` and ``W_R`` on an active block of rows, with exact joint group removal."""

    def __init__(self, layer: _Layer, groups: torch.Tensor):
        self.d = layer.d
        self.groups = groups  # group index of each active block position
        self.alive = torch.ones(len(groups), dtype=torch.bool, device=groups.device)
        rows = layer.rows(groups)
        self.A = _spd_inverse(layer.H if len(rows) == layer.p else layer.H[rows][:, rows])
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
            L = _chol(blocks[pos], "a diagonal block of H_RR⁻¹")
            Y = torch.linalg.solve_triangular(L, self.W.view(na, d, -1)[pos], upper=False)
            rho = torch.full((na,), math.inf, dtype=self.A.dtype, device=self.A.device)
            rho[pos] = 0.5 * (Y * Y).sum(dim=(1, 2))
        return rho.masked_fill(~self.alive, math.inf)

    def remove(self, pos: torch.Tensor) -> float:
        """Remove the groups at block positions ``pos`` jointly; return the exact loss increase."""
        u = _rows(pos, self.d)
        Au = self.A[u]
        Lc = _chol(Au[:, u], "H_RR⁻¹ on the removed rows")
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
        rows = _rows(pos, self.d)
        self.A = self.A.index_select(0, rows).index_select(1, rows)
        self.W = self.W.index_select(0, rows)
        self.groups = self.groups[pos]
        self.alive = torch.ones(len(pos), dtype=torch.bool, device=pos.device)

    def keep_mask(self, n: int) -> torch.Tensor:
        keep = torch.zeros(n, dtype=torch.bool, device=self.groups.device)
        keep[self.groups[self.alive]] = True
        return keep

    def weight(self, layer: _Layer) -> torch.Tensor:
        W = torch.zeros_like(layer.W0)
        pos = self.alive.nonzero().reshape(-1)
        W[layer.rows(self.groups[pos])] = self.W[_rows(pos, self.d)]
        return W


def _step(kept: int, next_level: int, final: int, greedy: bool) -> int:
    if greedy:
        return 1
    size = min(math.ceil(kept * STEP_FRACTION), math.ceil((kept - final) * TAPER))
    return min(kept - next_level, max(1, size))


def _gradual_run(layer: _Layer, levels: list[int], greedy: bool, weights: bool):
    """Gradual backward elimination through every level (descending); supports and losses per level."""
    live = (~layer.dead).nonzero().reshape(-1)
    n, n_live = layer.n, len(live)
    supports, losses, ws = [], [], []
    engine = _Gradual(layer, live) if n_live and min(levels) < n_live else None
    loss = 0.0
    for level in levels:
        if engine is not None:
            while engine.kept > level:
                order = torch.argsort(engine.costs())
                k = _step(engine.kept, level, levels[-1], greedy)
                loss += engine.remove(order[:k])
        if engine is None:
            live_keep = torch.zeros(n, dtype=torch.bool, device=live.device)
            live_keep[live] = True
        else:
            live_keep = engine.keep_mask(n)
        supports.append(_with_dead(layer, live_keep, level))
        losses.append(loss)
        if weights:
            ws.append(engine.weight(layer) if engine is not None else layer.W0.clone())
    return supports, losses, ws


# ----------------------------------------------------------------------------- local search


class _Swept:
    """The sweep of ``[H | G]`` (p × (p+m)) on the kept rows; see the module docstring."""

    def __init__(self, layer: _Layer, keep: torch.Tensor):
        """Built from ``A = H_RR⁻¹`` directly: ``T_RR = −A``, ``T_RP = A H_RP``, ``T_PP = S``,
        ``W_R = Ŵ_R + A H_RP Ŵ_P`` and ``g_P = S Ŵ_P`` (since G = HŴ), with no full G."""
        self.layer = layer
        H, W0, p = layer.H, layer.W0, layer.p
        R, P = layer.rows(keep.nonzero()), layer.rows((~keep).nonzero())
        self.T = T = torch.empty(p, p + W0.shape[1], dtype=H.dtype, device=H.device)
        if len(R) == 0:
            T[:, :p], T[:, p:] = H, H @ W0
            return
        A = _spd_inverse(H[R][:, R])
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
        rows = _rows(groups, d).reshape(-1, d)
        B = self.T[rows[:, :, None], rows[:, None, :]]
        L = _chol(B if add else -B, "a pivot block of the swept Gram")
        Y = torch.linalg.solve_triangular(L, self.T[rows, p:], upper=False)
        change = 0.5 * (Y * Y).sum(dim=(1, 2))
        return -change if add else change

    def pruned_side(self, pruned: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per pruned group: its Schur block, its gradient rows g (contiguous) and ``g gᵀ``."""
        d, p = self.layer.d, self.layer.p
        blocks = _rows(pruned, d).view(-1, d)
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
        rd = _rows(drop, d)
        L = _chol(-T[rd][:, rd], "a pivot block of the swept Gram")
        y = torch.linalg.solve_triangular(L, T[rd, p:], upper=False)
        Q = torch.linalg.solve_triangular(L, T[rd][:, blocks.reshape(-1)], upper=False)
        Q = Q.view(len(rd), len(pruned), d).permute(1, 0, 2)  # (nP, kd, d)
        MQ = (g @ y.mT).view(len(pruned), d, -1) @ Q  # g_J yᵀ Q_J
        X = K + MQ + MQ.mT + Q.mT @ (y @ y.mT) @ Q  # g'g'ᵀ per group
        gains = 0.5 * torch.cholesky_solve(X, _chol(S + Q.mT @ Q, "a Schur block of the swept Gram")).diagonal(dim1=1, dim2=2).sum(1)
        best = torch.topk(gains, t).indices
        QE = Q[best].permute(1, 0, 2).reshape(len(rd), -1)
        re = blocks[best].reshape(-1)
        LE = _chol(T[re][:, re] + QE.mT @ QE, "a Schur block of the swept Gram")
        YE = torch.linalg.solve_triangular(LE, T[re, p:] + QE.mT @ y, upper=False)
        return pruned[best], 0.5 * float((y * y).sum()) - 0.5 * float((YE * YE).sum())

    def sweep(self, rows: torch.Tensor, add: bool) -> None:
        """Sweep rows in (add: pruned → kept) or out (reverse sweep: kept → pruned), in place."""
        p, T = self.layer.p, self.T
        sign = 1.0 if add else -1.0
        L = _chol(sign * T[rows][:, rows], "a pivot block of the swept Gram")
        X = sign * torch.cholesky_solve(T[rows], L)  # T_KK⁻¹ T_K:
        Binv = sign * torch.cholesky_inverse(L)
        T.addmm_(T[:, rows], X, alpha=-1.0)
        T[rows] = sign * X
        T[:, rows] = sign * X[:, :p].mT
        T[rows[:, None], rows] = -Binv


def _local_search(layer: _Layer, keep: torch.Tensor, loss: float) -> torch.Tensor:
    """Swap search from ``keep``: drop the t cheapest, add back the t best, keep only strict gains.

    Drop costs, re-entry gains and each swap's joint loss change are exact (``_Swept``), so a swap
    is made only when the new support's loss is lower. t halves after a failed round; at t = 1
    up to SINGLE_SWAP_TRIES drop candidates (cheapest first) are tried before the search stops.
    """
    n, s = layer.n, int(keep.sum())
    if s == 0 or s == n:
        return keep
    t = max(1, min(s, n - s, round(n * SWAP_FRACTION)))
    state = _Swept(layer, keep)
    keep = keep.clone()
    for _ in range(MAX_SWAP_ROUNDS):
        kept, pruned = keep.nonzero().reshape(-1), (~keep).nonzero().reshape(-1)
        order = kept[torch.argsort(state.deltas(kept, add=False))]
        side = state.pruned_side(pruned)
        candidates = [order[:t]] if t > 1 else [order[i : i + 1] for i in range(min(s, SINGLE_SWAP_TRIES))]
        for drop in candidates:
            add, change = state.swap(drop, pruned, t, side)
            if change < -1e-12 * loss:
                state.sweep(layer.rows(drop), add=False)
                state.sweep(layer.rows(add), add=True)
                keep[drop], keep[add] = False, True
                loss += change
                break
        else:
            if t == 1:
                break
            t = max(1, t // 2)
    return keep


# ----------------------------------------------------------------------------- baselines


def _magnitude_order(layer: _Layer) -> torch.Tensor:
    """Groups by descending L1 norm of their dense rows (the reference's MP), ties by index."""
    norms = layer.W0.abs().reshape(layer.n, -1).sum(dim=1)
    return torch.sort(-norms, stable=True).indices


def _exact_support(layer: _Layer, keep: int) -> torch.Tensor:
    """The optimal support by enumeration of all C(n, keep) supports (batched Cholesky)."""
    n = layer.n
    count = math.comb(n, keep)
    if count > EXACT_MAX_SUPPORTS:
        raise ValueError(
            f'method "exact" would enumerate C({n}, {keep}) = {count} supports, above the limit '
            f'{EXACT_MAX_SUPPORTS}; use method="osscar" for a layer this size'
        )
    device = layer.H.device
    best_val, best = -math.inf, torch.zeros(n, dtype=torch.bool, device=device)
    if keep == 0:
        return best
    r = keep * layer.d
    batch = max(1, int(2e7 // (r * (r + layer.G.shape[1]))))
    combos = itertools.combinations(range(n), keep)
    while chunk := list(itertools.islice(combos, batch)):
        groups = torch.tensor(chunk, dtype=torch.long, device=device)
        rows = _rows(groups, layer.d).reshape(len(chunk), r)
        L = _chol(layer.H[rows[:, :, None], rows[:, None, :]], "H restricted to a support")
        Y = torch.linalg.solve_triangular(L, layer.G[rows], upper=False)
        val = (Y * Y).sum(dim=(1, 2))  # −2 f*(R): larger is better
        i = int(val.argmax())
        if float(val[i]) > best_val:
            best_val = float(val[i])
            best = torch.zeros(n, dtype=torch.bool, device=device)
            best[groups[i]] = True
    return best


# ----------------------------------------------------------------------------- public API


def prune_layer(
    XtX: torch.Tensor,
    W: torch.Tensor,
    group_size: int,
    keep: int,
    method: str = "osscar",
    damp: float = 0.01,
) -> LayerSolution:
    """Keep ``keep`` of the ``p // group_size`` input groups of one layer and re-fit it.

    ``XtX`` is the undamped (p, p) Gram of the layer inputs, ``W`` the dense weight input-major
    (Linear: ``weight.T``; Conv2d: ``weight.flatten(1).T``, groups = input channels,
    ``group_size = kh·kw``). Methods: "osscar" (gradual pruning, then swap local search),
    "osscar-fast" (gradual only), "greedy" (one group at a time, exact OBS), "mp" (largest group
    L1 norms, no re-fit), "mp+" (same support, re-fit), "exact" (enumeration; small layers only).
    The returned weight is float64; cast it when writing it into the layer.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    layer = _prepare(XtX, W, group_size, damp)
    keep = _check_keep(keep, layer.n)
    if method in ("mp", "mp+"):
        order = _magnitude_order(layer)
        mask = torch.zeros(layer.n, dtype=torch.bool, device=layer.H.device)
        mask[order[:keep]] = True
        if method == "mp":
            weight = layer.W0 * mask.repeat_interleave(layer.d)[:, None]
            return LayerSolution(mask, weight, _masked_losses(layer, order, [keep])[0], method)
    elif method == "exact":
        mask = _exact_support(layer, keep)
    else:
        # The gradual engine's weight is the exact re-fit on its support (joint Schur downdates)
        # and its loss the sum of the exact removal costs; tests check both against a fresh re-fit.
        supports, losses, ws = _gradual_run(layer, [keep], greedy=method == "greedy", weights=True)
        mask, loss, weight = supports[0], losses[0], ws[0]
        if method == "osscar":
            better = _local_search(layer, mask, loss)
            if not torch.equal(better, mask):
                w, cost = _refit(layer, better)
                if cost < loss:  # the search only accepts strict gains; this guards rounding
                    mask, weight, loss = better, w, cost
        return LayerSolution(mask, weight, loss, method)
    weight, loss = _refit(layer, mask)
    return LayerSolution(mask, weight, loss, method)


def refit(XtX: torch.Tensor, W: torch.Tensor, group_size: int, keep: torch.Tensor, damp: float = 0.01) -> LayerSolution:
    """The exact re-fit of one layer on a support chosen elsewhere (``keep``: bool per group), e.g.
    a width of an error curve: what every re-fitting method does once it has its support."""
    layer = _prepare(XtX, W, group_size, damp)
    keep = torch.as_tensor(keep, dtype=torch.bool, device=layer.H.device).reshape(-1)
    if keep.numel() != layer.n:
        raise ValueError(f"keep has {keep.numel()} entries for {layer.n} groups")
    weight, loss = _refit(layer, keep)
    return LayerSolution(keep, weight, loss, "refit")


def error_curve(
    XtX: torch.Tensor,
    W: torch.Tensor,
    group_size: int,
    levels: Iterable[int],
    method: str = "osscar-fast",
    damp: float = 0.01,
    weights: bool = False,
) -> ErrorCurve:
    """Nested supports and their loss at every kept count in ``levels``, from one run.

    "osscar-fast" / "osscar" (the same curve: local search would break nestedness, so it belongs
    to the final solve at the chosen width) and "greedy" record the gradual run's support as it
    passes each level; the loss is the sum of its exact joint removal costs, i.e. the re-fit loss.
    "mp" / "mp+" use nested magnitude supports (no re-fit / re-fit). ``weights=True`` also returns
    the (p, m) weight at every level.
    """
    if method not in ("osscar", "osscar-fast", "greedy", "mp", "mp+"):
        raise ValueError(f'error_curve method {method!r} must be "osscar", "osscar-fast", "greedy", "mp" or "mp+"')
    layer = _prepare(XtX, W, group_size, damp)
    levels = sorted({_check_keep(k, layer.n) for k in levels})
    if not levels:
        raise ValueError("levels is empty: give at least one kept count")
    if method in ("mp", "mp+"):
        order = _magnitude_order(layer)
        supports = []
        for k in levels:
            mask = torch.zeros(layer.n, dtype=torch.bool, device=layer.H.device)
            mask[order[:k]] = True
            supports.append(mask)
        if method == "mp":
            losses = torch.tensor(_masked_losses(layer, order, levels), dtype=torch.float64)
            ws = [layer.W0 * m.repeat_interleave(layer.d)[:, None] for m in supports] if weights else []
        else:
            losses = _nested_refit_losses(layer, order, levels).cpu()
            ws = [_refit(layer, m)[0] for m in supports] if weights else []
    else:
        supports, loss_list, ws = _gradual_run(layer, levels[::-1], greedy=method == "greedy", weights=weights)
        supports, ws = supports[::-1], ws[::-1]
        losses = torch.tensor(loss_list[::-1], dtype=torch.float64)
    return ErrorCurve(tuple(levels), torch.stack(supports), losses, tuple(ws) if weights else None, method)
