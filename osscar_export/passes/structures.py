"""find_structures: every coupled prunable structure of a captured graph (DESIGN.md §3, §10).

How it works. Every dimension of every tensor in ``ep.graph`` (the ATen graph before
``run_decompositions``) gets a *layout*: an atom (a union-find class of index spaces that must be
pruned together), or a product / concatenation of layouts. Reshapes split and merge atoms into
products (``E -> (heads, head_dim)``), ``cat``/``split`` into concatenations, elementwise ops
unify the dims they combine. Each ATen op's effect on dims is one entry of the table in
``op_rules.py``; an op missing from the table blocks every dim it touches. After one walk over
the graph, every leaf atom that touches a producer (weight rows that create it) and a consumer
(weight columns that contract it), and was never blocked, is a ``StructureGroup``; its tensor
slices come from where the atom sits inside each parameter's layout.

Policy decisions (each a blocked reason, never a silent pass-through):
- dims reaching a graph input or output are fixed;
- residual streams (channels summed from several producers, ``x + f(x)``) are fixed;
- normalised-over dims (LayerNorm, RMSNorm, GroupNorm, softmax) and reduced dims are fixed;
- head_dim is pruned only as whole heads (its size sets the attention scale);
- grouped-query attention: a KV head goes only together with all its query heads (kind
  ``kv_group``: k/v rows unit ``head_dim``, q rows and o_proj columns unit ``n_rep*head_dim``,
  the ``expand``/``reshape`` constants of ``repeat_kv`` rewritten). Query heads within a KV
  group are blocked, and so are query heads of MQA (one KV head shared by all).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Union

import sympy
import torch
from torch import fx, nn

from osscar_export.errors import PlanError
from osscar_export.passes.base import Pass, PassResult
from osscar_export.passes.capture import capture
from osscar_export.plan import Consumer, ShapeArg, Slice, StructureGroup, StructurePlan

Size = Union[int, sympy.Expr]
# A layout is an atom id, or ("P", children) — row-major product, outer first — or ("C", children).
Layout = Union[int, tuple[str, tuple[Any, ...]]]

GRAPH_INPUT = "reaches a graph input"
GRAPH_OUTPUT = "reaches a graph output"
RESIDUAL = "residual stream: summed with channels of another producer (x + f(x)); kept fixed"
GQA_QUERY = (
    "query heads sharing one KV head: pruned only together with their KV head (kv_group), "
    "so query heads within a group (and MQA heads) stay"
)
MAX_REASONS = 4


# ----------------------------------------------------------------------------- sizes


def to_size(s: Any) -> Size:
    """An int for a concrete size; a sympy expression for a symbolic one."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if expr.is_number else expr
    return int(s)


def size_eq(a: Size, b: Size) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.simplify(a - b) == 0


def size_quot(whole: Size, part: Size) -> Size | None:
    """``whole / part`` when it is exact (an int, or a polynomial for symbolic sizes)."""
    if isinstance(whole, int) and isinstance(part, int):
        return whole // part if part and whole % part == 0 else None
    q = sympy.cancel(sympy.sympify(whole) / sympy.sympify(part))
    _, den = q.as_numer_denom()
    if den != 1:
        return None
    return int(q) if q.is_number else q


def size_prod(sizes: Iterable[Size]) -> Size:
    out: Size = 1
    for s in sizes:
        out = out * s
    return out


class NotSliceable(Exception):
    """A structure's indices along a dim are not ``offset + i*unit + [0, unit)`` for fixed offsets."""


# ----------------------------------------------------------------------------- the dim algebra


