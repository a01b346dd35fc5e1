"""Shape ops: views and reshapes, permutes, expand / repeat, cat / stack, split, select, slice.

Reshapes split and merge atoms into products, ``cat`` / ``split`` / ``slice`` into
concatenations; the integer constants they carry (view shapes, split sizes, slice bounds) are
recorded as shape arguments so a pruned graph can rewrite them (see docs/design.md, "Op rules").
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from osscar_export.passes.rules.api import GraphAnalysis, Layout, Rule, bind, loc, norm_dim, size_eq, to_size

aten = torch.ops.aten
MAXINT = 2**62  # what an open-ended slice's ``end`` defaults to


def reshape(a: GraphAnalysis, node: fx.Node) -> None:
    """view / reshape / flatten / squeeze / unsqueeze: regroup the row-major product of dims."""
    x = node.args[0]
    out_shape = a.shape(node)
    xd = a.layout(x)
    whole: Layout = ("P", tuple(xd)) if xd else a.fresh(1)
    parts = a.split(whole, list(out_shape), node)
    if parts is None:
        for lay in xd:
            a.block(lay, node, f"reshape {tuple(a.shape(x))} -> {tuple(out_shape)} does not follow the dim layout")
        parts = a.fresh_dims(out_shape)
        for lay in parts:
            a.block(lay, node, "output of an unfollowed reshape")
    a.set_layout(node, parts)
    packet = node.target.overloadpacket if isinstance(node.target, torch._ops.OpOverload) else None
    name = {aten.view: "size", aten.reshape: "shape", aten._unsafe_view: "size", aten.unflatten: "sizes"}.get(packet)
    if name is None:
        return
    sizes = bind(node)[name]
    where = loc(node, name)
    first = norm_dim(bind(node)["dim"], len(a.shape(x))) if packet is aten.unflatten else 0
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s != -1 and where is not None:
            a.shape_arg(node, where, i, [parts[first + i]])


def permute(a: GraphAnalysis, node: fx.Node) -> None:
    xd = a.layout(node.args[0])
    rank = len(xd)
    packet = node.target.overloadpacket
    if packet is aten.permute:
        order = [norm_dim(d, rank) for d in bind(node)["dims"]]
    elif packet in (aten.t, aten.numpy_T, aten.mT, aten.adjoint):
        order = list(range(rank))
        if rank >= 2:
            order[-1], order[-2] = order[-2], order[-1]
    elif packet is aten.movedim:
        b = bind(node)
        src = [norm_dim(d, rank) for d in (b["source"] if isinstance(b["source"], list) else [b["source"]])]
        dst = [norm_dim(d, rank) for d in (b["destination"] if isinstance(b["destination"], list) else [b["destination"]])]
        order = [None] * rank
        for s, d in zip(src, dst):
            order[d] = s
        rest = iter(i for i in range(rank) if i not in src)
        order = [o if o is not None else next(rest) for o in order]
    else:  # transpose / swapaxes / swapdims
        b = bind(node)
        d0, d1 = (norm_dim(b[k], rank) for k in [k for k in b if k != "self"][:2])
        order = list(range(rank))
        order[d0], order[d1] = order[d1], order[d0]
    a.set_layout(node, [xd[i] for i in order])


def expand(a: GraphAnalysis, node: fx.Node) -> None:
    """Broadcast copies: a dim expanded from size 1 is a fresh dim whose values are shared."""
    x = node.args[0]
    xd, xs = a.layout(x), a.shape(x)
    out_shape = a.shape(node)
    lead = len(out_shape) - len(xs)
    out: list[Layout] = []
    for j, s in enumerate(out_shape):
        i = j - lead
        if i >= 0 and size_eq(xs[i], s):
            out.append(xd[i])
        else:
            out.append(a.fresh(s, "broadcast"))
    a.set_layout(node, out)
    if node.target.overloadpacket in (aten.expand, aten.broadcast_to):
        where = loc(node, "size")
        for j, s in enumerate(bind(node)["size"]):
            if isinstance(s, int) and s != -1 and where is not None:
                a.shape_arg(node, where, j, [out[j]])


def repeat(a: GraphAnalysis, node: fx.Node) -> None:
    xd = a.layout(node.args[0])
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
    a.set_layout(node, out)


def cat(a: GraphAnalysis, node: fx.Node) -> None:
    """Concatenation: the cat dim is a concatenation of the inputs' dims; the rest unify."""
    b = bind(node)
    ins = [t for t in b["tensors"] if a.is_tensor(t) and a.shape(t) != (0,)]
    rank = len(a.shape(node))
    d = norm_dim(b["dim"], rank)
    out: list[Layout | None] = [None] * rank
    for t in ins:
        for j, lay in enumerate(a.layout(t)):
            if j == d:
                continue
            if out[j] is None:
                out[j] = lay
            else:
                a.unify(out[j], lay, node)
    out[d] = ("C", tuple(a.layout(t)[d] for t in ins)) if len(ins) > 1 else a.layout(ins[0])[d]
    a.set_layout(node, out)


