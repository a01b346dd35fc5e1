"""The op table: how each ATen op maps the dims of its inputs to the dims of its outputs.

One entry per op (overload packet, or a specific overload). A rule reads its inputs' layouts
from the analysis, unifies the dims the op couples, records parameter roles (producer rows,
consumer columns, followers) and integer constants that depend on a width (view shapes, split
sizes, conv ``groups``), and sets the output layouts. Dims a rule cannot follow exactly are
blocked with a reason. Ops absent from this table block every dim they touch (structures.py).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
from torch import fx

from osscar_export.passes.structures import GQA_QUERY, RESIDUAL, GraphAnalysis, Layout, size_eq, to_size

aten = torch.ops.aten
Rule = Callable[["GraphAnalysis", fx.Node], None]
OP_RULES: dict[Any, Rule] = {}
MAXINT = 2**62


def rule_for(target: Any) -> Rule | None:
    rule = OP_RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = OP_RULES.get(target.overloadpacket)
    return rule


def _register(ops: list[Any], rule: Rule) -> None:
    for op in ops:
        OP_RULES[op] = rule


def bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def loc(node: fx.Node, name: str) -> int | str | None:
    """Where argument ``name`` sits in the node: positional index, kwarg name, or None (default)."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if i < len(node.args) and not a.kwarg_only:
                return i
            return name if name in node.kwargs else None
    return None


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _dims_list(d: Any, rank: int) -> list[int]:
    if d is None or d == []:
        return list(range(rank))
    if isinstance(d, int):
        d = [d]
    return sorted(_dim(x, rank) for x in d)


def _tensors(a: GraphAnalysis, *xs: Any) -> list[fx.Node]:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_tensors(a, *x))
        elif a.is_tensor(x):
            out.append(x)
    return out


# ----------------------------------------------------------------------------- generic rules


def ignore(a: GraphAnalysis, node: fx.Node) -> None:
    """Ops that only assert or query metadata: no tensor dims flow through them."""


def identity(a: GraphAnalysis, node: fx.Node) -> None:
    """Same shape as the first input, each element depends on the same position only."""
    a.dims[node] = list(a.dims[node.args[0]])


def elementwise(a: GraphAnalysis, node: fx.Node) -> None:
    a.dims[node] = broadcast(a, node, _tensors(a, node.args, list(node.kwargs.values())))


def add_sub(a: GraphAnalysis, node: fx.Node) -> None:
    a.dims[node] = broadcast(a, node, _tensors(a, node.args, list(node.kwargs.values())), residual=True)


def broadcast(a: GraphAnalysis, node: fx.Node, operands: list[fx.Node], residual: bool = False) -> list[Layout]:
    out_shape = a.shape(node)
    rank = len(out_shape)
    out: list[Any] = [None] * rank
    for x in operands:
        xd, xs = a.dims[x], a.shape(x)
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
    lx, ly = set(a.space.leaves(x)), set(a.space.leaves(y))
    if lx == ly:
        return False
    flagged = lambda ls, f: any(a.space.has_flag(leaf, f) for leaf in ls)  # noqa: E731
    if flagged(lx, "head") or flagged(ly, "head"):
        return False
    return flagged(lx, "producer") and flagged(ly, "producer")


def block_all(reason: str) -> Rule:
    """A deliberate table entry for ops whose dim mapping is not followed (gather, scatter...)."""

    def rule(a: GraphAnalysis, node: fx.Node) -> None:
        a.block_everything(node, f"{node.target}: {reason}")

    return rule


def factory(a: GraphAnalysis, node: fx.Node) -> None:
    """New tensors (zeros, ones, full, arange): fresh dims; list sizes are shape constants."""
    dims = a.fresh_dims(a.shape(node))
    a.dims[node] = dims
    b = bind(node)
    size = b.get("size")
    if isinstance(size, (list, tuple)) and len(size) == len(dims):
        where = loc(node, "size")
        for i, s in enumerate(size):
            if isinstance(s, int) and where is not None:
                a.shape_arg(node, where, i, [dims[i]])
    if node.target.overloadpacket in (aten.arange,):
        for lay in dims:
            a.block(lay, node, "arange length")


# ----------------------------------------------------------------------------- shapes


def reshape(a: GraphAnalysis, node: fx.Node) -> None:
    """view / reshape / flatten / squeeze / unsqueeze: regroup the row-major product of dims."""
    x = node.args[0]
    out_shape = a.shape(node)
    xd = a.dims[x]
    whole: Layout = ("P", tuple(xd)) if xd else a.fresh(1)
    parts = a.space.split(whole, list(out_shape), a.where(node))
    if parts is None:
        for lay in xd:
            a.block(lay, node, f"reshape {tuple(a.shape(x))} -> {tuple(out_shape)} does not follow the dim layout")
        parts = a.fresh_dims(out_shape)
        for lay in parts:
            a.block(lay, node, "output of an unfollowed reshape")
    a.dims[node] = parts
    packet = node.target.overloadpacket if isinstance(node.target, torch._ops.OpOverload) else None
    name = {aten.view: "size", aten.reshape: "shape", aten._unsafe_view: "size", aten.unflatten: "sizes"}.get(packet)
    if name is None:
        return
    sizes = bind(node)[name]
    where = loc(node, name)
    first = _dim(bind(node)["dim"], len(a.shape(x))) if packet is aten.unflatten else 0
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s != -1 and where is not None:
            a.shape_arg(node, where, i, [parts[first + i]])


