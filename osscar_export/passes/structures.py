"""find_structures: every coupled prunable structure of a captured graph.

See docs/design.md, "Structures" (the plan it writes) and "Op rules" (the analysis and its policy).

How it works. Every dimension of every tensor in ``ep.graph`` (the ATen graph before
``run_decompositions``) gets a *layout*: an atom (a union-find class of index spaces that must be
pruned together), or a product / concatenation of layouts (``dims.py``). Reshapes split and
merge atoms into products (``E -> (heads, head_dim)``), ``cat``/``split`` into concatenations,
elementwise ops unify the dims they combine. Each ATen op's effect on dims is one rule in
``rules/``; an op without a rule blocks every dim it touches. After one walk over the graph
(``analysis.py``), every leaf atom that touches a producer (weight rows that create it) and a
consumer (weight columns that contract it), and was never blocked, is a ``StructureGroup``; its
tensor slices come from where the atom sits inside each parameter's layout (this module).

Policy decisions (each a blocked reason, never a silent pass-through):
- dims reaching a graph input or output are fixed;
- residual streams (channels summed from several producers, ``x + f(x)``) are fixed;
- normalised-over dims (LayerNorm, RMSNorm, GroupNorm, softmax) and reduced dims are fixed;
- head_dim is pruned only as whole heads (its size sets the attention scale);
- grouped-query attention: a KV head goes only together with all its query heads (kind
  ``kv_group``: k/v rows unit ``head_dim``, q rows and o_proj columns unit ``n_rep*head_dim``,
  the ``expand``/``reshape`` constants of ``repeat_kv`` rewritten). Query heads within one
  of several KV groups are blocked; with MQA (one KV head shared by all) the query heads are
  pruned alone (kind ``query_head``: q rows and o_proj columns unit ``head_dim``, k/v untouched).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from osscar_export.errors import PlanError
from osscar_export.passes.analysis import GraphAnalysis, Tag, op_name
from osscar_export.passes.base import Pass, PassResult, PruneState, run_passes
from osscar_export.passes.capture import Capture
from osscar_export.passes.dims import Layout, NotSliceable
from osscar_export.passes.rules import rule_for
from osscar_export.plan import Consumer, ShapeArg, Slice, StructureGroup, StructurePlan


@dataclass
class _LeafInfo:
    """Where one leaf atom sits: the parameter dims it spans and the nodes that touch it."""

    params: list[tuple[fx.Node, int]] = field(default_factory=list)
    region: list[fx.Node] = field(default_factory=list)


class _Blocked(Exception):
    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class _GroupReader:
    """Reads the structure groups off a finished analysis; nothing is refined any more, so
    expanded layouts can be cached."""

    def __init__(self, analysis: GraphAnalysis):
        self.a = analysis
        self.sp = analysis.space
        self._expand_cache: dict[Layout, Layout] = {}

    def _expanded(self, lay: Layout) -> Layout:
        hit = self._expand_cache.get(lay)
        if hit is None:
            hit = self._expand_cache[lay] = self.sp.expand(lay)
        return hit

    def groups(self) -> tuple[list[StructureGroup], list[tuple[str, str]]]:
        a, sp = self.a, self.sp
        infos: dict[int, _LeafInfo] = defaultdict(_LeafInfo)
        order: dict[int, int] = {}
        param_nodes = [n for n in a.graph.nodes if n.op == "placeholder" and n.name in a.fqn and n in a.dims]
        for p in param_nodes:
            for d, lay in enumerate(a.dims[p]):
                for leaf in dict.fromkeys(sp.leaves(lay)):
                    infos[leaf].params.append((p, d))
        for node, lays in a.touched.items():
            seen: set[int] = set()
            for lay in lays:
                for leaf in sp.leaves(lay):
                    if leaf in infos and leaf not in seen:
                        seen.add(leaf)
                        infos[leaf].region.append(node)
        tags_at: dict[tuple[fx.Node, int], list[Tag]] = defaultdict(list)
        for t in a.tags:
            tags_at[(t.param, t.dim)].append(t)
        node_index = {n: i for i, n in enumerate(a.graph.nodes)}
        by_leaf_cands: dict[int, list[int]] = defaultdict(list)
        for ci, c in enumerate(a.candidates):
            for leaf in dict.fromkeys(x for lay in c.layouts for x in sp.leaves(lay)):
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
            for c in a.candidates:
                for lay in c.layouts:
                    for prunable in self._product_conflicts(lay, built):
                        for leaf in prunable:
                            if built.pop(leaf, None) is not None:
                                blocked[leaf] = [f"{a.where(c.node)}: shape constant is a product of two prunable widths"]
                                changed = True
        groups = _unique_names([built[k] for k in sorted(built, key=lambda k: order[k])])
        blocked_list = []
        for leaf, reasons in blocked.items():
            p, d = infos[leaf].params[0]
            more = len(infos[leaf].params) - 1
            where = f"{a.fqn[p.name]}[dim {d}]" + (f" (+{more} tensors)" if more else "")
            blocked_list.append((where, "; ".join(reasons)))
        return groups, blocked_list

    def _product_conflicts(self, lay: Layout, built: dict[int, StructureGroup]) -> list[list[int]]:
        e = self.sp.expand(lay)
        if isinstance(e, int):
            return []
        out: list[list[int]] = []
        if e[0] == "P":
            per_child = [[x for x in dict.fromkeys(self.sp.leaves(c)) if x in built] for c in e[1]]
            if sum(1 for x in per_child if x) > 1:
                out.append([x for xs in per_child for x in xs])
        for c in e[1]:
            out.extend(self._product_conflicts(c, built))
        return out

    def _group(self, leaf: int, info: _LeafInfo, tags_at: dict, by_leaf_cands: dict) -> StructureGroup:
        a, sp = self.a, self.sp
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
            target = a.fqn[p.name]
            try:
                occ = sp.occurrences(self._expanded(a.dims[p][d]), leaf)
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
            name=_name(kind, producers, consumers),
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
            c = self.a.candidates[ci]
            try:
                units = [sum(u for _, u in self.sp.occurrences(self._expanded(lay), leaf)) for lay in c.layouts]
            except NotSliceable as exc:
                raise _Blocked([f"{self.a.where(c.node)}: shape constant: {exc}"]) from None
            if c.uniform and len(set(units)) != 1:
                raise _Blocked([f"{self.a.where(c.node)}: one split size for chunks that shrink differently"])
            unit = units[0] if c.uniform else sum(units)
            if unit:
                out.append(ShapeArg(node=c.node.name, arg=c.arg, index=c.index, unit=unit))
        return out

    def _kind(self, leaf: int, roles: list[Tag]) -> str:
        if self.sp.has_flag(leaf, "kv"):
            return "kv_group"
        if self.sp.has_flag(leaf, "query"):
            return "query_head"
        if self.sp.has_flag(leaf, "head"):
            return "head"
        if any("conv" in op_name(t.node.target) for t in roles):
            return "channel"
        return "neuron"


def _name(kind: str, producers: list[Slice], consumers: list[Consumer]) -> str:
    """The deepest module shared by the group's weights, plus the kind (``layer1.0.conv1.channel``)."""
    first = _module_of(producers[0].target)
    if kind == "channel":
        return f"{first}.{kind}" if first else kind
    paths = [_module_of(s.target).split(".") for s in producers] + [_module_of(c.weight).split(".") for c in consumers]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    prefix = ".".join(common) or first
    return f"{prefix}.{kind}" if prefix else kind


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