def stack(a: GraphAnalysis, node: fx.Node) -> None:
    b = bind(node)
    ins = [t for t in b["tensors"] if a.is_tensor(t)]
    d = norm_dim(b["dim"], len(a.shape(node)))
    base = a.layout(ins[0])
    for t in ins[1:]:
        for x, y in zip(base, a.layout(t)):
            a.unify(x, y, node)
    a.set_layout(node, base[:d] + [a.fresh(len(ins))] + base[d:])


def split(a: GraphAnalysis, node: fx.Node) -> None:
    """split / split_with_sizes / chunk / tensor_split: the dim becomes a concatenation of parts."""
    x = node.args[0]
    b = bind(node)
    d = norm_dim(b.get("dim", 0) or 0, len(a.shape(x)))
    sizes = [to_size(v.shape[d]) for v in node.meta["val"]]
    xd = a.layout(x)
    parts = a.split_concat(xd[d], sizes)
    if parts is None:
        a.block(xd[d], node, f"split into {sizes} does not follow the dim layout")
        parts = [a.fresh(s) for s in sizes]
        for p in parts:
            a.block(p, node, "output of an unfollowed split")
    a.set_layout(node, tuple(xd[:d] + [p] + xd[d + 1 :] for p in parts))
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
    xd = a.layout(node.args[0])
    d = norm_dim(bind(node)["dim"], len(xd))
    a.block(xd[d], node, "unbind picks single indices of this dim")
    rest = xd[:d] + xd[d + 1 :]
    a.set_layout(node, tuple(list(rest) for _ in node.meta["val"]))


def select(a: GraphAnalysis, node: fx.Node) -> None:
    xd = a.layout(node.args[0])
    d = norm_dim(bind(node)["dim"], len(xd))
    a.block(xd[d], node, "select picks one index of this dim")
    a.set_layout(node, xd[:d] + xd[d + 1 :])


def slice_(a: GraphAnalysis, node: fx.Node) -> None:
    """A contiguous slice splits the dim into (before, kept, after); its bounds are shape constants."""
    x = node.args[0]
    xd, xs = a.layout(x), a.shape(x)
    b = bind(node)
    d = norm_dim(b["dim"], len(xd))
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
        a.set_layout(node, out)
        return
    end = min(end, n)
    if start == 0 and end == n:
        a.set_layout(node, out)
        return
    sizes = [s for s in (start, end - start, n - end) if s > 0]
    parts = a.split_concat(xd[d], sizes)
    if parts is None or end <= start:
        a.block(xd[d], node, "slice bounds do not follow the dim layout")
        out[d] = a.fresh(a.shape(node)[d])
        a.block(out[d], node, "output of an unfollowed slice")
        a.set_layout(node, out)
        return
    pre = parts[0] if start > 0 else None
    mid = parts[1] if start > 0 else parts[0]
    out[d] = mid
    a.set_layout(node, out)
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
    """One output of a multi-output node (split, unbind, native_layer_norm...)."""
    src, i = node.args
    part = a.part_layout(src, i)
    if part is None:
        if isinstance(node.meta.get("val"), torch.Tensor):
            a.block_everything(node, "getitem of an unanalysed value")
        return
    a.set_layout(node, part)


RULES: list[tuple[list, Rule]] = [
    ([aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze, aten.squeeze_,
      aten.unsqueeze, aten.unsqueeze_, aten.view_as, aten.reshape_as], reshape),
    ([aten.permute, aten.transpose, aten.t, aten.swapaxes, aten.swapdims, aten.movedim, aten.numpy_T, aten.mT,
      aten.adjoint], permute),
    ([aten.expand, aten.expand_as, aten.broadcast_to], expand),
    ([aten.repeat], repeat),
    ([aten.cat, aten.concat, aten.concatenate], cat),
    ([aten.stack], stack),
    ([aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split], split),
    ([aten.unbind], unbind),
    ([aten.select], select),
    ([aten.slice, aten.narrow], slice_),
    ([operator.getitem], getitem),
]