def permute(a: GraphAnalysis, node: fx.Node) -> None:
    xd = a.dims[node.args[0]]
    rank = len(xd)
    packet = node.target.overloadpacket
    if packet is aten.permute:
        order = [_dim(d, rank) for d in bind(node)["dims"]]
    elif packet in (aten.t, aten.numpy_T, aten.mT, aten.adjoint):
        order = list(range(rank))
        if rank >= 2:
            order[-1], order[-2] = order[-2], order[-1]
    elif packet is aten.movedim:
        b = bind(node)
        src = [_dim(d, rank) for d in (b["source"] if isinstance(b["source"], list) else [b["source"]])]
        dst = [_dim(d, rank) for d in (b["destination"] if isinstance(b["destination"], list) else [b["destination"]])]
        order = [None] * rank
        for s, d in zip(src, dst):
            order[d] = s
        rest = iter(i for i in range(rank) if i not in src)
        order = [o if o is not None else next(rest) for o in order]
    else:  # transpose / swapaxes / swapdims
        b = bind(node)
        d0, d1 = (_dim(b[k], rank) for k in [k for k in b if k != "self"][:2])
        order = list(range(rank))
        order[d0], order[d1] = order[d1], order[d0]
    a.dims[node] = [xd[i] for i in order]


def expand(a: GraphAnalysis, node: fx.Node) -> None:
    """Broadcast copies: a dim expanded from size 1 is a fresh dim whose values are shared."""
    x = node.args[0]
    xd, xs = a.dims[x], a.shape(x)
    out_shape = a.shape(node)
    lead = len(out_shape) - len(xs)
    out: list[Layout] = []
    for j, s in enumerate(out_shape):
        i = j - lead
        if i >= 0 and (size_eq(xs[i], s)):
            out.append(xd[i])
        else:
            out.append(a.fresh(s, "broadcast"))
    a.dims[node] = out
    b = bind(node)
    if node.target.overloadpacket in (aten.expand, aten.broadcast_to):
        name = "size"
        where = loc(node, name)
        for j, s in enumerate(b[name]):
            if isinstance(s, int) and s != -1 and where is not None:
                a.shape_arg(node, where, j, [out[j]])


def repeat(a: GraphAnalysis, node: fx.Node) -> None:
    x = node.args[0]
    xd = a.dims[x]
    reps = list(bind(node)["repeats"])
    lead = len(reps) - len(xd)
    out: list[Layout] = []
    for j, r in enumerate(reps):
        i = j - lead
        if i < 0:
            out.append(a.fresh(r, "broadcast"))
        elif r == 1:
            out.append(xd[i])
        else:
            copies = a.fresh(r, "broadcast")
            a.block(copies, node, "repeat count")
            out.append(("P", (copies, xd[i])))
    a.dims[node] = out


def cat(a: GraphAnalysis, node: fx.Node) -> None:
    """Concatenation: the cat dim is a concatenation of the inputs' dims; the rest unify."""
    b = bind(node)
    ins = [t for t in b["tensors"] if a.is_tensor(t) and a.shape(t) != (0,)]
    rank = len(a.shape(node))
    d = _dim(b["dim"], rank)
    out: list[Any] = [None] * rank
    for t in ins:
        for j, lay in enumerate(a.dims[t]):
            if j == d:
                continue
            if out[j] is None:
                out[j] = lay
            else:
                a.unify(out[j], lay, node)
    out[d] = ("C", tuple(a.dims[t][d] for t in ins)) if len(ins) > 1 else a.dims[ins[0]][d]
    a.dims[node] = out


def stack(a: GraphAnalysis, node: fx.Node) -> None:
    b = bind(node)
    ins = [t for t in b["tensors"] if a.is_tensor(t)]
    rank = len(a.shape(node))
    d = _dim(b["dim"], rank)
    base = list(a.dims[ins[0]])
    for t in ins[1:]:
        for x, y in zip(base, a.dims[t]):
            a.unify(x, y, node)
    a.dims[node] = base[:d] + [a.fresh(len(ins))] + base[d:]


