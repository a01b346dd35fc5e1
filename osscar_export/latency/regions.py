"""The region of each group: the smallest part of the captured model that can be timed alone.

A group's region is the smallest proper submodule holding all its producers, followers and
consumers (e.g. ``model.layers.0.mlp``), re-captured with the inputs it saw in one forward. When
only the root owns the group (a stem spanning top-level modules) the region is instead the
subgraph of the group's region nodes (plus the nodes between them), fed with the values recorded
from one run of the program: timing the whole model per width would be slow and noisy.

A region's signature is computed before it is analysed, so identical regions (the decoder
layers of an LM) are analysed and timed once. See docs/design.md, section Latency.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from osscar_export.cache import digest
from osscar_export.errors import PlanError
from osscar_export.passes.structures import find_structures
from osscar_export.plan import StructureGroup, StructurePlan


@dataclass
class Region:
    """A group's region, ready to materialize and time: a module, its recorded inputs, its plan.

    ``path`` is the owning submodule, or ``"<graph>"`` for a subgraph cut out of the program.
    """

    path: str
    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    plan: StructurePlan
    group: StructureGroup  # the group in ``plan`` (names relative to the region)


def group_regions(plan: StructurePlan, timed: Callable[[StructureGroup, str], bool],
                  log: Callable[[str], None]) -> Iterator[tuple[StructureGroup, Region]]:
    """The region of every group of ``plan`` whose signature ``timed`` does not know yet.

    ``timed(group, signature)`` is told each group's signature (possibly several, as larger
    modules are tried) and answers whether a region with it is fully timed already; such a region
    is not analysed. Time each region before drawing the next, so identical ones are then known.
    """
    # unflatten mutates the program it is given (graph and meta): work on a copy, the plan is read-only
    root = torch.export.unflatten(copy.deepcopy(plan.program))
    paths = {p for g in plan.groups for p in owning_paths(g)} - {""}
    calls = _record_inputs(root, paths, tuple(plan.example_inputs))
    on_graph: list[StructureGroup] = []
    for g in plan.groups:
        candidates, skipped = _module_candidates(g, root, calls)
        for path, module, inputs in candidates:
            if timed(g, _module_signature(module, inputs, g, f"{path}.")):
                break
            sub_plan = find_structures(module, inputs)
            sub = _match(sub_plan, g, lambda t, path=path: f"{path}.{t}")
            if sub is not None:
                yield g, Region(path, module, inputs, sub_plan, sub)
                break
            skipped.append(f"{path}: its plan has no group with the same producers")
        else:
            log(f"{g.name}: no module region ({'; '.join(skipped) or 'only the root owns it'}), cutting a subgraph")
            on_graph.append(g)
    # graph regions read the program only (no unflatten, no mutation): no copy needed
    cuts = {g.name: _cut(plan.program, g) for g in on_graph}
    values = _record_values(plan.program, {n.name for c in cuts.values() for n in c.inputs}, tuple(plan.example_inputs)) if cuts else {}
    for g in on_graph:
        gm, inputs, fqn = _graph_module(plan.program, cuts[g.name], values)
        if timed(g, _cut_signature(gm, inputs, g, fqn)):
            continue
        sub_plan = find_structures(gm, inputs)
        sub = _match(sub_plan, g, lambda t: fqn.get(t, t))
        if sub is None:
            raise PlanError(
                f"no region to measure group {g.name!r} in: its subgraph of {len(cuts[g.name].nodes)} nodes "
                f"has no group with the same producers ({[s.target for s in g.producers]})"
            )
        yield g, Region("<graph>", gm, inputs, sub_plan, sub)


def owning_paths(group: StructureGroup) -> list[str]:
    """Module paths from the smallest one holding every tensor the group touches up to the root."""
    fqns = [s.target for s in group.slices()] + [c.weight for c in group.consumers]
    common = os.path.commonprefix([f.split(".")[:-1] for f in fqns])
    return [".".join(common[:i]) for i in range(len(common), -1, -1)]


# --------------------------------------------------------------------------------------------
# signatures: what a region's latency depends on, with names made region-relative


def _graph_key(graph: torch.fx.Graph) -> list:
    """Op sequence, wiring (nodes by position) and tensor shapes of a graph, for hashing."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    rows = []
    for node in graph.nodes:
        val = node.meta.get("val")
        shape = [str(tuple(val.shape)), str(val.dtype)] if isinstance(val, torch.Tensor) else None  # str: SymInts
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        target = "" if node.op in ("placeholder", "output") else str(node.target)  # names of values flowing in
        rows.append([node.op, target, str(args), shape])
    return rows


