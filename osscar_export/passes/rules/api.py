"""The helper API op rules are written against (see docs/design.md, "Op rules").

A rule is ``rule(a, node)``: ``a`` is the ``GraphAnalysis``, ``node`` one ATen call. It reads
its inputs' layouts, couples or blocks dims, records weight roles and shape constants, and sets
the node's output layouts, only through these methods of ``a``:

    a.layout(x)                         layouts of a tensor node's dims (a copy)
    a.part_layout(x, i)                 layouts of output i of a multi-output node, or None
    a.set_layout(node, dims)            the node's output layouts (a tuple of lists for several)
    a.shape(x, i=None)                  sizes of x (of its output i)
    a.is_tensor(x)                      whether x is a node with one analysed tensor output
    a.param_fqn(x)                      the weight's name when x is a parameter or buffer, else None
    a.fresh(size, *flags)               a new atom, coupled to nothing
    a.fresh_dims(shape, *flags)         one new atom per size
    a.unify(x, y, node)                 couple two layouts of one size, position by position
    a.block(lay, node, reason)          keep lay's atoms unpruned, saying why
    a.block_everything(node, reason)    block every dim the node reads or writes
    a.split(lay, sizes, node)           lay as a row-major product of parts, or None
    a.split_concat(lay, sizes)          lay as a concatenation of parts, or None
    a.leaves(lay)                       the atoms lay is made of
    a.size(lay)                         lay's number of indices
    a.flag(lay, name)                   mark lay's atoms ("head", "kv", "query", "broadcast", "producer")
    a.has_flag(lay, name)               whether some atom of lay carries the mark
    a.tag(param, dim, role, node, **info)   a weight dim is a producer / consumer / follower here
    a.shape_arg(node, arg, index, layouts, uniform=False)   an int argument sizing ``layouts``

plus the argument and broadcasting helpers of this module. A layout is an atom id,
``("P", parts)`` (row-major product, outer first) or ``("C", parts)`` (concatenation): rules may
build those tuples but never look inside atoms. Each rule module ends with ``RULES``, a list of
``(ops, rule)`` pairs that ``rules/__init__.py`` registers; adding an op is one entry there.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import fx

from osscar_export.passes.analysis import GraphAnalysis
from osscar_export.passes.dims import Layout, Size, size_eq, to_size

__all__ = [
    "GraphAnalysis", "Layout", "Rule", "Size", "bind", "block_all", "broadcast_batch", "broadcast_into",
    "dims_list", "loc", "norm_dim", "size_eq", "tensors", "to_size",
]

Rule = Callable[[GraphAnalysis, fx.Node], None]


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


def norm_dim(d: int, rank: int) -> int:
    """A dim argument made non-negative."""
    return d + rank if d < 0 else d


def dims_list(d: Any, rank: int) -> list[int]:
    """A ``dim`` argument (int, list or None for all) as sorted non-negative dims."""
    if d is None or d == []:
        return list(range(rank))
    if isinstance(d, int):
        d = [d]
    return sorted(norm_dim(x, rank) for x in d)


def tensors(a: GraphAnalysis, *xs: Any) -> list[fx.Node]:
    """The analysed tensor nodes among ``xs`` (nested lists and tuples flattened)."""
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(tensors(a, *x))
        elif a.is_tensor(x):
            out.append(x)
    return out


def broadcast_into(a: GraphAnalysis, node: fx.Node, out: list[Layout], x: fx.Node) -> list[Layout]:
    """Unify ``x``'s non-1 dims with the trailing dims of ``out`` (an added bias or mask)."""
    xd, xs = a.layout(x), a.shape(x)
    off = len(out) - len(xd)
    for i, (lay, s) in enumerate(zip(xd, xs)):
        if not size_eq(s, 1):
            a.unify(out[off + i], lay, node)
    return out


def broadcast_batch(a: GraphAnalysis, node: fx.Node, ld: list, ls: tuple, rd: list, rs: tuple) -> list[Layout]:
    """The broadcast batch dims of two operands of a matrix product, unified where both are non-1."""
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


def block_all(reason: str) -> Rule:
    """A deliberate rule for ops whose dim mapping is not followed (gather, scatter...)."""

    def rule(a: GraphAnalysis, node: fx.Node) -> None:
        a.block_everything(node, f"{node.target}: {reason}")

    rule.__qualname__ = f"block_all({reason!r})"  # named in duplicate-registration errors
    return rule
