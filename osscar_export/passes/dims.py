"""The dim algebra: sizes and the union-find of index spaces that every tensor dim maps into.

A *layout* says how one tensor dim is made of *atoms* (index spaces that must be pruned
together): an atom id, a row-major product of layouts (``E -> (heads, head_dim)``), or a
concatenation (``cat``, ``split``). ``DimSpace`` unifies, refines and blocks atoms; the graph
walk that drives it is ``analysis.py`` (see docs/design.md, "Op rules").
"""

from __future__ import annotations

from typing import Any, Iterable, Union

import sympy
import torch

Size = Union[int, sympy.Expr]
# A layout is an atom id, or ("P", children) — row-major product, outer first — or ("C", children).
Layout = Union[int, tuple[str, tuple[Any, ...]]]

MAX_REASONS = 4  # block reasons kept per atom: enough to say why, short enough to read


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
    """Equality that also holds for symbolic sizes equal as expressions."""
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
    """Product of concrete or symbolic sizes (1 for none)."""
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

    def occurrences(self, e: Layout, leaf: int) -> list[tuple[int, int]]:
        """(offset, unit) of structure 0 of ``leaf`` in the expanded layout ``e``: structure i owns
        offset+i*unit+[0,unit). Taking ``e`` already expanded lets a caller cache expansions."""
        if isinstance(e, int):
            return [(0, 1)] if e == leaf else []
        kind, children = e
        if kind == "C":
            out, start = [], 0
            for c in children:
                out += [(start + o, u) for o, u in self.occurrences(c, leaf)]
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
        sub = self.occurrences(children[j], leaf)
        return [(m * span + o * inner, u * inner) for m in range(outer) for o, u in sub]

    def describe(self, lay: Layout) -> str:
        e = self.expand(lay)
        if isinstance(e, int):
            return str(self.size[e])
        sep = "x" if e[0] == "P" else "+"
        return "(" + sep.join(self.describe(c) for c in e[1]) + ")"


def _contains(e: Layout, leaf: int) -> bool:
    """Whether an expanded layout has ``leaf`` among its leaves."""
    if isinstance(e, int):
        return e == leaf
    return any(_contains(c, leaf) for c in e[1])