def _tensor_key(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> list:
    items = tensors.items() if isinstance(tensors, Mapping) else enumerate(tensors)
    return [[str(k), list(t.shape), str(t.dtype)] for k, t in items if isinstance(t, torch.Tensor)]


def _group_key(group: StructureGroup, rename: Callable[[str], str]) -> dict[str, Any]:
    """What of a group a region's latency depends on, with parameter names made region-relative."""
    return {
        "kind": group.kind, "count": group.count,
        "slices": sorted([rename(s.target), s.dim, s.unit, list(s.offsets)] for s in group.slices()),
        "consumers": sorted([rename(c.weight), c.input.dim, c.input.unit] for c in group.consumers),
    }


def _module_signature(module: torch.nn.Module, inputs: Sequence[torch.Tensor], group: StructureGroup, prefix: str) -> str:
    """Signature of a module region, computable before ``find_structures`` (identical layers:
    same code, shapes, relative parameter names and group tensors → same signature)."""
    graphs = [[name, _graph_key(m.graph)] for name, m in module.named_modules() if isinstance(getattr(m, "graph", None), torch.fx.Graph)]
    tensors = _tensor_key(dict(module.named_parameters())) + _tensor_key(dict(module.named_buffers()))
    return digest({
        "module": graphs, "tensors": tensors, "inputs": _tensor_key(inputs),
        "group": _group_key(group, lambda f: f.removeprefix(prefix)),
    })[:24]


def _cut_signature(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], group: StructureGroup, fqn: Mapping[str, str]) -> str:
    """Signature of a graph region (parameters are named ``p0, p1, ...`` in it)."""
    name = {f: n for n, f in fqn.items()}
    return digest({
        "graph": _graph_key(gm.graph), "tensors": _tensor_key(dict(gm.state_dict())), "inputs": _tensor_key(inputs),
        "group": _group_key(group, lambda f: name.get(f, f)),
    })[:24]


# --------------------------------------------------------------------------------------------
# module regions: submodules of the unflattened program, with the inputs of one forward


