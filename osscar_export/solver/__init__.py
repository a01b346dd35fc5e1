"""The OSSCAR layer problem: which input groups of one layer survive, and their re-fit.

For damped ``H = XᵀX + λI`` and ``G = H Ŵ`` the loss of a weight ``W'`` is
``½ tr((W'−Ŵ)ᵀ H (W'−Ŵ)) = f(W') − f(Ŵ) ≥ 0``; for a kept row set R its minimum is reached by
``W_R = H_RR⁻¹ G_R`` (zero elsewhere). Every method picks a support of ``width`` groups (a mask);
all but "mp" then return that re-fit. See docs/design.md, "Solver".

The algebra is exact (block Schur complements, float64, batched over groups) and lives in one
module per engine: ``layer`` (validation, re-fit, closed-form losses), ``gradual`` (backward
elimination: "osscar-fast", "greedy", error curves), ``swaps`` (the local search of "osscar")
and ``exact`` (the enumeration oracle). This module is the public API.

Dead inputs (zero diagonal of ``XtX``) never fire: their weight rows are zeroed before ``G`` is
formed (as the reference does), so their groups cost nothing and go first. The loss is therefore
measured against Ŵ with those rows zeroed, which changes no layer output.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from osscar_export.solver.exact import exact_support
from osscar_export.solver.gradual import gradual_run
from osscar_export.solver.layer import (
    check_width,
    magnitude_order,
    masked_losses,
    nested_refit_losses,
    prepare,
    refit_support,
)
from osscar_export.solver.swaps import local_search

METHODS = ("osscar", "osscar-fast", "greedy", "mp", "mp+", "exact")
CURVE_METHODS = ("osscar", "osscar-fast", "greedy", "mp", "mp+")  # "exact" has no nested supports


@dataclass(frozen=True)
class LayerSolution:
    """The support (``mask``, bool (n,)), the weight on it (float64 (p, m)) and its loss."""

    mask: torch.Tensor
    weight: torch.Tensor
    loss: float
    method: str


@dataclass(frozen=True)
class ErrorCurve:
    """Loss per width; ``masks[i]`` is the support at ``levels[i]`` (ascending, nested)."""

    levels: tuple[int, ...]
    masks: torch.Tensor  # bool (len(levels), n); masks[i] ⊆ masks[i+1]
    losses: torch.Tensor  # float64 (len(levels),)
    weights: tuple[torch.Tensor, ...] | None  # float64 (p, m) per level when asked for
    method: str

    def loss_at(self, width: int) -> float:
        """Loss at one recorded width."""
        if width not in self.levels:
            raise ValueError(f"width {width} is not a level of this curve (levels {list(self.levels)})")
        return float(self.losses[self.levels.index(width)])


def prune_layer(
    XtX: torch.Tensor,
    W: torch.Tensor,
    group_size: int,
    width: int,
    method: str = "osscar",
    damp: float = 0.01,
) -> LayerSolution:
    """Keep ``width`` of the ``p // group_size`` input groups of one layer and re-fit it.

    ``XtX`` is the undamped (p, p) Gram of the layer inputs, ``W`` the dense weight input-major
    (Linear: ``weight.T``; Conv2d: ``weight.flatten(1).T``, groups = input channels,
    ``group_size = kh·kw``). Methods: "osscar" (gradual pruning, then swap local search),
    "osscar-fast" (gradual only), "greedy" (one group at a time, exact OBS), "mp" (largest group
    L1 norms, no re-fit), "mp+" (same support, re-fit), "exact" (enumeration; small layers only).
    The returned weight is float64; cast it when writing it into the layer.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    layer = prepare(XtX, W, group_size, damp)
    width = check_width(width, layer.n)
    if method in ("mp", "mp+"):
        order = magnitude_order(layer)
        mask = torch.zeros(layer.n, dtype=torch.bool, device=layer.H.device)
        mask[order[:width]] = True
        if method == "mp":
            weight = layer.W0 * mask.repeat_interleave(layer.d)[:, None]
            return LayerSolution(mask, weight, masked_losses(layer, order, [width])[0], method)
    elif method == "exact":
        mask = exact_support(layer, width)
    else:
        # The gradual engine's weight is the exact re-fit on its support (joint Schur downdates)
        # and its loss the sum of the exact removal costs; tests check both against a fresh re-fit.
        masks, losses, ws = gradual_run(layer, [width], greedy=method == "greedy", weights=True)
        mask, loss, weight = masks[0], losses[0], ws[0]
        if method == "osscar":
            better = local_search(layer, mask, loss)
            if not torch.equal(better, mask):
                w, cost = refit_support(layer, better)
                if cost < loss:  # the search only accepts strict gains; this guards rounding
                    mask, weight, loss = better, w, cost
        return LayerSolution(mask, weight, loss, method)
    weight, loss = refit_support(layer, mask)
    return LayerSolution(mask, weight, loss, method)


def refit(XtX: torch.Tensor, W: torch.Tensor, group_size: int, mask: torch.Tensor, damp: float = 0.01) -> LayerSolution:
    """The exact re-fit of one layer on a support chosen elsewhere (``mask``: bool per group), e.g.
    a width of an error curve: what every re-fitting method does once it has its support."""
    layer = prepare(XtX, W, group_size, damp)
    mask = torch.as_tensor(mask, dtype=torch.bool, device=layer.H.device).reshape(-1)
    if mask.numel() != layer.n:
        raise ValueError(f"mask has {mask.numel()} entries for {layer.n} groups")
    weight, loss = refit_support(layer, mask)
    return LayerSolution(mask, weight, loss, "refit")


def error_curve(
    XtX: torch.Tensor,
    W: torch.Tensor,
    group_size: int,
    levels: Iterable[int],
    method: str = "osscar-fast",
    damp: float = 0.01,
    weights: bool = False,
) -> ErrorCurve:
    """Nested supports and their loss at every width in ``levels``, from one run.

    "osscar-fast" / "osscar" (the same curve: local search would break nestedness, so it belongs
    to the final solve at the chosen width) and "greedy" record the gradual run's support as it
    passes each width; the loss is the sum of its exact joint removal costs, i.e. the re-fit loss.
    "mp" / "mp+" use nested magnitude supports (no re-fit / re-fit). ``weights=True`` also returns
    the (p, m) weight at every width.
    """
    if method not in CURVE_METHODS:
        raise ValueError(f"error_curve method {method!r} must be one of {CURVE_METHODS}")
    layer = prepare(XtX, W, group_size, damp)
    levels = sorted({check_width(k, layer.n) for k in levels})
    if not levels:
        raise ValueError("levels is empty: give at least one width")
    if method in ("mp", "mp+"):
        order = magnitude_order(layer)
        masks = []
        for k in levels:
            mask = torch.zeros(layer.n, dtype=torch.bool, device=layer.H.device)
            mask[order[:k]] = True
            masks.append(mask)
        if method == "mp":
            losses = torch.tensor(masked_losses(layer, order, levels), dtype=torch.float64)
            ws = [layer.W0 * m.repeat_interleave(layer.d)[:, None] for m in masks] if weights else []
        else:
            losses = nested_refit_losses(layer, order, levels).cpu()
            ws = [refit_support(layer, m)[0] for m in masks] if weights else []
    else:
        masks, loss_list, ws = gradual_run(layer, levels[::-1], greedy=method == "greedy", weights=weights)
        masks, ws = masks[::-1], ws[::-1]
        losses = torch.tensor(loss_list[::-1], dtype=torch.float64)
    return ErrorCurve(tuple(levels), torch.stack(masks), losses, tuple(ws) if weights else None, method)
