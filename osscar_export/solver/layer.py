"""One layer problem in float64: validation, the exact re-fit on a support, closed-form losses.

``Layer`` holds the damped ``H = XᵀX + λI``, Ŵ with dead rows zeroed and ``G = HŴ``; everything
here is exact linear algebra on it, shared by the engines (``gradual``, ``swaps``, ``exact``)
and the public API (see docs/design.md, "Solver").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class Layer:
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
        return group_rows(groups, self.d)


def group_rows(groups: torch.Tensor, d: int) -> torch.Tensor:
    """Row indices of the given group indices (group-major, in the order given)."""
    groups = groups.reshape(-1)
    return (groups[:, None] * d + torch.arange(d, device=groups.device)).reshape(-1)


def prepare(XtX: torch.Tensor, W: torch.Tensor, group_size: int, damp: float) -> Layer:
    """Validate one problem and build its ``Layer``; a bad input raises a ValueError saying which."""
    if not isinstance(XtX, torch.Tensor) or not isinstance(W, torch.Tensor):
        raise TypeError(f"XtX and W must be torch tensors, got {type(XtX).__name__} and {type(W).__name__}")
    if XtX.ndim != 2 or XtX.shape[0] != XtX.shape[1]:
        raise ValueError(f"XtX must be a square (p, p) Gram matrix, got shape {tuple(XtX.shape)}")
    p = XtX.shape[0]
    if W.ndim != 2 or W.shape[0] != p or W.shape[1] == 0:
        raise ValueError(f"W must be input-major (p, m) = ({p}, m>0) to match XtX, got shape {tuple(W.shape)}")
    if XtX.device != W.device:
        raise ValueError(f"XtX is on {XtX.device} but W is on {W.device}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    group_size = int(group_size)
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
    return Layer(H, W0, group_size, dead)


def check_width(width: int, n: int) -> int:
    """``width`` as an int if it is an integral number of groups in ``0..n`` (numpy integers from
    an array of widths included); a ValueError otherwise, for floats and bools too."""
    if isinstance(width, bool) or not isinstance(width, numbers.Integral):
        raise ValueError(f"width must be an integer number of groups, got {width!r}")
    if not 0 <= width <= n:
        raise ValueError(f"width = {width} is out of range: the layer has n = {n} groups (0 <= width <= n)")
    return int(width)


def spd_inverse(H: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """Inverse of an SPD matrix by 2×2 block recursion on Schur complements.

    It costs 4/3 p³ flops against p³ for Cholesky + ``cholesky_inverse``, but they are GEMMs,
    which run faster than LAPACK's triangular inverse on a few CPU cores.
    """
    p = H.shape[0]
    if p <= leaf:
        return torch.cholesky_inverse(chol(H, "H"))
    h = p // 2
    Ai = spd_inverse(H[:h, :h], leaf)
    AiB = Ai @ H[:h, h:]
    Si = spd_inverse(torch.addmm(H[h:, h:], H[:h, h:].mT, AiB, alpha=-1.0), leaf)
    X = AiB @ Si
    out = torch.empty_like(H)
    torch.addmm(Ai, X, AiB.mT, out=out[:h, :h])
    out[:h, h:] = -X
    out[h:, :h] = -X.mT
    out[h:, h:] = Si
    return out


def chol(A: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of ``A``; a ValueError naming ``what`` when it is not positive definite."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info.max()) != 0:
        raise ValueError(f"{what} is not positive definite in float64: the Gram matrix is too ill-conditioned, raise damp")
    return L


def refit_support(layer: Layer, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Exact re-fit on a support from a fresh Cholesky: ``W_R = H_RR⁻¹ G_R`` and its loss.

    With ``B = H_RP Ŵ_P``: ``W_R = Ŵ_R + H_RR⁻¹ B`` and the loss is ``½ tr(Ŵ_Pᵀ S Ŵ_P)`` for the
    Schur complement S, i.e. ``½ (tr(Ŵ_Pᵀ H_PP Ŵ_P) − ‖L⁻¹B‖²)``: no full-energy cancellation.
    """
    rows = layer.rows(mask.nonzero())
    gone = layer.rows((~mask).nonzero())
    if gone.numel() == 0:
        return layer.W0.clone(), 0.0
    Wp = layer.W0[gone]
    masked = float((Wp * (layer.H[gone][:, gone] @ Wp)).sum())
    W = torch.zeros_like(layer.W0)
    if rows.numel() == 0:
        return W, 0.5 * masked
    L = chol(layer.H[rows][:, rows], "H restricted to the kept rows")
    Y = torch.linalg.solve_triangular(L, layer.H[rows][:, gone] @ Wp, upper=False)
    W[rows] = layer.W0[rows] + torch.linalg.solve_triangular(L.mT, Y, upper=True)
    return W, max(0.0, 0.5 * (masked - float((Y * Y).sum())))


def masked_losses(layer: Layer, order: torch.Tensor, widths: list[int]) -> list[float]:
    """Loss of Ŵ with all but the prefix ``order[:k]`` zeroed and no re-fit (the "mp" weight).

    The pruned sets are nested, so each width adds only the newly pruned block B:
    ``loss(P ∪ B) = loss(P) + tr(Ŵ_Bᵀ H_BP Ŵ_P) + ½ tr(Ŵ_Bᵀ H_BB Ŵ_B)``.
    """
    H, W0 = layer.H, layer.W0
    gone = order.flip(0)
    out, total, done = {}, 0.0, 0
    for k in sorted(widths, reverse=True):
        new, old = layer.rows(gone[done : layer.n - k]), layer.rows(gone[:done])
        Wn = W0[new]
        total += float((Wn * (H[new][:, old] @ W0[old])).sum()) + 0.5 * float((Wn * (H[new][:, new] @ Wn)).sum())
        out[k], done = total, layer.n - k
    return [out[k] for k in widths]


def nested_refit_losses(layer: Layer, order: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Re-fit loss of every prefix support ``order[:k]``, k in widths, from one Cholesky.

    The Cholesky factor of a leading block is the leading block of the factor, so with
    ``Y = L⁻¹ G`` (rows in that order) the loss of keeping the first r rows is ``½‖Y[r:]‖²``.
    """
    rows = layer.rows(order)
    L = chol(layer.H[rows][:, rows], "H")
    Y = torch.linalg.solve_triangular(L, layer.G[rows], upper=False)
    tail = (Y * Y).sum(dim=1).flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j≥i} ‖Y_j‖²
    tail = torch.cat([tail, tail.new_zeros(1)])
    return torch.stack([0.5 * tail[k * layer.d] for k in widths])


def with_dead(layer: Layer, live_mask: torch.Tensor, width: int) -> torch.Tensor:
    """Fill a support of live groups up to ``width`` groups with dead ones (lowest index first)."""
    mask = live_mask.clone()
    extra = width - int(mask.sum())
    if extra > 0:
        mask[layer.dead.nonzero().reshape(-1)[:extra]] = True
    return mask


def magnitude_order(layer: Layer) -> torch.Tensor:
    """Groups by descending L1 norm of their dense rows (the reference's MP), ties by index."""
    norms = layer.W0.abs().reshape(layer.n, -1).sum(dim=1)
    return torch.sort(-norms, stable=True).indices