def split(a: GraphAnalysis, node: fx.Node) -> None:
    """split / split_with_sizes / chunk / tensor_split: the dim becomes a concatenation of parts."""
    x = node.args[0]
    b = bind(node)
    rank = len(a.shape(x))
    d = _dim(b.get("dim", 0) or 0, rank)
    vals = node.meta["val"]
    sizes = [to_size(v.shape[d]) for v in vals]
    xd = a.dims[x]
    parts = a.space.split_concat(xd[d], sizes)
    if parts is None:
        a.block(xd[d], node, f"split into {sizes} does not follow the dim layout")
        parts = [a.fresh(s) for s in sizes]
        for p in parts:
            a.block(p, node, "output of an unfollowed split")
    a.dims[node] = tuple(xd[:d] + [p] + xd[d + 1 :] for p in parts)
    packet = node.target.overloadpacket
    if packet is aten.split and isinstance(b["split_size"], int):
        a.shape_arg(node, loc(node, "split_size"), None, parts, uniform=True)
    elif packet is aten.split_with_sizes:
        where = loc(node, "split_sizes")
        for i, s in enumerate(b["split_sizes"]):
            if isinstance(s, int):
                a.shape_arg(node, where, i, [parts[i]])
    elif packet is aten.tensor_split:
        a.block(xd[d], node, "tensor_split indices")


def unbind(a: GraphAnalysis, node: fx.Node) -> None:
    x = node.args[0]
    xd = a.dims[x]
    d = _dim(bind(node)["dim"], len(xd))
    a.block(xd[d], node, "unbind picks single indices of this dim")
    rest = xd[:d] + xd[d + 1 :]
    a.dims[node] = tuple(list(rest) for _ in node.meta["val"])


def select(a: GraphAnalysis, node: fx.Node) -> None:
    x = node.args[0]
    xd = a.dims[x]
    d = _dim(bind(node)["dim"], len(xd))
    a.block(xd[d], node, "select picks one index of this dim")
    a.dims[node] = xd[:d] + xd[d + 1 :]


def slice_(a: GraphAnalysis, node: fx.Node) -> None:
    """A contiguous slice splits the dim into (before, kept, after); its bounds are shape constants."""
    x = node.args[0]
    xd, xs = a.dims[x], a.shape(x)
    b = bind(node)
    d = _dim(b["dim"], len(xd))
    n = xs[d]
    packet = node.target.overloadpacket
    if packet is aten.narrow:
        start, length = b["start"], b["length"]
        end = start + length if isinstance(start, int) and isinstance(length, int) else None
        step = 1
    else:
        start, end, step = b["start"], b["end"], b["step"]
        start = 0 if start is None else start
        end = MAXINT if end is None else end
    out = list(xd)
    if not (isinstance(start, int) and isinstance(end, int) and isinstance(n, int) and step == 1 and start >= 0 and end >= 0):
        a.block(xd[d], node, "slice with a step, negative or symbolic bounds")
        out[d] = a.fresh(a.shape(node)[d])
        a.block(out[d], node, "output of an unfollowed slice")
        a.dims[node] = out
        return
    end = min(end, n)
    if start == 0 and end == n:
        a.dims[node] = out
        return
    sizes = [s for s in (start, end - start, n - end) if s > 0]
    parts = a.space.split_concat(xd[d], sizes)
    if parts is None or end <= start:
        a.block(xd[d], node, "slice bounds do not follow the dim layout")
        out[d] = a.fresh(a.shape(node)[d])
        a.block(out[d], node, "output of an unfollowed slice")
        a.dims[node] = out
        return
    pre = parts[0] if start > 0 else None
    mid = parts[1] if start > 0 else parts[0]
    out[d] = mid
    a.dims[node] = out
    if packet is aten.narrow:
        if pre is not None:
            a.shape_arg(node, loc(node, "start"), None, [pre])
        a.shape_arg(node, loc(node, "length"), None, [mid])
        return
    if pre is not None and loc(node, "start") is not None:
        a.shape_arg(node, loc(node, "start"), None, [pre])
    if end < n and loc(node, "end") is not None and not size_eq(b["end"], MAXINT):
        a.shape_arg(node, loc(node, "end"), None, [("C", (pre, mid)) if pre is not None else mid])


def getitem(a: GraphAnalysis, node: fx.Node) -> None:
    src, i = node.args
    dims = a.dims.get(src)
    if not isinstance(dims, tuple) or dims[i] is None:
        if isinstance(node.meta.get("val"), torch.Tensor):
            a.block_everything(node, "getitem of an unanalysed value")
        return
    a.dims[node] = list(dims[i])


# ----------------------------------------------------------------------------- reductions, norms


def reduction(a: GraphAnalysis, node: fx.Node) -> None:
    x = node.args[0]
    xd = a.dims[x]
    b = bind(node)
    dim = b.get("dim", None)
    reduced = _dims_list(dim, len(xd))
    keep = bool(b.get("keepdim", False))
    op = node.target.overloadpacket.__name__
    for d in reduced:
        a.block(xd[d], node, f"reduced over by {op}")
    out = [a.fresh(1) if (i in reduced) else lay for i, lay in enumerate(xd) if keep or i not in reduced]
    val = node.meta["val"]
    a.dims[node] = tuple(list(out) for _ in val) if isinstance(val, (tuple, list)) else out


