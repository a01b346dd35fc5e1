"""Layers with weights: linear, convolution, matrix products, embedding.

A weight's input columns contracting a dim make it a *consumer* of that dim, its output rows a
*producer*; a depthwise conv's rows *follow* the channels they scale. Products of two
activations (q·kᵀ) have no weight to re-fit, so their contracted dim is blocked (see
docs/design.md, "Op rules").
"""

from __future__ import annotations

import math

import torch
from torch import fx

from osscar_export.passes.rules.api import GraphAnalysis, Rule, bind, broadcast_batch, broadcast_into, loc, size_eq
from osscar_export.passes.rules.attention import gqa_check

aten = torch.ops.aten


def linear(a: GraphAnalysis, node: fx.Node) -> None:
    """y = x Wᵀ + b: x's last dim is contracted with W's columns (consumer), y's from W's rows."""
    b = bind(node)
    x, w, bias = b["input"], b["weight"], b["bias"]
    xd, wd = a.layout(x), a.layout(w)
    a.unify(xd[-1], wd[-1], node)
    if a.param_fqn(w) is not None and len(wd) == 2:
        a.tag(w, 1, "consumer", node, op="linear")
        a.tag(w, 0, "producer", node)
        if a.is_tensor(bias) and a.param_fqn(bias) is not None:
            a.tag(bias, 0, "producer", node)
    else:
        a.block(xd[-1], node, "contracted with a weight that is not a parameter")
    if a.is_tensor(bias):
        a.unify(a.layout(bias)[-1], wd[0], node)
    a.set_layout(node, xd[:-1] + [wd[0]])


