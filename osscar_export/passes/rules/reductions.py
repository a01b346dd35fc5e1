"""Reductions and normalisations: the dims they run along are blocked (statistics span them).

Per-channel affine parameters (LayerNorm / GroupNorm / BatchNorm weight, bias, running stats)
follow the channel dim they scale (see docs/design.md, "Op rules").
"""

from __future__ import annotations

import torch
from torch import fx

from osscar_export.passes.rules.api import GraphAnalysis, Rule, bind, dims_list, norm_dim

aten = torch.ops.aten


def reduction(a: GraphAnalysis, node: fx.Node) -> None:
    xd = a.layout(node.args[0])
    b = bind(node)
    reduced = dims_list(b.get("dim", None), len(xd))
    keep = bool(b.get("keepdim", False))
    op = node.target.overloadpacket.__name__
    for d in reduced:
        a.block(xd[d], node, f"reduced over by {op}")
    out = [a.fresh(1) if (i in reduced) else lay for i, lay in enumerate(xd) if keep or i not in reduced]
    val = node.meta["val"]
    a.set_layout(node, tuple(list(out) for _ in val) if isinstance(val, (tuple, list)) else out)


def normalise_over(a: GraphAnalysis, node: fx.Node) -> None:
    """softmax / log_softmax / cumsum / sort / topk: each output element depends on the whole dim."""
    x = node.args[0]
    xd = a.layout(x)
    d = norm_dim(bind(node)["dim"], len(xd))
    a.block(xd[d], node, f"{node.target.overloadpacket.__name__} runs along this dim")
    val = node.meta["val"]
    out = list(xd)
    first = val[0] if isinstance(val, (tuple, list)) else val
    if tuple(first.shape) != tuple(x.meta["val"].shape):
        out[d] = a.fresh(a.shape(node, 0 if first is not val else None)[d])
    a.set_layout(node, tuple(list(out) for _ in val) if isinstance(val, (tuple, list)) else out)


def layer_norm(a: GraphAnalysis, node: fx.Node) -> None:
    b = bind(node)
    xd = a.layout(b["input"])
    k = len(b["normalized_shape"])
    for lay in xd[-k:]:
        a.block(lay, node, "normalised over by layer_norm / rms_norm (statistics span the dim)")
    for p in (b.get("weight"), b.get("bias")):
        if a.is_tensor(p):
            for lay, w in zip(xd[-k:], a.layout(p)):
                a.unify(lay, w, node)
    val = node.meta["val"]
    if isinstance(val, (tuple, list)):  # native_layer_norm: (out, mean, rstd)
        a.set_layout(node, (xd,) + tuple(a.fresh_dims(a.shape(node, i)) for i in range(1, len(val))))
    else:
        a.set_layout(node, xd)


def group_norm(a: GraphAnalysis, node: fx.Node) -> None:
    b = bind(node)
    xd = a.layout(b["input"])
    a.block(xd[1], node, "normalised over by group_norm (statistics span channel groups)")
    for p in (b.get("weight"), b.get("bias")):
        if a.is_tensor(p):
            a.unify(xd[1], a.layout(p)[0], node)
    a.set_layout(node, xd)


def batch_norm(a: GraphAnalysis, node: fx.Node) -> None:
    """Per-channel affine: weight, bias and running stats follow the channel dim."""
    b = bind(node)
    xd = a.layout(b["input"])
    ch = xd[1] if len(xd) > 1 else xd[0]
    for key in ("weight", "bias", "running_mean", "running_var"):
        p = b.get(key)
        if a.is_tensor(p):
            a.unify(ch, a.layout(p)[0], node)
    val = node.meta["val"]
    if isinstance(val, (tuple, list)):
        a.set_layout(node, (xd,) + tuple(
            [ch] if v.ndim == 1 and v.shape[0] == val[0].shape[1] else a.fresh_dims(a.shape(node, i + 1))
            for i, v in enumerate(val[1:])
        ))
    else:
        a.set_layout(node, xd)


def instance_norm(a: GraphAnalysis, node: fx.Node) -> None:
    b = bind(node)
    xd = a.layout(b["input"])
    for lay in xd[2:]:
        a.block(lay, node, "normalised over by instance_norm")
    for key in ("weight", "bias", "running_mean", "running_var"):
        p = b.get(key)
        if a.is_tensor(p):
            a.unify(xd[1], a.layout(p)[0], node)
    a.set_layout(node, xd)


RULES: list[tuple[list, Rule]] = [
    ([aten.mean, aten.sum, aten.amax, aten.amin, aten.max, aten.min, aten.argmax, aten.argmin, aten.var, aten.std,
      aten.var_mean, aten.std_mean, aten.norm, aten.linalg_vector_norm, aten.logsumexp, aten.prod, aten.any,
      aten.all], reduction),
    ([aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum, aten.cumprod, aten.sort,
      aten.argsort, aten.topk], normalise_over),
    ([aten.layer_norm, aten.native_layer_norm, aten.rms_norm], layer_norm),
    ([aten.group_norm, aten.native_group_norm], group_norm),
    ([aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
      aten.native_batch_norm], batch_norm),
    ([aten.instance_norm], instance_norm),
]