def normalise_over(a: GraphAnalysis, node: fx.Node) -> None:
    """softmax / log_softmax / cumsum / sort / topk: each output element depends on the whole dim."""
    x = node.args[0]
    xd = a.dims[x]
    d = _dim(bind(node)["dim"], len(xd))
    a.block(xd[d], node, f"{node.target.overloadpacket.__name__} runs along this dim")
    val = node.meta["val"]
    out = list(xd)
    first = val[0] if isinstance(val, (tuple, list)) else val
    if tuple(first.shape) != tuple(x.meta["val"].shape):
        out[d] = a.fresh(a.shape(node, 0 if first is not val else None)[d])
    a.dims[node] = tuple(list(out) for _ in val) if isinstance(val, (tuple, list)) else out


def layer_norm(a: GraphAnalysis, node: fx.Node) -> None:
    b = bind(node)
    x = b["input"]
    xd = a.dims[x]
    k = len(b["normalized_shape"])
    for lay in xd[-k:]:
        a.block(lay, node, "normalised over by layer_norm / rms_norm (statistics span the dim)")
    for p in (b.get("weight"), b.get("bias")):
        if a.is_tensor(p):
            for lay, w in zip(xd[-k:], a.dims[p]):
                a.unify(lay, w, node)
    out = list(xd)
    val = node.meta["val"]
    a.dims[node] = (out,) + tuple(a.fresh_dims(a.shape(node, i)) for i in range(1, len(val))) if isinstance(val, (tuple, list)) else out


def group_norm(a: GraphAnalysis, node: fx.Node) -> None:
    b = bind(node)
    xd = a.dims[b["input"]]
    a.block(xd[1], node, "normalised over by group_norm (statistics span channel groups)")
    for p in (b.get("weight"), b.get("bias")):
        if a.is_tensor(p):
            a.unify(xd[1], a.dims[p][0], node)
    a.dims[node] = list(xd)


def batch_norm(a: GraphAnalysis, node: fx.Node) -> None:
    """Per-channel affine: weight, bias and running stats follow the channel dim."""
    b = bind(node)
    xd = a.dims[b["input"]]
    ch = xd[1] if len(xd) > 1 else xd[0]
    for key in ("weight", "bias", "running_mean", "running_var"):
        p = b.get(key)
        if a.is_tensor(p):
            a.unify(ch, a.dims[p][0], node)
    val = node.meta["val"]
    if isinstance(val, (tuple, list)):
        a.dims[node] = (list(xd),) + tuple(
            [ch] if v.ndim == 1 and v.shape[0] == val[0].shape[1] else a.fresh_dims(a.shape(node, i + 1))
            for i, v in enumerate(val[1:])
        )
    else:
        a.dims[node] = list(xd)


def instance_norm(a: GraphAnalysis, node: fx.Node) -> None:
    b = bind(node)
    xd = a.dims[b["input"]]
    for lay in xd[2:]:
        a.block(lay, node, "normalised over by instance_norm")
    for key in ("weight", "bias", "running_mean", "running_var"):
        p = b.get(key)
        if a.is_tensor(p):
            a.unify(xd[1], a.dims[p][0], node)
    a.dims[node] = list(xd)


# ----------------------------------------------------------------------------- layers


def linear(a: GraphAnalysis, node: fx.Node) -> None:
    """y = x Wᵀ + b: x's last dim is contracted with W's columns (consumer), y's from W's rows."""
    b = bind(node)
    x, w, bias = b["input"], b["weight"], b["bias"]
    xd, wd = a.dims[x], a.dims[w]
    a.unify(xd[-1], wd[-1], node)
    if a.param_fqn(w) is not None and len(wd) == 2:
        a.tag(w, 1, "consumer", node, op="linear")
        a.tag(w, 0, "producer", node)
        if a.is_tensor(bias) and a.param_fqn(bias) is not None:
            a.tag(bias, 0, "producer", node)
    else:
        a.block(xd[-1], node, "contracted with a weight that is not a parameter")
    if a.is_tensor(bias):
        a.unify(a.dims[bias][-1], wd[0], node)
    a.dims[node] = list(xd[:-1]) + [wd[0]]