def conv(a: GraphAnalysis, node: fx.Node) -> None:
    """convNd / convolution: channel dim contracted with weight dim 1 (depthwise: followed)."""
    b = bind(node)
    x, w, bias = b["input"], b["weight"], b["bias"]
    groups = b.get("groups", 1)
    transposed = bool(b.get("transposed", False)) or node.target.overloadpacket in (
        aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
    xd, wd = a.layout(x), a.layout(w)
    xs, ws = a.shape(x), a.shape(w)
    ch = 0 if len(xs) == len(ws) - 1 else 1
    spatial = len(ws) - 2
    out_shape = a.shape(node)
    out = xd[:ch] + [None] + a.fresh_dims(out_shape[ch + 1 :])
    op = f"conv{spatial}d"
    if a.param_fqn(w) is None or not isinstance(groups, int):
        a.block(xd[ch], node, "convolution with a computed weight or symbolic groups")
        out[ch] = a.fresh(out_shape[ch])
        a.block(out[ch], node, "convolution with a computed weight or symbolic groups")
        a.set_layout(node, out)
        return
    if transposed:
        a.unify(xd[ch], wd[0], node)
        a.block(xd[ch], node, "input channels of a transposed convolution (its weight is not re-fit)")
        if groups == 1:
            out[ch] = wd[1]
            a.tag(w, 1, "producer", node)
        else:
            out[ch] = a.fresh(out_shape[ch])
            a.block(out[ch], node, "grouped transposed convolution")
        if a.is_tensor(bias):
            a.unify(a.layout(bias)[0], out[ch], node)
            a.tag(bias, 0, "producer", node)
        a.set_layout(node, out)
        return
    c_in, c_out = xs[ch], ws[0]
    depthwise = groups != 1 and size_eq(groups, c_in) and ws[1] == 1 and size_eq(c_out, c_in)
    kernel = math.prod(int(s) for s in ws[2:])
    if groups == 1:
        a.unify(xd[ch], wd[1], node)
        a.tag(w, 1, "consumer", node, op=op, kernel=kernel)
        a.tag(w, 0, "producer", node)
        out[ch] = wd[0]
    elif size_eq(groups, c_in) and ws[1] == 1:  # depthwise (optionally with a channel multiplier)
        if size_eq(c_out, c_in):
            a.unify(xd[ch], wd[0], node)
            a.tag(w, 0, "follower", node)
        else:
            parts = a.split(wd[0], [c_in, c_out // c_in], node)
            if parts is None:
                a.block(wd[0], node, "depthwise multiplier layout")
            else:
                a.unify(parts[0], xd[ch], node)
                a.block(parts[1], node, "depthwise channel multiplier")
            a.tag(w, 0, "producer", node)
        out[ch] = wd[0]
        a.shape_arg(node, loc(node, "groups"), None, [xd[ch]])
    else:  # grouped: the within-group channels are pruned alike in every group
        in_parts = a.split(xd[ch], [groups, c_in // groups], node)
        out_parts = a.split(wd[0], [groups, c_out // groups], node)
        for parts, lay in ((in_parts, xd[ch]), (out_parts, wd[0])):
            if parts is None:
                a.block(lay, node, "grouped convolution channel layout")
            else:
                a.block(parts[0], node, f"channel groups of a grouped convolution (groups={groups})")
        if in_parts is not None:
            a.unify(in_parts[1], wd[1], node)
            a.tag(w, 1, "consumer", node, op=op, kernel=kernel, grouped=True)
        else:
            a.block(wd[1], node, "grouped convolution channel layout")
        a.tag(w, 0, "producer", node)
        out[ch] = wd[0]
    if a.is_tensor(bias):
        a.unify(a.layout(bias)[0], wd[0], node)
        a.tag(bias, 0, "follower" if depthwise else "producer", node)
    a.set_layout(node, out)


def matmul(a: GraphAnalysis, node: fx.Node) -> None:
    """mm / bmm / matmul / addmm / baddbmm: a parameter operand makes a consumer + producer."""
    b = bind(node)
    packet = node.target.overloadpacket
    if packet in (aten.addmm, aten.baddbmm, aten.addbmm):
        mat = packet is aten.addmm
        left, right, extra = b["mat1" if mat else "batch1"], b["mat2" if mat else "batch2"], b["self"]
    else:
        left, right, extra = b["self"], b["mat2" if "mat2" in b else "other"], None
    ld, rd = a.layout(left), a.layout(right)
    ls, rs = a.shape(left), a.shape(right)
    lp, rp = a.param_fqn(left) is not None, a.param_fqn(right) is not None
    if len(rs) == 1:
        contracted = (ld[-1], rd[0])
        out = ld[:-1]
    elif len(ls) == 1:
        contracted = (ld[0], rd[-2])
        out = rd[:-2] + [rd[-1]]
    else:
        batch = broadcast_batch(a, node, ld[:-2], ls[:-2], rd[:-2], rs[:-2])
        if not lp and not rp and len(ls) >= 3 and len(rs) >= 3:
            gqa_check(a, node, rd[:-2])
            for lay in batch:
                a.flag(lay, "head")
        contracted = (ld[-1], rd[-2])
        out = batch + [ld[-2], rd[-1]]
    a.unify(*contracted, node)
    if rp and not lp and len(rs) == 2:
        a.tag(right, 0, "consumer", node, op="matmul")
        a.tag(right, 1, "producer", node)
        if a.is_tensor(extra) and a.param_fqn(extra) is not None and len(a.shape(extra)) == 1:
            a.tag(extra, 0, "producer", node)
    elif lp and not rp and len(ls) == 2:
        a.tag(left, 1, "consumer", node, op="linear")
        a.tag(left, 0, "producer", node)
    else:
        a.block(contracted[0], node, "contracted between two activations (e.g. q·kᵀ): no weight to re-fit")
        if len(rs) >= 2:
            a.block(rd[-1], node, "free dim of an activation product (e.g. head_dim of values): pruned only with whole heads")
    if a.is_tensor(extra):
        out = broadcast_into(a, node, out, extra)
    a.set_layout(node, out)


def embedding(a: GraphAnalysis, node: fx.Node) -> None:
    """A lookup: rows are picked (blocked), the embedding dim is produced by the table."""
    b = bind(node)
    w, idx = b["weight"], b["indices"]
    wd = a.layout(w)
    a.block(wd[0], node, "rows picked by an embedding lookup")
    if a.param_fqn(w) is not None:
        a.tag(w, 1, "producer", node)
    a.set_layout(node, a.layout(idx) + [wd[1]])


RULES: list[tuple[list, Rule]] = [
    ([aten.linear], linear),
    ([aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution, aten.conv_transpose1d,
      aten.conv_transpose2d, aten.conv_transpose3d], conv),
    ([aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm], matmul),
    ([aten.embedding], embedding),
]
