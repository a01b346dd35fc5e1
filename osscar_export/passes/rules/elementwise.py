"""Elementwise ops: unary maps, broadcasting binary ops, residual sums, dropout, new tensors.

Elementwise ops unify the dims they combine; a sum of channels made by two different weights is
a residual stream and is blocked (see docs/design.md, "Op rules").
"""

from __future__ import annotations

import torch
from torch import fx

from osscar_export.passes.rules.api import GraphAnalysis, Layout, Rule, bind, loc, size_eq, tensors

aten = torch.ops.aten
RESIDUAL = "residual stream: summed with channels of another producer (x + f(x)); kept fixed"


def ignore(a: GraphAnalysis, node: fx.Node) -> None:
    """Ops that only assert or query metadata: no tensor dims flow through them."""


def identity(a: GraphAnalysis, node: fx.Node) -> None:
    """Same shape as the first input, each element depends on the same position only."""
    a.set_layout(node, a.layout(node.args[0]))


def native_dropout(a: GraphAnalysis, node: fx.Node) -> None:
    """(output, mask), both laid out like the input."""
    a.set_layout(node, (a.layout(node.args[0]), a.layout(node.args[0])))


def elementwise(a: GraphAnalysis, node: fx.Node) -> None:
    a.set_layout(node, broadcast(a, node, tensors(a, node.args, list(node.kwargs.values()))))


def add_sub(a: GraphAnalysis, node: fx.Node) -> None:
    a.set_layout(node, broadcast(a, node, tensors(a, node.args, list(node.kwargs.values())), residual=True))


def broadcast(a: GraphAnalysis, node: fx.Node, operands: list[fx.Node], residual: bool = False) -> list[Layout]:
    """Output layouts of a broadcasting op: operand dims landing on one output dim are unified."""
    out_shape = a.shape(node)
    rank = len(out_shape)
    out: list[Layout | None] = [None] * rank
    for x in operands:
        xd, xs = a.layout(x), a.shape(x)
        off = rank - len(xs)
        for i, (lay, s) in enumerate(zip(xd, xs)):
            j = off + i
            if size_eq(s, 1) and not size_eq(out_shape[j], 1):
                continue
            if out[j] is None:
                out[j] = lay
                continue
            if residual and _two_producers(a, out[j], lay):
                a.block(out[j], node, RESIDUAL)
                a.block(lay, node, RESIDUAL)
            a.unify(out[j], lay, node)
    return [lay if lay is not None else a.fresh(s) for lay, s in zip(out, out_shape)]


def _two_producers(a: GraphAnalysis, x: Layout, y: Layout) -> bool:
    """Both summands carry channels made by different weights: a residual stream.

    Attention heads are exempt: a per-head bias computed by a layer (Swin-v2's cpb_mlp) is
    added to the scores of the heads it belongs to, which couples exactly those heads.
    """
    if set(a.leaves(x)) == set(a.leaves(y)):
        return False
    if a.has_flag(x, "head") or a.has_flag(y, "head"):
        return False
    return a.has_flag(x, "producer") and a.has_flag(y, "producer")


def factory(a: GraphAnalysis, node: fx.Node) -> None:
    """New tensors (zeros, ones, full, arange): fresh dims; list sizes are shape constants."""
    dims = a.fresh_dims(a.shape(node))
    a.set_layout(node, dims)
    size = bind(node).get("size")
    if isinstance(size, (list, tuple)) and len(size) == len(dims):
        where = loc(node, "size")
        for i, s in enumerate(size):
            if isinstance(s, int) and where is not None:
                a.shape_arg(node, where, i, [dims[i]])
    if node.target.overloadpacket in (aten.arange,):
        for lay in dims:
            a.block(lay, node, "arange length")


UNARY = [
    aten.relu, aten.relu_, aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.sigmoid, aten.sigmoid_,
    aten.tanh, aten.tanh_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_,
    aten.hardtanh, aten.hardtanh_, aten.relu6, aten.elu, aten.elu_, aten.leaky_relu, aten.leaky_relu_,
    aten.mish, aten.mish_, aten.softplus, aten.selu, aten.selu_, aten.celu, aten.log_sigmoid,
    aten.neg, aten.abs, aten.exp, aten.log, aten.log1p, aten.expm1, aten.sqrt, aten.rsqrt,
    aten.reciprocal, aten.sin, aten.cos, aten.erf, aten.square, aten.sign, aten.floor, aten.ceil,
    aten.round, aten.trunc, aten.logical_not, aten.bitwise_not, aten.isnan, aten.isinf, aten.logit,
    aten.clone, aten.contiguous, aten.alias, aten.detach, aten.detach_, aten.lift_fresh_copy,
    aten.dropout, aten.dropout_, aten.feature_dropout, aten.feature_dropout_, aten.alpha_dropout,
    aten.alpha_dropout_, aten.to, aten._to_copy, aten.type_as,
    aten.clamp, aten.clamp_, aten.clamp_min, aten.clamp_min_, aten.clamp_max, aten.clamp_max_,
    aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like, aten.randn_like,
    aten.fill, aten.fill_, aten.zero_, aten.nan_to_num,
]
BINARY = [
    aten.mul, aten.mul_, aten.div, aten.div_, aten.pow, aten.maximum, aten.minimum, aten.where,
    aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.__and__, aten.__or__, aten.__xor__,
    aten.logical_and, aten.logical_or, aten.bitwise_and, aten.bitwise_or, aten.masked_fill,
    aten.masked_fill_, aten.lerp, aten.addcmul, aten.addcdiv, aten.rsub, aten.fmod, aten.remainder,
    aten.floor_divide, aten.copysign, aten.atan2, aten.true_divide, aten.hypot,
    aten.max.other, aten.min.other,
]

RULES: list[tuple[list, Rule]] = [
    (UNARY, identity),
    ([aten.native_dropout], native_dropout),
    (BINARY, elementwise),
    ([aten.add, aten.add_, aten.sub, aten.sub_], add_sub),
    ([aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset,
      aten._assert_scalar, aten.sym_constrain_range_for_size, aten.sym_constrain_range, aten._assert_async], ignore),
    ([aten.zeros, aten.ones, aten.full, aten.empty, aten.arange, aten.new_zeros, aten.new_ones, aten.new_full,
      aten.new_empty, aten.scalar_tensor, aten.rand, aten.randn, aten.linspace, aten.eye, aten.empty_strided,
      aten.tensor], factory),
]