def conv(a: GraphAnalysis, node: fx.Node) -> None:
    """convNd / convolution: channel dim contracted with weight dim 1 (depthwise: followed)."""
    b = bind(node)
    x, w, bias = b["input"], b["weight"], b["bias"]
    groups = b.get("groups", 1)
    transposed = bool(b.get("transposed", False)) or node.target.overloadpacket in (
        aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
    xd, wd = a.dims[x], a.dims[w]
    xs, ws = a.shape(x), a.shape(w)
    ch = 0 if len(xs) == len(ws) - 1 else 1
    spatial = len(ws) - 2
    out_shape = a.shape(node)
    out = list(xd[:ch]) + [None] + a.fresh_dims(out_shape[ch + 1 :])
    is_param = a.param_fqn(w) is not None
    op = f"conv{spatial}d"
    if not is_param or not isinstance(groups, int):
        a.block(xd[ch], node, "convolution with a computed weight or symbolic groups")
        out[ch] = a.fresh(out_shape[ch])
        a.block(out[ch], node, "convolution with a computed weight or symbolic groups")
        a.dims[node] = out
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
            a.unify(a.dims[bias][0], out[ch], node)
            a.tag(bias, 0, "producer", node)
        a.dims[node] = out
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
            parts = a.space.split(wd[0], [c_in, c_out // c_in])
            if parts is None:
                a.block(wd[0], node, "depthwise multiplier layout")
            else:
                a.unify(parts[0], xd[ch], node)
                a.block(parts[1], node, "depthwise channel multiplier")
            a.tag(w, 0, "producer", node)
        out[ch] = wd[0]
        a.shape_arg(node, loc(node, "groups"), None, [xd[ch]])
    else:  # grouped: the within-group channels are pruned alike in every group
        in_parts = a.space.split(xd[ch], [groups, c_in // groups])
        out_parts = a.space.split(wd[0], [groups, c_out // groups])
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
        a.unify(a.dims[bias][0], wd[0], node)
        a.tag(bias, 0, "follower" if depthwise else "producer", node)
    a.dims[node] = out


def matmul(a: GraphAnalysis, node: fx.Node) -> None:
    """mm / bmm / matmul / addmm / baddbmm: a parameter operand makes a consumer + producer."""
    b = bind(node)
    packet = node.target.overloadpacket
    if packet in (aten.addmm, aten.baddbmm, aten.addbmm):
        left, right, extra = b["mat1" if packet is aten.addmm else "batch1"], b["mat2" if packet is aten.addmm else "batch2"], b["self"]
    else:
        left, right, extra = b["self"], b["mat2" if "mat2" in b else "other"], None
    ld, rd = a.dims[left], a.dims[right]
    ls, rs = a.shape(left), a.shape(right)
    lp, rp = a.param_fqn(left) is not None, a.param_fqn(right) is not None
    if len(rs) == 1:
        contracted = (ld[-1], rd[0])
        out = list(ld[:-1])
    elif len(ls) == 1:
        contracted = (ld[0], rd[-2])
        out = list(rd[:-2]) + [rd[-1]]
    else:
        batch = _broadcast_batch(a, node, ld[:-2], ls[:-2], rd[:-2], rs[:-2])
        if not lp and not rp and len(ls) >= 3 and len(rs) >= 3:
            gqa_check(a, node, rd[:-2])
            for lay in batch:
                a.space.flag(lay, "head")
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
    a.dims[node] = out


def _broadcast_batch(a: GraphAnalysis, node: fx.Node, ld: list, ls: tuple, rd: list, rs: tuple) -> list[Layout]:
    n = max(len(ld), len(rd))
    out = []
    for j in range(n):
        li, ri = j - (n - len(ld)), j - (n - len(rd))
        lay_l = ld[li] if li >= 0 and not size_eq(ls[li], 1) else None
        lay_r = rd[ri] if ri >= 0 and not size_eq(rs[ri], 1) else None
        if lay_l is not None and lay_r is not None:
            a.unify(lay_l, lay_r, node)
        lay = lay_l if lay_l is not None else lay_r
        out.append(lay if lay is not None else a.fresh(1))
    return out


def broadcast_into(a: GraphAnalysis, node: fx.Node, out: list[Layout], x: fx.Node) -> list[Layout]:
    xd, xs = a.dims[x], a.shape(x)
    off = len(out) - len(xd)
    for i, (lay, s) in enumerate(zip(xd, xs)):
        if not size_eq(s, 1):
            a.unify(out[off + i], lay, node)
    return out


def gqa_check(a: GraphAnalysis, node: fx.Node, kv_batch: list[Layout]) -> None:
    """K/V heads built by expanding a size-1 dim (repeat_kv) are GQA copies: block the copies."""
    for lay in kv_batch:
        leaves = a.space.leaves(lay)
        copies = [x for x in leaves if a.space.has_flag(x, "broadcast")]
        if not copies or all(a.space.size[x] == 1 for x in copies):
            continue
        for x in copies:
            a.block(x, node, GQA_QUERY)
        for x in leaves:
            if x not in copies:
                a.space.flag(x, "kv")


def sdpa(a: GraphAnalysis, node: fx.Node) -> None:
    """scaled_dot_product_attention: batch (head) dims of q, k, v, out are one index space."""
    b = bind(node)
    q, k, v, mask = b["query"], b["key"], b["value"], b["attn_mask"]
    qd, kd, vd = a.dims[q], a.dims[k], a.dims[v]
    qs, ks, vs = a.shape(q), a.shape(k), a.shape(v)
    qmatch, qms = list(qd[:-2]), qs[:-2]
    if b.get("enable_gqa") and len(qs) >= 3 and qs[-3] != ks[-3]:
        parts = a.space.split(qd[-3], [ks[-3], qs[-3] // ks[-3]])
        if parts is None:
            a.block_everything(node, "enable_gqa head layout is not followed")
            return
        a.block(parts[1], node, GQA_QUERY)
        a.space.flag(kd[-3], "kv")
        qmatch, qms = qmatch[:-1] + [parts[0]], qms[:-1] + (ks[-3],)
    else:
        gqa_check(a, node, kd[:-2])
        gqa_check(a, node, vd[:-2])
    _broadcast_batch(a, node, qmatch, qms, kd[:-2], ks[:-2])
    _broadcast_batch(a, node, qmatch, qms, vd[:-2], vs[:-2])
    for lay in qd[:-2]:
        a.space.flag(lay, "head")
    a.unify(kd[-2], vd[-2], node)
    a.unify(qd[-1], kd[-1], node)
    a.block(qd[-1], node, "head_dim of queries/keys: sets the attention scale; pruned only as whole heads")
    a.block(vd[-1], node, "head_dim of values: pruned only as whole heads")
    if a.is_tensor(mask):  # the mask broadcasts against the scores (..., L, S)
        broadcast_into(a, node, list(qd[:-1]) + [kd[-2]], mask)
    a.dims[node] = list(qd[:-1]) + [vd[-1]]


def einsum(a: GraphAnalysis, node: fx.Node) -> None:
    """einsum: letters kept in the output pass through (batch/head dims between two activations);
    summed letters are contracted. No consumer is recorded: a contraction is blocked."""
    b = bind(node)
    operands = list(b["tensors"])
    lhs, _, rhs = b["equation"].replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not rhs and "->" not in b["equation"]:
        rhs = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    out_rank = len(a.shape(node))
    ell = max((len(a.shape(t)) - len(term.replace("...", "")) for t, term in zip(operands, terms)), default=0)
    ell_letters = [chr(0x3B1 + i) for i in range(max(ell, 0))]  # greek letters stand for "..."

    def letters(term: str, rank: int) -> list[str]:
        if "..." not in term:
            return list(term)
        pre, post = term.split("...")
        n = rank - len(pre) - len(post)
        return list(pre) + ell_letters[len(ell_letters) - n :] + list(post)

    seen: dict[str, Layout] = {}
    for t, term in zip(operands, terms):
        xs = a.shape(t)
        for ch, lay, size in zip(letters(term, len(xs)), a.dims[t], xs):
            if size == 1:
                continue
            if ch in seen:
                a.unify(seen[ch], lay, node)
            else:
                seen[ch] = lay
    out_letters = letters(rhs, out_rank)
    if len(operands) > 1:
        last = letters(terms[-1], len(a.shape(operands[-1])))
        others = {c for t, term in zip(operands[:-1], terms[:-1]) for c in letters(term, len(a.shape(t)))}
        for ch in last:
            if ch in out_letters and ch not in others and ch in seen:
                a.block(seen[ch], node, "free dim of an activation product (e.g. head_dim of values): pruned only with whole heads")
    for ch, lay in seen.items():
        if ch not in out_letters:
            a.block(lay, node, "summed over by einsum (no weight to re-fit)")
        elif len(operands) > 1 and all(ch in letters(term, len(a.shape(t))) for t, term in zip(operands, terms)):
            a.space.flag(lay, "head")
    a.dims[node] = [seen.get(ch) if ch in seen else a.fresh(s) for ch, s in zip(out_letters, a.shape(node))]


def embedding(a: GraphAnalysis, node: fx.Node) -> None:
    b = bind(node)
    w, idx = b["weight"], b["indices"]
    wd = a.dims[w]
    a.block(wd[0], node, "rows picked by an embedding lookup")
    if a.param_fqn(w) is not None:
        a.tag(w, 1, "producer", node)
    a.dims[node] = list(a.dims[idx]) + [wd[1]]


def index_tensor(a: GraphAnalysis, node: fx.Node) -> None:
    """x[..., idx, ...]: indexed dims are replaced by the index shape; the others pass through."""
    b = bind(node)
    x, indices = b["self"], b["indices"]
    xd = a.dims[x]
    used = [i for i, t in enumerate(indices) if t is not None]
    out_shape = a.shape(node)
    if not used or used != list(range(used[0], used[-1] + 1)):
        a.block_everything(node, "advanced indexing with non-adjacent indices")
        return
    for i in used:
        a.block(xd[i], node, "indexed by a tensor")
    before, after = list(xd[: used[0]]), list(xd[used[-1] + 1 :])
    n_new = len(out_shape) - len(before) - len(after)
    if n_new < 0:
        a.block_everything(node, "advanced indexing shape")
        return
    a.dims[node] = before + a.fresh_dims(out_shape[len(before) : len(before) + n_new]) + after


def index_select(a: GraphAnalysis, node: fx.Node) -> None:
    x = node.args[0]
    xd = a.dims[x]
    d = _dim(bind(node)["dim"], len(xd))
    a.block(xd[d], node, "indexed by index_select")
    out = list(xd)
    out[d] = a.fresh(a.shape(node)[d])
    a.dims[node] = out


def spatial(k: int) -> Rule:
    """Pooling / upsampling over the last k dims: those are new, the rest pass through."""

    def rule(a: GraphAnalysis, node: fx.Node) -> None:
        xd = a.dims[node.args[0]]
        val = node.meta["val"]
        multi = isinstance(val, (tuple, list))
        out = list(xd[:-k]) + a.fresh_dims(a.shape(node, 0 if multi else None)[-k:])
        a.dims[node] = tuple(list(out) for _ in val) if multi else out

    return rule


def pad(a: GraphAnalysis, node: fx.Node) -> None:
    x = node.args[0]
    xd = a.dims[x]
    pads = bind(node)["pad"]
    n = len(pads) // 2
    out = list(xd)
    shape = a.shape(node)
    for i in range(n):
        d = len(xd) - 1 - i
        if pads[2 * i] == 0 and pads[2 * i + 1] == 0:
            continue
        a.block(xd[d], node, "padded")
        out[d] = a.fresh(shape[d])
    a.dims[node] = out


def along_dims(reason: str, key: str) -> Rule:
    """roll / flip: positions move along the given dims, which are blocked; others pass through."""

    def rule(a: GraphAnalysis, node: fx.Node) -> None:
        x = node.args[0]
        xd = a.dims[x]
        dims = bind(node)[key]
        moved = _dims_list(dims, len(xd))
        out = list(xd)
        for d in moved:
            a.block(xd[d], node, reason)
            out[d] = a.fresh(a.shape(node)[d])
        a.dims[node] = out

    return rule


def triangular(a: GraphAnalysis, node: fx.Node) -> None:
    xd = a.dims[node.args[0]]
    for lay in xd[-2:]:
        a.block(lay, node, "triangular mask depends on positions")
    a.dims[node] = list(xd)


def pixel_shuffle(a: GraphAnalysis, node: fx.Node) -> None:
    """(C·r², H, W) -> (C, H·r, W·r): channel c owns input channels c·r² ... (c+1)·r² - 1."""
    x = node.args[0]
    xd, xs = a.dims[x], a.shape(x)
    r = bind(node)["upscale_factor"]
    parts = a.space.split(xd[-3], [xs[-3] // (r * r), r, r])
    if parts is None:
        a.block_everything(node, "pixel_shuffle channel layout")
        return
    for p in parts[1:]:
        a.block(p, node, "sub-pixel position of pixel_shuffle")
    a.dims[node] = list(xd[:-3]) + [parts[0], ("P", (xd[-2], parts[1])), ("P", (xd[-1], parts[2]))]


def pixel_unshuffle(a: GraphAnalysis, node: fx.Node) -> None:
    x = node.args[0]
    xd, xs = a.dims[x], a.shape(x)
    r = bind(node)["downscale_factor"]
    hs = a.space.split(xd[-2], [xs[-2] // r, r])
    ws = a.space.split(xd[-1], [xs[-1] // r, r])
    if hs is None or ws is None:
        a.block_everything(node, "pixel_unshuffle spatial layout")
        return
    a.block(hs[1], node, "sub-pixel position of pixel_unshuffle")
    a.block(ws[1], node, "sub-pixel position of pixel_unshuffle")
    a.dims[node] = list(xd[:-3]) + [("P", (xd[-3], hs[1], ws[1])), hs[0], ws[0]]


def channel_shuffle(a: GraphAnalysis, node: fx.Node) -> None:
    a.block_everything(node, "channel_shuffle interleaves channel groups")


# ----------------------------------------------------------------------------- the table

_UNARY = [
    aten.relu, aten.relu_, aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.sigmoid, aten.sigmoid_,
    aten.tanh, aten.tanh_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_,
    aten.hardtanh, aten.hardtanh_, aten.relu6, aten.elu, aten.elu_, aten.leaky_relu, aten.leaky_relu_,
    aten.mish, aten.mish_, aten.softplus, aten.selu, aten.selu_, aten.celu, aten.log_sigmoid,
    aten.neg, aten.abs, aten.exp, aten.log, aten.log1p, aten.expm1, aten.sqrt, aten.rsqrt,
    aten.reciprocal, aten.sin, aten.cos, aten.erf, aten.square, aten.sign, aten.floor, aten.ceil,
    aten.round, aten.trunc, aten.logical_not, aten.bitwise_not, aten.isnan, aten.isinf, aten.logit,
    aten.clone, aten.contiguous, aten.alias, aten.detach, aten.detach_, aten.lift_fresh_copy,
    aten.dropout, aten.dropout_, aten.feature_dropout, aten.feature_dropout_, aten.alpha_dropout,
    aten.alpha_dropout_, aten.native_dropout, aten.to, aten._to_copy, aten.type_as,
    aten.clamp, aten.clamp_, aten.clamp_min, aten.clamp_min_, aten.clamp_max, aten.clamp_max_,
    aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like, aten.randn_like,
    aten.fill, aten.fill_, aten.zero_, aten.nan_to_num,
]
_BINARY = [
    aten.mul, aten.mul_, aten.div, aten.div_, aten.pow, aten.maximum, aten.minimum, aten.where,
    aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.__and__, aten.__or__, aten.__xor__,
    aten.logical_and, aten.logical_or, aten.bitwise_and, aten.bitwise_or, aten.masked_fill,
    aten.masked_fill_, aten.lerp, aten.addcmul, aten.addcdiv, aten.rsub, aten.fmod, aten.remainder,
    aten.floor_divide, aten.copysign, aten.atan2, aten.true_divide, aten.mul_, aten.hypot,
]

_register(_UNARY, identity)
OP_RULES[aten.native_dropout] = lambda a, node: a.dims.__setitem__(
    node, (list(a.dims[node.args[0]]), list(a.dims[node.args[0]]))
)
_register(_BINARY, elementwise)
_register([aten.add, aten.add_, aten.sub, aten.sub_], add_sub)
_register(
    [aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset,
     aten._assert_scalar, aten.sym_constrain_range_for_size, aten.sym_constrain_range, aten._assert_async],
    ignore,
)
_register([aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
           aten.squeeze_, aten.unsqueeze, aten.unsqueeze_, aten.view_as, aten.reshape_as], reshape)
_register([aten.permute, aten.transpose, aten.t, aten.swapaxes, aten.swapdims, aten.movedim,
           aten.numpy_T, aten.mT, aten.adjoint], permute)
_register([aten.expand, aten.expand_as, aten.broadcast_to], expand)
_register([aten.repeat], repeat)
_register([aten.cat, aten.concat, aten.concatenate], cat)
_register([aten.stack], stack)
_register([aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split], split)
_register([aten.unbind], unbind)
_register([aten.select], select)
_register([aten.slice, aten.narrow], slice_)
OP_RULES[operator.getitem] = getitem
_register([aten.max.other, aten.min.other], elementwise)
_register([aten.mean, aten.sum, aten.amax, aten.amin, aten.max, aten.min, aten.argmax, aten.argmin,
           aten.var, aten.std, aten.var_mean, aten.std_mean, aten.norm, aten.linalg_vector_norm,
           aten.logsumexp, aten.prod, aten.any, aten.all], reduction)
_register([aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum, aten.cumprod,
           aten.sort, aten.argsort, aten.topk], normalise_over)
_register([aten.layer_norm, aten.native_layer_norm, aten.rms_norm], layer_norm)
_register([aten.group_norm, aten.native_group_norm], group_norm)
_register([aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
           aten.native_batch_norm], batch_norm)
_register([aten.instance_norm], instance_norm)
_register([aten.linear], linear)
_register([aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution,
           aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d], conv)
_register([aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm], matmul)
_register([aten.scaled_dot_product_attention], sdpa)
_register([aten.embedding], embedding)
_register([aten.einsum], einsum)
_register([aten.index], index_tensor)
_register([aten.index_select], index_select)
_register([aten.max_pool1d, aten.avg_pool1d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d,
           aten.upsample_nearest1d, aten.upsample_linear1d], spatial(1))
_register([aten.max_pool2d, aten.max_pool2d_with_indices, aten.avg_pool2d, aten.adaptive_avg_pool2d,
           aten.adaptive_max_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
           aten.upsample_bicubic2d, aten._upsample_nearest_exact2d, aten._upsample_bilinear2d_aa,
           aten.grid_sampler_2d], spatial(2))
_register([aten.max_pool3d, aten.max_pool3d_with_indices, aten.avg_pool3d, aten.adaptive_avg_pool3d,
           aten.adaptive_max_pool3d, aten.upsample_nearest3d, aten.upsample_trilinear3d], spatial(3))
_register([aten.constant_pad_nd, aten.pad, aten.reflection_pad1d, aten.reflection_pad2d,
           aten.replication_pad1d, aten.replication_pad2d, aten.reflection_pad3d, aten.replication_pad3d], pad)
OP_RULES[aten.roll] = along_dims("rolled along this dim", "dims")
OP_RULES[aten.flip] = along_dims("flipped along this dim", "dims")
_register([aten.tril, aten.triu], triangular)
OP_RULES[aten.pixel_shuffle] = pixel_shuffle
OP_RULES[aten.pixel_unshuffle] = pixel_unshuffle
_register([aten.channel_shuffle, aten.native_channel_shuffle], channel_shuffle)
_register([aten.zeros, aten.ones, aten.full, aten.empty, aten.arange, aten.new_zeros, aten.new_ones,
           aten.new_full, aten.new_empty, aten.scalar_tensor, aten.rand, aten.randn, aten.linspace,
           aten.eye, aten.empty_strided, aten.tensor], factory)
for _op, _why in {
    aten.gather: "gather picks data-dependent positions",
    aten.scatter: "scatter writes data-dependent positions",
    aten.scatter_add: "scatter writes data-dependent positions",
    aten.index_put: "index_put writes data-dependent positions",
    aten.index_put_: "index_put writes data-dependent positions",
    aten.diff: "diff mixes neighbouring positions",
    aten.repeat_interleave: "repeat_interleave layout is not followed",
    aten.grid_sampler: "grid sampling mixes positions",
    aten.unfold: "unfold layout is not followed",
    aten.im2col: "im2col layout is not followed",
    aten._local_scalar_dense: "data-dependent scalar",
    aten.item: "data-dependent scalar",
    aten.nonzero: "data-dependent shape",
}.items():
    OP_RULES[_op] = block_all(_why)