# ----------------------------------------------------------------------------- the pass


class FindStructures(Pass):
    """Analysis pass: program -> plan. Pure: reads the graph, never the weights."""

    name = "find_structures"
    requires = ("program",)
    ensures = ("plan",)

    def check_input(self, state: PruneState) -> None:
        ep = state.program
        if not isinstance(ep, torch.export.ExportedProgram):
            raise PlanError(f"find_structures needs a torch.export.ExportedProgram, got {type(ep).__name__}")
        missing = [n.name for n in ep.graph.nodes if n.op == "call_function" and "val" not in n.meta]
        if missing:
            raise PlanError(f"graph nodes without shape metadata ('val'): {missing[:5]}; re-export the model")

    def run(self, state: PruneState) -> PassResult:
        ep = state.program
        analysis = GraphAnalysis(ep, rule_for)
        analysis.run()
        groups, blocked = _GroupReader(analysis).groups()
        blocked += [("op rule", err) for err in analysis.rule_errors]
        plan = StructurePlan(program=ep, example_inputs=tuple(state.example_inputs), groups=groups, blocked=blocked)
        return PassResult(state.replace(plan=plan), changed=False)

    def check_output(self, result: PassResult, state: PruneState) -> None:
        plan, ep = result.state.plan, state.program
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
    if isinstance(model, torch.export.ExportedProgram):
        state, passes = PruneState(program=model, example_inputs=tuple(example_inputs)), [FindStructures()]
    else:
        state, passes = PruneState(model=model, example_inputs=example_inputs), [Capture(dynamic_shapes), FindStructures()]
    return run_passes(passes, state).state.plan