class DimSpace:
    """Union-find over atoms; an atom may be refined into a product or concatenation of atoms.

    Flags and block reasons live on unrefined roots; refining an atom hands them to its parts,
    so every event ever recorded on an atom reaches the leaves it ends up as.
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[Size] = []
        self.refined: dict[int, Layout] = {}
        self.flags: dict[int, set[str]] = {}
        self.blocks: dict[int, list[tuple[str, str]]] = {}

    def new(self, size: Size, *flags: str) -> int:
        a = len(self.parent)
        self.parent.append(a)
        self.size.append(size)
        if flags:
            self.flags[a] = set(flags)
        return a

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def expand(self, lay: Layout) -> Layout:
        """Canonical form: unrefined roots as leaves, nested products flattened, size-1 factors dropped."""
        if isinstance(lay, int):
            r = self.find(lay)
            sub = self.refined.get(r)
            return r if sub is None else self.expand(sub)
        kind, children = lay
        out: list[Layout] = []
        for c in children:
            e = self.expand(c)
            if not isinstance(e, int) and e[0] == kind:
                out.extend(e[1])
            elif kind == "P" and self.size_of(e) == 1:
                continue
            else:
                out.append(e)
        if len(out) == 1:
            return out[0]
        return (kind, tuple(out))

    def size_of(self, lay: Layout) -> Size:
        if isinstance(lay, int):
            return self.size[lay]
        kind, children = lay
        sizes = [self.size_of(c) for c in children]
        return size_prod(sizes) if kind == "P" else sum(sizes[1:], sizes[0]) if sizes else 0

    def leaves(self, lay: Layout) -> list[int]:
        e = self.expand(lay)
        if isinstance(e, int):
            return [e]
        out: list[int] = []
        for c in e[1]:
            out.extend(self.leaves(c))
        return out

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.flags:
            self.flags.setdefault(ra, set()).update(self.flags.pop(rb))
        if rb in self.blocks:
            self._add_blocks(ra, self.blocks.pop(rb))

    def _add_blocks(self, root: int, reasons: list[tuple[str, str]]) -> None:
        have = self.blocks.setdefault(root, [])
        for r in reasons:
            if len(have) >= MAX_REASONS:
                return
            if all(r[1] != h[1] for h in have):
                have.append(r)

    def refine(self, atom: int, lay: Layout) -> None:
        """Declare the (unrefined) atom equal to ``lay``; its flags and blocks move to lay's leaves."""
        r = self.find(atom)
        assert r not in self.refined, "refine() needs an unrefined atom"
        self.refined[r] = lay
        flags, blocks = self.flags.pop(r, None), self.blocks.pop(r, None)
        for leaf in self.leaves(lay):
            if flags:
                self.flags.setdefault(leaf, set()).update(flags)
            if blocks:
                self._add_blocks(leaf, blocks)

    def block(self, lay: Layout, where: str, reason: str) -> None:
        for leaf in self.leaves(lay):
            self._add_blocks(leaf, [(where, reason)])

    def flag(self, lay: Layout, name: str) -> None:
        for leaf in self.leaves(lay):
            self.flags.setdefault(leaf, set()).add(name)

    def has_flag(self, leaf: int, name: str) -> bool:
        return name in self.flags.get(self.find(leaf), ())

    def unify(self, a: Layout, b: Layout, where: str) -> None:
        """Make two layouts of one size the same index space (positionally)."""
        ea, eb = self.expand(a), self.expand(b)
        if ea == eb:
            return
        sa, sb = self.size_of(ea), self.size_of(eb)
        if not size_eq(sa, sb):
            self.block(ea, where, f"coupled with a dim of another size ({sa} vs {sb})")
            self.block(eb, where, f"coupled with a dim of another size ({sb} vs {sa})")
            return
        if size_eq(sa, 1):
            return
        if isinstance(ea, int) and isinstance(eb, int):
            self.union(ea, eb)
        elif isinstance(ea, int) or isinstance(eb, int):
            atom, other = (ea, eb) if isinstance(ea, int) else (eb, ea)
            if atom in self.leaves(other):
                self.block(other, where, "a dim coupled with a part of itself")
            else:
                self.refine(atom, other)
        else:
            pairs = self._align(ea, eb)
            if pairs is None:
                reason = f"incompatible index layouts {self.describe(ea)} vs {self.describe(eb)}"
                self.block(ea, where, reason)
                self.block(eb, where, reason)
                return
            for x, y in pairs:
                self.unify(x, y, where)

    def _align(self, ea: Layout, eb: Layout) -> list[tuple[Layout, Layout]] | None:
        ka, ca = ea  # type: ignore[misc]
        kb, cb = eb  # type: ignore[misc]
        if ka == kb and len(ca) == len(cb) and all(
            size_eq(self.size_of(x), self.size_of(y)) for x, y in zip(ca, cb)
        ):
            return list(zip(ca, cb))
        if ka == kb == "P":
            parts = self.split(ea, [self.size_of(y) for y in cb])
            if parts is not None:
                return list(zip(parts, cb))
            parts = self.split(eb, [self.size_of(x) for x in ca])
            if parts is not None:
                return list(zip(ca, parts))
        return None

    def split(self, lay: Layout, sizes: list[Size], where: str = "reshape") -> list[Layout] | None:
        """Express ``lay`` as a row-major product of parts of the given sizes (refining atoms).

        A concatenation of k equal parts viewed as (k, part) couples its parts (coarser, never
        wrong); the new k dim is blocked since nothing ties it back to the concatenation.
        """
        e = self.expand(lay)
        factors = list(e[1]) if not isinstance(e, int) and e[0] == "P" else [e]
        out: list[Layout] = []
        i = 0
        for target in sizes:
            if size_eq(target, 1):
                out.append(self.new(1))
                continue
            acc: list[Layout] = []
            prod: Size = 1
            while not size_eq(prod, target):
                if i >= len(factors):
                    return None
                f = self.expand(factors[i])
                if not isinstance(f, int) and f[0] == "P":
                    factors[i : i + 1] = list(f[1])
                    continue
                s = self.size_of(f)
                if size_quot(target, prod * s) is not None:
                    acc.append(f)
                    prod = prod * s
                    i += 1
                    continue
                need = size_quot(target, prod)
                rest = size_quot(s, need) if need is not None else None
                if rest is None:
                    return None
                if not isinstance(f, int):
                    parts = f[1]
                    if not (len(parts) == need and all(size_eq(self.size_of(c), rest) for c in parts)):
                        return None
                    for c in parts[1:]:
                        self.unify(parts[0], c, where)
                    copies = self.new(need)
                    self.block(copies, where, "concatenated parts viewed as a separate dim")
                    factors[i : i + 1] = [copies, parts[0]]
                    continue
                head, tail = self.new(need), self.new(rest)
                self.refine(f, ("P", (head, tail)))
                acc.append(head)
                prod = prod * need
                factors[i] = tail
            out.append(acc[0] if len(acc) == 1 else ("P", tuple(acc)))
        if any(not size_eq(self.size_of(f), 1) for f in factors[i:]):
            return None
        return out

    def split_concat(self, lay: Layout, sizes: list[Size]) -> list[Layout] | None:
        """Express ``lay`` as a concatenation of consecutive parts of the given sizes."""
        e = self.expand(lay)
        if len(sizes) == 1:
            return [e]
        if isinstance(e, int):
            parts = [self.new(s) for s in sizes]
            self.refine(e, ("C", tuple(parts)))
            return list(parts)
        if e[0] != "C":
            return None
        children = list(e[1])
        out: list[Layout] = []
        i = 0
        for target in sizes:
            acc: list[Layout] = []
            total: Size = 0
            while not size_eq(total, target):
                if i >= len(children):
                    return None
                c = children[i]
                s = self.size_of(c)
                if isinstance(target, int) and isinstance(s, int) and total + s > target:
                    if not isinstance(c, int):
                        return None
                    head, tail = self.new(target - total), self.new(s - (target - total))
                    self.refine(c, ("C", (head, tail)))
                    children[i] = tail
                    acc.append(head)
                    total = target
                    continue
                acc.append(c)
                total = total + s
                i += 1
            out.append(acc[0] if len(acc) == 1 else ("C", tuple(acc)))
        return out if i == len(children) else None

    def occurrences(self, lay: Layout, leaf: int) -> list[tuple[int, int]]:
        """(offset, unit) of structure 0 of ``leaf`` inside ``lay``: structure i owns offset+i*unit+[0,unit)."""
        return self._occurrences(self.expand(lay), leaf)

    def _occurrences(self, e: Layout, leaf: int) -> list[tuple[int, int]]:
        if isinstance(e, int):
            return [(0, 1)] if e == leaf else []
        kind, children = e
        if kind == "C":
            out, start = [], 0
            for c in children:
                out += [(start + o, u) for o, u in self._occurrences(c, leaf)]
                start += int(self.size_of(c))
            return out
        hits = [j for j, c in enumerate(children) if _contains(c, leaf)]
        if not hits:
            return []
        if len(hits) > 1:
            raise NotSliceable("the structure repeats along two factors of one dim")
        j = hits[0]
        inner = int(size_prod(self.size_of(c) for c in children[j + 1 :]))
        outer = int(size_prod(self.size_of(c) for c in children[:j]))
        span = int(self.size_of(children[j])) * inner
        sub = self._occurrences(children[j], leaf)
        return [(m * span + o * inner, u * inner) for m in range(outer) for o, u in sub]

    def describe(self, lay: Layout) -> str:
        e = self.expand(lay)
        if isinstance(e, int):
            return str(self.size[e])
        sep = "x" if e[0] == "P" else "+"
        return "(" + sep.join(self.describe(c) for c in e[1]) + ")"