def _record_inputs(root: torch.nn.Module, paths: set[str], example_inputs: tuple) -> dict[str, list]:
    """Positional inputs of every call of the given submodules during one forward."""
    calls: dict[str, list] = {p: [] for p in paths}
    handles = []
    for path in paths:
        def hook(module, args, kwargs, path=path):
            calls[path].append((args, kwargs))

        handles.append(root.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            root(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _module_candidates(group: StructureGroup, root: torch.nn.Module, calls: Mapping[str, list]) -> tuple[list, list[str]]:
    """(path, module, inputs) of every proper submodule owning the group that was called once with
    plain tensors, smallest first; and why the others were skipped. The root is never one: timing
    the whole model per width is slow and noisy, the graph region replaces it."""
    found, skipped = [], []
    for path in owning_paths(group)[:-1]:
        recorded = calls.get(path, [])
        if len(recorded) != 1:
            skipped.append(f"{path}: called {len(recorded)} times")
            continue
        args, kwargs = recorded[0]
        if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
            skipped.append(f"{path}: inputs are not plain tensors")
            continue
        found.append((path, root.get_submodule(path), tuple(args)))
    return found, skipped


def _match(sub_plan: StructurePlan, group: StructureGroup, fqn: Callable[[str], str]) -> StructureGroup | None:
    """The group of a region's plan that is ``group`` (same count and producer parameters)."""
    producers = {s.target for s in group.producers}
    for g in sub_plan.groups:
        if g.count == group.count and {fqn(s.target) for s in g.producers} == producers:
            return g
    return None


# --------------------------------------------------------------------------------------------
# graph regions: the group's nodes cut out of the program, for groups owned only by the root


def _hull(graph: torch.fx.Graph, region: set[str]) -> list[torch.fx.Node]:
    """The region's nodes plus every node on a path between two of them, in graph order."""
    nodes = list(graph.nodes)
    below: set[torch.fx.Node] = set()  # reachable from the region
    for n in nodes:
        if n.name in region or any(a in below for a in n.all_input_nodes):
            below.add(n)
    above: set[torch.fx.Node] = set()  # reaching the region
    for n in reversed(nodes):
        if n.name in region or any(u in above for u in n.users):
            above.add(n)
    return [n for n in nodes if n.op == "call_function" and (n.name in region or (n in below and n in above))]


@dataclass
class _Cut:
    """A group's subgraph before its inputs are known: nodes, external inputs, parameters, outputs."""

    nodes: list[torch.fx.Node]
    inputs: list[torch.fx.Node]  # activations flowing in (recorded from one run)
    params: list[torch.fx.Node]  # program placeholders of parameters/buffers/constants, first use order
    outputs: list[torch.fx.Node]  # region values used outside it


def _cut(program: torch.export.ExportedProgram, group: StructureGroup) -> _Cut:
    if not group.region:
        raise PlanError(f"group {group.name!r} has no region nodes: cannot cut its subgraph out of the program")
    nodes = _hull(program.graph, set(group.region))
    inside = set(nodes)
    lifted = {s.arg.name for s in program.graph_signature.input_specs if s.kind != torch.export.graph_signature.InputKind.USER_INPUT}
    inputs: dict[torch.fx.Node, None] = {}
    params: dict[torch.fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                (params if a.op == "placeholder" and a.name in lifted else inputs)[a] = None
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return _Cut(nodes, list(inputs), list(params), outputs)


def _record_values(program: torch.export.ExportedProgram, names: set[str], example_inputs: tuple) -> dict[str, Any]:
    """Values of the named nodes in one run of the program on its example inputs."""
    state = {**program.state_dict, **program.constants}
    user = iter(torch.utils._pytree.tree_leaves(example_inputs))
    args = [next(user) if s.kind == torch.export.graph_signature.InputKind.USER_INPUT else state[s.target] for s in program.graph_signature.input_specs]
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in names:
                values[n.name] = out
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(*args)
    return values


def _graph_module(program: torch.export.ExportedProgram, cut: _Cut, values: Mapping[str, Any]) -> tuple[torch.fx.GraphModule, tuple, dict[str, str]]:
    """The cut as a module: tensors flowing in are placeholders (other values are inlined),
    parameters are attributes named ``p0, p1, ...`` in first-use order (so identical cuts at
    different depths have identical modules). Returns the module, its inputs and name → FQN."""
    targets = {s.arg.name: s.target for s in program.graph_signature.input_specs if s.target is not None}
    state = {**program.state_dict, **program.constants}
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    inputs = []
    for n in cut.inputs:
        if isinstance(values[n.name], torch.Tensor):
            env[n] = graph.placeholder(n.name)
            env[n].meta = dict(n.meta)
            inputs.append(values[n.name])
        else:
            env[n] = values[n.name]
    fqn = {}
    for i, n in enumerate(cut.params):
        name, t = f"p{i}", state[targets[n.name]]
        fqn[name] = targets[n.name]
        if isinstance(t, torch.nn.Parameter):
            root.register_parameter(name, t)
        else:
            root.register_buffer(name, t)
        env[n] = graph.get_attr(name)
        env[n].meta = dict(n.meta)
    for n in cut.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    outs = [env[n] for n in cut.outputs]
    graph.output(outs[0] if len(outs) == 1 else tuple(outs))
    return torch.fx.GraphModule(root, graph), tuple(inputs), fqn
