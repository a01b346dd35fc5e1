"""Small correlated layer problems for the solver tests (not white noise: mixed, decaying scales)."""

from __future__ import annotations

import torch


def correlated_layer(
    p: int, m: int, seed: int, samples: int | None = None, dead: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(XtX, W)`` in float64 from inputs ``X = (Z · s) A · c`` with ``dead`` zero inputs.

    Latent scales decay as ``(1+i)^-0.8``, A mixes them, c gives inputs different magnitudes, so
    inputs are correlated and H is far from diagonal. ``samples < p`` gives a singular Gram.
    """
    g = torch.Generator().manual_seed(seed)
    N = samples or 2 * p
    Z = torch.randn(N, p, generator=g, dtype=torch.float64) * (1.0 + torch.arange(p, dtype=torch.float64)) ** -0.8
    A = torch.randn(p, p, generator=g, dtype=torch.float64)
    X = (Z @ A) * torch.exp(0.5 * torch.randn(p, generator=g, dtype=torch.float64))
    if dead:
        X[:, torch.randperm(p, generator=g)[:dead]] = 0
    W = torch.randn(p, m, generator=g, dtype=torch.float64)
    return X.T @ X, W


def damped(XtX: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``XtX + λI`` with the solver's λ = damp · mean(diag XtX)."""
    return XtX + damp * float(torch.diagonal(XtX).mean()) * torch.eye(XtX.shape[0], dtype=XtX.dtype)


def objective_increase(H: torch.Tensor, W_new: torch.Tensor, W_dense: torch.Tensor) -> float:
    """``½ tr((W'−Ŵ)ᵀ H (W'−Ŵ))``, written out directly."""
    diff = W_new - W_dense
    return 0.5 * float(torch.trace(diff.T @ H @ diff))