# ----------------------------------------------------------------------------- graph walk


@dataclass
class Tag:
    """A parameter dim's role at one node: producer rows, consumer columns, or follower."""

    param: fx.Node
    dim: int
    role: str  # "producer" | "consumer" | "follower"
    node: fx.Node
    op: str = ""
    kernel: int = 1
    grouped: bool = False


@dataclass
class ShapeCandidate:
    """An integer constant in ``node``'s args whose value is the size of ``layouts``.

    ``uniform``: one constant sizes several layouts (``split(x, n)``), so it can only be
    rewritten when every layout shrinks by the same amount.
    """

    node: fx.Node
    arg: int | str
    index: int | None
    layouts: list[Layout]
    uniform: bool = False


@dataclass
class ClassInfo:
    params: list[tuple[fx.Node, int]] = field(default_factory=list)
    region: list[fx.Node] = field(default_factory=list)


class GraphAnalysis:
    """One walk over ``ep.graph`` applying the op table; then ``groups()`` reads off the plan."""

    def __init__(self, ep: torch.export.ExportedProgram):
        from osscar_export.passes.op_rules import rule_for  # op_rules imports this module

        self.ep = ep
        self.graph = ep.graph
        self.space = DimSpace()
        self.dims: dict[fx.Node, Any] = {}
        self.tags: list[Tag] = []
        self.candidates: list[ShapeCandidate] = []
        self.touched: dict[fx.Node, list[Layout]] = {}
        self.rule_errors: list[str] = []
        self._expand_cache: dict[Layout, Layout] = {}
        sig = ep.graph_signature
        self.fqn: dict[str, str] = {
            **sig.inputs_to_parameters,
            **sig.inputs_to_buffers,
            **sig.inputs_to_lifted_tensor_constants,
        }
        self.user_inputs = set(sig.user_inputs)
        self._rule_for = rule_for

    # -- helpers used by op rules
    def where(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return f"{path}:{node.name}" if path else node.name

    def is_tensor(self, x: Any) -> bool:
        return isinstance(x, fx.Node) and isinstance(self.dims.get(x), list)

    def param_fqn(self, x: Any) -> str | None:
        if isinstance(x, fx.Node) and x.op == "placeholder":
            return self.fqn.get(x.name)
        return None

    def shape(self, x: fx.Node, index: int | None = None) -> tuple[Size, ...]:
        val = x.meta["val"]
        if index is not None:
            val = val[index]
        return tuple(to_size(s) for s in val.shape)

    def fresh(self, size: Size, *flags: str) -> int:
        return self.space.new(size, *flags)

    def fresh_dims(self, shape: Iterable[Size], *flags: str) -> list[Layout]:
        return [self.space.new(s, *flags) for s in shape]

    def unify(self, a: Layout, b: Layout, node: fx.Node) -> None:
        self.space.unify(a, b, self.where(node))

    def block(self, lay: Layout, node: fx.Node, reason: str) -> None:
        self.space.block(lay, self.where(node), reason)

    def tag(self, param: fx.Node, dim: int, role: str, node: fx.Node, **info: Any) -> None:
        self.tags.append(Tag(param, dim, role, node, **info))
        if role == "producer":
            self.space.flag(self.dims[param][dim], "producer")

    def shape_arg(self, node: fx.Node, arg: int | str, index: int | None, layouts: list[Layout], uniform: bool = False) -> None:
        self.candidates.append(ShapeCandidate(node, arg, index, list(layouts), uniform))

    # -- the walk
    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                for x in _flat_nodes(node.args):
                    for lay in self._all_dims(x):
                        self.block(lay, node, GRAPH_OUTPUT)

    def _placeholder(self, node: fx.Node) -> None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return
        dims = self.fresh_dims(self.shape(node))
        self.dims[node] = dims
        if node.name in self.user_inputs:
            for lay in dims:
                self.space.block(lay, node.name, GRAPH_INPUT)

    def _call(self, node: fx.Node) -> None:
        rule = self._rule_for(node.target)
        inputs = list(_flat_nodes((node.args, node.kwargs)))
        try:
            if rule is None:
                self.block_everything(node, f"{_op_name(node.target)} is not in the op table")
            else:
                rule(self, node)
        except Exception as exc:  # a rule that cannot handle these args blocks instead of guessing
            self.rule_errors.append(f"{node.name} ({_op_name(node.target)}): {type(exc).__name__}: {exc}")
            self.block_everything(node, f"rule for {_op_name(node.target)} failed: {type(exc).__name__}: {exc}")
        touched: list[Layout] = []
        for x in inputs + [node]:
            touched.extend(self._all_dims(x))
        if touched:
            self.touched[node] = touched

    def block_everything(self, node: fx.Node, reason: str) -> None:
        for x in _flat_nodes((node.args, node.kwargs)):
            for lay in self._all_dims(x):
                self.block(lay, node, reason)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            self.dims[node] = self.fresh_dims(self.shape(node))
        elif isinstance(val, (list, tuple)):
            self.dims[node] = tuple(
                self.fresh_dims(to_size(s) for s in v.shape) if isinstance(v, torch.Tensor) else None for v in val
            )
        for lay in self._all_dims(node):
            self.block(lay, node, reason)

    def _all_dims(self, x: fx.Node) -> list[Layout]:
        d = self.dims.get(x)
        if isinstance(d, list):
            return d
        if isinstance(d, tuple):
            return [lay for part in d if part is not None for lay in part]
        return []

    # -- reading off the plan (no refinement happens any more: expanded layouts can be cached)
    def _expanded(self, lay: Layout) -> Layout:
        hit = self._expand_cache.get(lay)
        if hit is None:
            hit = self._expand_cache[lay] = self.space.expand(lay)
        return hit

    def groups(self) -> tuple[list[StructureGroup], list[tuple[str, str]]]:
        sp = self.space
        infos: dict[int, ClassInfo] = defaultdict(ClassInfo)
        order: dict[int, int] = {}
        param_nodes = [n for n in self.graph.nodes if n.op == "placeholder" and n.name in self.fqn and n in self.dims]
        for p in param_nodes:
            for d, lay in enumerate(self.dims[p]):
                for leaf in dict.fromkeys(sp.leaves(lay)):
                    infos[leaf].params.append((p, d))
        for node, lays in self.touched.items():
            seen: set[int] = set()
            for lay in lays:
                for leaf in sp.leaves(lay):
                    if leaf in infos and leaf not in seen:
                        seen.add(leaf)
                        infos[leaf].region.append(node)
        tags_at: dict[tuple[fx.Node, int], list[Tag]] = defaultdict(list)
        for t in self.tags:
            tags_at[(t.param, t.dim)].append(t)
        node_index = {n: i for i, n in enumerate(self.graph.nodes)}
        cand_leaves = [(c, [sp.leaves(lay) for lay in c.layouts]) for c in self.candidates]
        by_leaf_cands: dict[int, list[int]] = defaultdict(list)
        for ci, (_, leaf_lists) in enumerate(cand_leaves):
            for leaf in dict.fromkeys(x for ll in leaf_lists for x in ll):
                by_leaf_cands[leaf].append(ci)

        built: dict[int, StructureGroup] = {}
        blocked: dict[int, list[str]] = {}
        for leaf, info in infos.items():
            roles = [t for pd in info.params for t in tags_at.get(pd, ())]
            if not any(t.role in ("producer", "consumer") for t in roles):
                continue  # kernel dims, vocab rows, position rows: not a width anyone chooses
            try:
                built[leaf] = self._group(leaf, info, tags_at, by_leaf_cands)
                order[leaf] = min(node_index[t.node] for t in roles if t.role == "producer")
            except _Blocked as exc:
                blocked[leaf] = exc.reasons
        # A shape constant that is the product of two prunable widths cannot be rewritten by
        # ``old - removed*unit``: block both.
        changed = True
        while changed:
            changed = False
            for c in self.candidates:
                for lay in c.layouts:
                    for prunable in self._product_conflicts(lay, built):
                        for leaf in prunable:
                            if built.pop(leaf, None) is not None:
                                blocked[leaf] = [f"{self.where(c.node)}: shape constant is a product of two prunable widths"]
                                changed = True
        groups = [built[k] for k in sorted(built, key=lambda k: order[k])]
        groups = _unique_names(groups)
        blocked_list = []
        for leaf, reasons in blocked.items():
            p, d = infos[leaf].params[0]
            more = len(infos[leaf].params) - 1
            where = f"{self.fqn[p.name]}[dim {d}]" + (f" (+{more} tensors)" if more else "")
            blocked_list.append((where, "; ".join(reasons)))
        return groups, blocked_list

    def _product_conflicts(self, lay: Layout, built: dict[int, StructureGroup]) -> list[list[int]]:
        e = self.space.expand(lay)
        if isinstance(e, int):
            return []
        out: list[list[int]] = []
        if e[0] == "P":
            per_child = [[x for x in dict.fromkeys(self.space.leaves(c)) if x in built] for c in e[1]]
            if sum(1 for x in per_child if x) > 1:
                out.append([x for xs in per_child for x in xs])
        for c in e[1]:
            out.extend(self._product_conflicts(c, built))
        return out

    def _group(self, leaf: int, info: ClassInfo, tags_at: dict, by_leaf_cands: dict) -> StructureGroup:
        sp = self.space
        reasons = [f"{w}: {r}" for w, r in sp.blocks.get(leaf, [])]
        if reasons:
            raise _Blocked(reasons)
        count = sp.size[leaf]
        if not isinstance(count, int):
            raise _Blocked([f"symbolic width {count}"])
        if count < 2:
            raise _Blocked(["a single structure"])
        producers: list[Slice] = []
        followers: list[Slice] = []
        consumers: list[Consumer] = []
        for p, d in info.params:
            target = self.fqn[p.name]
            try:
                occ = sp._occurrences(self._expanded(self.dims[p][d]), leaf)
            except NotSliceable as exc:
                raise _Blocked([f"{target}[dim {d}]: {exc}"]) from None
            units = {u for _, u in occ}
            if len(units) != 1:
                raise _Blocked([f"{target}[dim {d}]: the structure has different sizes at different offsets"])
            sl = Slice(target=target, dim=d, unit=units.pop(), offsets=tuple(sorted(o for o, _ in occ)))
            tags = tags_at.get((p, d), [])
            cons = [t for t in tags if t.role == "consumer"]
            if cons:
                if len(cons) > 1 or len(tags) > len(cons):
                    raise _Blocked([f"{target} is used by several layers ({', '.join(t.node.name for t in tags)})"])
                t = cons[0]
                whole = int(p.meta["val"].shape[d])
                full = not t.grouped and len(sl.offsets) * sl.unit * count == whole
                consumers.append(
                    Consumer(node=t.node.name, op=t.op, weight=target, input=sl, group_size=sl.unit * t.kernel, full=full)
                )
            elif any(t.role == "producer" for t in tags):
                producers.append(sl)
            else:
                followers.append(sl)
        if not producers:
            raise _Blocked(["no producer: the dim is not created by weight rows"])
        if not consumers:
            raise _Blocked(["no consumer: the dim is never contracted with a weight"])
        shape_args = self._shape_args(leaf, by_leaf_cands)
        region = tuple(n.name for n in info.region if n.op == "call_function")
        roles = [t for pd in info.params for t in tags_at.get(pd, ()) if t.role != "follower"]
        kind = self._kind(leaf, roles)
        return StructureGroup(
            name=self._name(kind, producers, consumers),
            kind=kind,
            count=count,
            unit=consumers[0].group_size,
            consumers=tuple(consumers),
            producers=tuple(producers),
            followers=tuple(followers),
            shape_args=tuple(shape_args),
            region=region,
        )

    def _shape_args(self, leaf: int, by_leaf_cands: dict) -> list[ShapeArg]:
        out = []
        for ci in by_leaf_cands.get(leaf, []):
            c = self.candidates[ci]
            try:
                units = [sum(u for _, u in self.space._occurrences(self._expanded(lay), leaf)) for lay in c.layouts]
            except NotSliceable as exc:
                raise _Blocked([f"{self.where(c.node)}: shape constant: {exc}"]) from None
            if c.uniform and len(set(units)) != 1:
                raise _Blocked([f"{self.where(c.node)}: one split size for chunks that shrink differently"])
            unit = units[0] if c.uniform else sum(units)
            if unit:
                out.append(ShapeArg(node=c.node.name, arg=c.arg, index=c.index, unit=unit))
        return out

    def _kind(self, leaf: int, roles: list[Tag]) -> str:
        if self.space.has_flag(leaf, "kv"):
            return "kv_group"
        if self.space.has_flag(leaf, "head"):
            return "head"
        if any("conv" in _op_name(t.node.target) for t in roles):
            return "channel"
        return "neuron"

    def _name(self, kind: str, producers: list[Slice], consumers: list[Consumer]) -> str:
        first = _module_of(producers[0].target)
        if kind == "channel":
            return f"{first}.{kind}" if first else kind
        paths = [_module_of(s.target).split(".") for s in producers] + [
            _module_of(c.weight).split(".") for c in consumers
        ]
        common: list[str] = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        prefix = ".".join(common) or first
        return f"{prefix}.{kind}" if prefix else kind


class _Blocked(Exception):
    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def _contains(e: Layout, leaf: int) -> bool:
    """Whether an expanded layout has ``leaf`` among its leaves."""
    if isinstance(e, int):
        return e == leaf
    return any(_contains(c, leaf) for c in e[1])


def _module_of(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


def _unique_names(groups: list[StructureGroup]) -> list[StructureGroup]:
    seen: dict[str, int] = {}
    out = []
    for g in groups:
        n = seen.get(g.name, 0)
        seen[g.name] = n + 1
        if n:
            g = replace(g, name=f"{g.name}.{n}")
        out.append(g)
    return out


def _flat_nodes(x: Any) -> Iterable[fx.Node]:
    if isinstance(x, fx.Node):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat_nodes(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat_nodes(y)


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", None) or str(target)


# ----------------------------------------------------------------------------- the pass


class FindStructures(Pass[StructurePlan]):
    """Analysis pass: ExportedProgram -> StructurePlan. Pure: reads the graph, never the weights."""

    name = "find_structures"

    def requires(self, ep: torch.export.ExportedProgram, example_inputs: tuple = ()) -> None:
        if not isinstance(ep, torch.export.ExportedProgram):
            raise PlanError(f"find_structures needs a torch.export.ExportedProgram, got {type(ep).__name__}")
        missing = [n.name for n in ep.graph.nodes if n.op == "call_function" and "val" not in n.meta]
        if missing:
            raise PlanError(f"graph nodes without shape metadata ('val'): {missing[:5]}; re-export the model")

    def run(self, ep: torch.export.ExportedProgram, example_inputs: tuple = ()) -> PassResult[StructurePlan]:
        analysis = GraphAnalysis(ep)
        analysis.run()
        groups, blocked = analysis.groups()
        blocked += [("op rule", err) for err in analysis.rule_errors]
        return PassResult(StructurePlan(program=ep, example_inputs=tuple(example_inputs), groups=groups, blocked=blocked), changed=False)

    def ensures(self, result: PassResult[StructurePlan], ep: torch.export.ExportedProgram, example_inputs: tuple = ()) -> None:
        plan = result.value
        tensors = {**ep.state_dict, **ep.constants}
        nodes = {n.name: n for n in ep.graph.nodes}
        names = [g.name for g in plan.groups]
        if len(set(names)) != len(names):
            raise PlanError(f"duplicate group names in plan: {sorted(n for n in names if names.count(n) > 1)[:5]}")
        for g in plan.groups:
            if g.count < 2 or g.unit < 1 or not g.producers or not g.consumers:
                raise PlanError(f"group {g.name}: count={g.count} unit={g.unit} needs producers and consumers")
            for sl in g.slices() + tuple(c.input for c in g.consumers):
                if sl.target not in tensors:
                    raise PlanError(f"group {g.name}: slice target {sl.target!r} is not in the program's state")
                extent = tensors[sl.target].shape[sl.dim]
                idx = sl.indices(torch.arange(g.count))
                if int(idx.max()) >= extent or len(set(idx.tolist())) != idx.numel():
                    raise PlanError(f"group {g.name}: slice {sl} leaves dim {sl.dim} (size {extent}) or overlaps")
            for c in g.consumers:
                kernel = math.prod(tensors[c.weight].shape[2:]) if c.op.startswith("conv") else 1
                if c.group_size != c.input.unit * kernel:
                    raise PlanError(f"group {g.name}: consumer {c.node} group_size {c.group_size} != unit*kernel")
                if c.full and c.input.unit * len(c.input.offsets) * g.count != tensors[c.weight].shape[c.input.dim]:
                    raise PlanError(f"group {g.name}: consumer {c.node} marked full but does not own every input row")
            for s in g.shape_args:
                if s.node not in nodes:
                    raise PlanError(f"group {g.name}: shape arg names unknown node {s.node}")


def find_structures(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: tuple[Any, ...] | torch.Tensor = (),
    dynamic_shapes: Any = None,
) -> StructurePlan:
    """Capture ``model`` (unless it is already an ExportedProgram) and find its structure groups."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    ep = model if isinstance(model, torch.export.ExportedProgram) else capture(model, example_inputs, dynamic_shapes)
    return FindStructures()(ep, tuple(example_inputs)).value
