"""Materialize at the ONNX level: slice the dense model's ONNX instead of re-exporting each variant.

``dense_onnx`` exports ``plan.program`` once (dynamo exporter, ``optimize=False`` so every integer
stays a ``Constant`` beside the nodes of the FX node it came from) and records where each ONNX
node came from. The outputs match the optimized export, but not its speed (a CNN's padding and
shape arithmetic stay in the graph), so a sliced model meant for timing goes through the
exporter's optimizer afterwards (``latency/build.py``).
``slice_onnx`` cuts the initializers (named by FQN) as ``materialize`` cuts tensors and rewrites
every integer that pruning changes. How integers are found, and why that is reliable:

- Links, not names: the exporter first decomposes the program, which renames nodes (``reshape`` ->
  ``clone`` + ``_unsafe_view``) and bakes sizes the plan never lists (``reshape(x, [1, -1, 8, 64])``
  -> ``view(x, [1, 9, 8, 64])``, ``flatten`` -> ``view(x, [1, 1280])``). Each decomposed node is
  tied to its node in the plan's graph by torch's ``from_node`` provenance, each ONNX node to its
  decomposed node by the exporter's ``pkg.torch.onnx.fx_node`` record.
- Sizes from torch: the plan's graph runs on fake tensors with the sliced weights and rewritten
  shape args (well under a second for SmolLM2); a view/reshape/expand that ends an FX node gets
  that node's pruned output shape (``-1`` kept).
- Other shape args (conv ``groups``, split sizes, slice bounds) are found by value among the ONNX
  nodes of their own FX node: a list must occur exactly once as a run of a constant list (a 1-D
  constant or a ``Concat`` of constants), a scalar as exactly one one-element constant or ``group``.
- Anything else fails closed with a ``PlanError`` (callers fall back to ``materialize``): no or
  several matches, a view that does not end its FX node, or any other node made by the
  decomposition that holds a size pruning changes.

The result must pass ``onnx.checker`` and strict shape inference (run without the weights' data).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch.utils import _pytree as pytree

from osscar_export.errors import PlanError
from osscar_export.passes.materialize import Masks, _check_slices, _cuts, _tensor_shapes, check_masks
from osscar_export.plan import ShapeArg, StructurePlan
from osscar_export.pruned_shapes import ArgEdits, Shapes, captured_shapes, pruned_args, run_shapes

FX_NODE = "osscar.fx_node"  # ONNX node metadata: the decomposed FX node it was translated from
FX_INFO = "osscar.fx_nodes"  # model metadata (JSON): decomposed FX node -> origin and integer args
_VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.expand.default"}
_FX_NAME = re.compile(r"%(\w+) :")

Slot = tuple[int, int, int]  # (ONNX node index, input position, element) or (node index, -1, 0): Conv group


# ---------------------------------------------------------------------------------------------
# export


def _origins(sources: Any, graph_id: int) -> set[str]:
    """Names of the nodes of graph ``graph_id`` in a ``from_node`` provenance chain."""
    out: set[str] = set()
    for s in sources or ():
        if s.graph_id == graph_id:
            out.add(s.name)
        out |= _origins(s.from_node, graph_id)
    return out


def _ints(value: Any) -> list[int]:
    return [v for v in pytree.tree_leaves(value) if type(v) is int and v > 0]


def _describe(node: torch.fx.Node, origin: torch.fx.Node | None, last: bool) -> dict[str, Any]:
    """What slicing needs to know about one decomposed node (``origin``: its node in the plan's graph,
    None when provenance names none or several)."""
    size = None
    if str(node.target) in _VIEWS:
        size = [v if type(v) is int else None for v in node.args[1]]  # symbolic sizes: None
    return {"origin": origin and origin.name, "made": origin is None or node.target != origin.target, "size": size,
            "last": last, "ints": _ints((node.args, node.kwargs))}


def dense_onnx(plan: StructurePlan, path: str | os.PathLike | None = None) -> onnx.ModelProto:
    """The dense ONNX of ``plan.program`` that ``slice_onnx`` edits (also written to ``path``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(plan.program, tuple(plan.example_inputs), dynamo=True, optimize=False,
                                    verbose=False)
    proto = program.model_proto
    if len(proto.functions):
        raise PlanError("the ONNX export has local functions (control flow); slice_onnx edits the main graph "
                        "only, use materialize")
    pre = {n.name: n for n in plan.program.graph.nodes}
    decomposed = [n for n in program.exported_program.graph.nodes if n.op == "call_function"]
    origin: dict[str, torch.fx.Node | None] = {}
    for n in decomposed:
        names = _origins(n.meta.get("from_node"), id(plan.program.graph))
        origin[n.name] = pre[names.pop()] if len(names) == 1 else None
    ends = set({o.name: name for name, o in origin.items() if o is not None}.values())  # last made from each
    info = {n.name: _describe(n, origin[n.name], n.name in ends) for n in decomposed}
    for node in proto.graph.node:
        fx = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.fx_node", "")
        if (m := _FX_NAME.match(fx)) and m.group(1) in info:
            node.metadata_props.add(key=FX_NODE, value=m.group(1))
    proto.metadata_props.add(key=FX_INFO, value=json.dumps(info))
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto


# ---------------------------------------------------------------------------------------------
# locating integers in the ONNX graph


def _int_constant(node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Constant" or len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value" and a.t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        return numpy_helper.to_array(a.t)
    if a.name in ("value_int", "value_ints"):
        return np.asarray(helper.get_attribute_value(a), dtype=np.int64)
    return None


@dataclass
class _Graph:
    """Index over the ONNX graph: integer constants by value name, nodes by decomposed FX node."""

    nodes: Any  # the graph's RepeatedCompositeFieldContainer[onnx.NodeProto]
    consts: dict[str, tuple[np.ndarray, int]]  # value name -> (value, index of its Constant node)
    sites: dict[str, list[int]]  # decomposed FX node -> indices of the ONNX nodes translated from it

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> "_Graph":
        consts, sites = {}, defaultdict(list)
        for i, node in enumerate(graph.node):
            if (value := _int_constant(node)) is not None:
                consts[node.output[0]] = (value, i)
            for p in node.metadata_props:
                if p.key == FX_NODE:
                    sites[p.value].append(i)
        return cls(graph.node, consts, dict(sites))

    def _read(self, node: onnx.NodeProto) -> list[tuple[int, np.ndarray | None]]:
        return [(k, self.consts[name][0] if name in self.consts else None) for k, name in enumerate(node.input)]

    def lists(self, site: list[int]) -> list[list[tuple[Slot, int] | None]]:
        """Every integer list the site's nodes read: 0/1-D constants, and Concats of them (any other
        Concat input counts as one unknown element, ``None``)."""
        out = []
        for i in site:
            concat = self.nodes[i].op_type == "Concat"
            parts = []
            for k, value in self._read(self.nodes[i]):
                if value is None or value.ndim > 1:
                    parts.append([None])
                    continue
                items = [((i, k, e), int(v)) for e, v in enumerate(value.reshape(-1))]
                (parts if concat else out).append(items)
            if concat:
                out.append([x for p in parts for x in p])
        return out

    def scalars(self, site: list[int], value: int) -> list[Slot]:
        """One-element integer constants read by the site, and Conv ``group`` attributes, equal to ``value``."""
        found = [(i, k, 0) for i in site for k, c in self._read(self.nodes[i])
                 if c is not None and c.size == 1 and int(c.reshape(-1)[0]) == value]
        for i in site:
            if self.nodes[i].op_type in ("Conv", "ConvTranspose"):
                group = next((a.i for a in self.nodes[i].attribute if a.name == "group"), 1)
                if group == value:
                    found.append((i, -1, 0))
        return found

    def locate(self, site: list[int], pattern: list[int | None], index: int, what: str) -> Slot:
        """The slot of ``pattern[index]``; ``pattern`` must occur exactly once in the site's lists."""
        found = set()
        for items in self.lists(site):
            for start in range(len(items) - len(pattern) + 1):
                window = items[start:start + len(pattern)]
                if all((p is None) == (w is None) and (p is None or w[1] == p) for p, w in zip(pattern, window)):
                    found.add(window[index][0])
        if len(found) != 1:
            raise PlanError(f"{what}: the list {pattern} occurs {len(found)} times in the ONNX nodes translated "
                            "from it, not once; cannot map it (use materialize)")
        return found.pop()


# ---------------------------------------------------------------------------------------------
# slicing


def _fx_info(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    raw = {p.key: p.value for p in model.metadata_props}.get(FX_INFO)
    if raw is None:
        raise PlanError("this ONNX model has no FX node record: export the dense model with "
                        "osscar_export.onnx_slice.dense_onnx")
    return json.loads(raw)


def _changed_sizes(plan: StructurePlan, dense: Shapes, new: Shapes, args: ArgEdits) -> dict[str, set[int]]:
    """Per FX node of the plan: dense sizes that pruning changes in its inputs, outputs and shape args."""
    out: dict[str, set[int]] = defaultdict(set)
    for (node, _, _), (_, old, _) in args.items():
        out[node].add(old)
    for n in plan.program.graph.nodes:
        for m in (n, *n.all_input_nodes):
            for a, b in zip(dense.get(m.name, ()), new.get(m.name, ())):
                out[n.name] |= {x for x, y in zip(a, b) if x != y}
    return {k: v for k, v in out.items() if v}


def _view_edits(g: _Graph, info: dict[str, dict[str, Any]], changed: dict[str, set[int]],
                new: Shapes) -> dict[Slot, int]:
    """Views, reshapes and expands that end an FX node take its pruned output shape (``-1`` kept);
    any other node the decomposition made must not hold a size that pruning changes."""
    edits: dict[Slot, int] = {}
    anywhere = set().union(*changed.values())
    for name, d in info.items():
        o = d["origin"]
        if o is None and anywhere & set(d["ints"]):
            raise PlanError(f"node {name!r} of the exported graph has no single origin in the plan's graph and "
                            "holds a size that pruning changes; cannot slice at the ONNX level (use materialize)")
        if o not in changed:
            continue
        if d["size"] is not None and d["last"] and len(new[o]) == 1:
            for i, (s, n) in enumerate(zip(d["size"], new[o][0])):
                if s is not None and s not in (-1, n):
                    edits[g.locate(g.sites.get(name, []), d["size"], i, f"view {name!r} (from {o!r})")] = n
        elif (d["made"] or d["size"] is not None) and changed[o] & set(d["ints"]):
            raise PlanError(f"node {name!r}, made by the exporter's decomposition of {o!r}, holds a size in "
                            f"{sorted(changed[o] & set(d['ints']))} that pruning changes and the plan does not "
                            "describe; cannot slice at the ONNX level (use materialize)")
    return edits


def _arg_value(node: torch.fx.Node, sa: ShapeArg) -> Any:
    return node.args[sa.arg] if isinstance(sa.arg, int) else node.kwargs[sa.arg]


def _arg_edits(g: _Graph, info: dict[str, dict[str, Any]], plan: StructurePlan, args: ArgEdits) -> dict[Slot, int]:
    """Shape args of FX nodes that do not end in a view (conv groups, split sizes, slice bounds),
    found by value among the ONNX nodes translated from their node."""
    viewed = {d["origin"] for d in info.values() if d["size"] is not None and d["last"]}
    sites: dict[str, list[int]] = defaultdict(list)
    for name, d in info.items():
        sites[d["origin"]] += g.sites.get(name, [])
    nodes = {n.name: n for n in plan.program.graph.nodes}
    edits: dict[Slot, int] = {}
    for (node, _, index), (sa, old, new) in args.items():
        if node in viewed:
            continue
        what = f"shape arg {sa}"
        if index is not None:
            pattern = [v if type(v) is int else None for v in _arg_value(nodes[node], sa)]
            slot = g.locate(sites.get(node, []), pattern, index, what)
        else:
            found = g.scalars(sites.get(node, []), old)
            if len(found) != 1:
                raise PlanError(f"{what}: the value {old} occurs {len(found)} times in the ONNX nodes translated "
                                f"from {node!r}, not once; cannot map it (use materialize)")
            slot = found[0]
        if slot in edits:
            raise PlanError(f"{what} maps to an ONNX integer that another shape arg already rewrites")
        edits[slot] = new
    return edits


def _check_initializers(graph: onnx.GraphProto, shapes: dict[str, torch.Size],
                        cuts: dict[tuple[str, int], torch.Tensor]) -> None:
    """The ONNX model holds the plan's tensors, as captured."""
    dims = {t.name: tuple(t.dims) for t in graph.initializer}
    for name, dim in dims.items():
        if name in shapes and dim != tuple(shapes[name]):
            raise PlanError(f"initializer {name!r} has shape {dim} but the plan captured {tuple(shapes[name])}: "
                            "the ONNX model was exported for another plan")
    if missing := sorted({fqn for fqn, _ in cuts} - set(dims)):
        raise PlanError(f"tensors {missing[:3]} of the plan are not initializers of the ONNX model: it was "
                        "exported for another plan")


def _slice_initializers(graph: onnx.GraphProto, cuts: dict[tuple[str, int], torch.Tensor], base_dir: str) -> None:
    """Cut the initializers in place; one whose data is in an external file is read from
    ``base_dir`` and comes back with its data inline (the ones not cut stay external)."""
    inits = {t.name: t for t in graph.initializer}
    per: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for (fqn, dim), idx in cuts.items():
        per[fqn].append((dim, idx))
    for fqn, dims in per.items():
        a = numpy_helper.to_array(inits[fqn], base_dir)
        for dim, idx in dims:
            a = np.delete(a, idx.numpy(), axis=dim)
        inits[fqn].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), fqn))


def _constant(like: onnx.NodeProto, name: str, value: np.ndarray) -> onnx.NodeProto:
    """A Constant node holding ``value`` the way ``like`` holds its value."""
    a = like.attribute[0]
    if a.name == "value_int":
        return helper.make_node("Constant", [], [name], name=name, value_int=int(value.reshape(-1)[0]))
    if a.name == "value_ints":
        return helper.make_node("Constant", [], [name], name=name, value_ints=[int(v) for v in value])
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value))


def _apply(graph: onnx.GraphProto, g: _Graph, edits: dict[Slot, int]) -> None:
    """Write the edits: Conv groups in place; constants as a fresh Constant per reading input (a
    constant other nodes share keeps its value for them; one no longer read is dropped)."""
    uses: dict[int, dict[int, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    for (i, k, e), v in edits.items():
        if k < 0:
            next(a for a in graph.node[i].attribute if a.name == "group").i = v
        else:
            uses[i][k][e] = v
    clones: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # node index -> Constants to put before it
    producers = set()
    for i, inputs in uses.items():
        node = graph.node[i]
        for k, elements in inputs.items():
            value, producer = g.consts[node.input[k]]
            value = value.copy()
            for e, v in elements.items():
                value.reshape(-1)[e] = v
            clones[i].append(_constant(graph.node[producer], f"{node.input[k]}_sliced_{i}_{k}", value))
            producers.add(producer)
            node.input[k] = clones[i][-1].output[0]
    if not clones:
        return
    read = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    nodes = []
    for i, node in enumerate(graph.node):
        nodes += clones.get(i, [])
        if i not in producers or node.output[0] in read:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _check(model: onnx.ModelProto) -> None:
    """onnx.checker and strict shape inference on a copy without the weights' data."""
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    light.graph.name = model.graph.name
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    inputs = {i.name for i in model.graph.input}
    light.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer if t.name not in inputs)
    light.graph.output.extend(model.graph.output)
    try:
        onnx.checker.check_model(light)
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise PlanError(f"the sliced ONNX model is invalid: {e}") from e


def slice_onnx(model: onnx.ModelProto, plan: StructurePlan, masks: Masks, base_dir: str | os.PathLike = "") -> onnx.ModelProto:
    """The ONNX of ``materialize(model, plan, masks)``, made by editing ``dense_onnx(plan)``'s output.

    ``model`` may keep its weights in an external file (``base_dir`` is its folder): then only
    the tensors that are cut are read, and the others stay references to that file, so a large
    model is not copied whole for every slice.

    Raises ``PlanError`` when the masks do not fit the plan, or when some integer the pruning
    changes cannot be found unambiguously (then use ``materialize``).
    """
    info = _fx_info(model)
    masks = check_masks(plan, masks)
    shapes = _tensor_shapes(plan.program)
    _check_slices(plan, shapes)
    cuts = _cuts(plan, masks)
    _check_initializers(model.graph, shapes, cuts)
    sliced = {k: list(v) for k, v in shapes.items()}
    for (fqn, dim), idx in cuts.items():
        sliced[fqn][dim] -= idx.numel()
    stand, args = pruned_args(plan, masks)
    dense = captured_shapes(plan)
    try:
        new = run_shapes(plan, sliced, stand)
    except Exception as e:  # a shape function refused the pruned sizes
        raise PlanError(f"the pruned graph does not run ({type(e).__name__}: {e}); a shape constant or slice "
                        "of the plan is missing or wrong") from e
    g = _Graph.of(model.graph)  # the two kinds of edits touch disjoint nodes: those of other FX nodes
    edits = _view_edits(g, info, _changed_sizes(plan, dense, new, args), new) | _arg_edits(g, info, plan, args)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _slice_initializers(out.graph, cuts, os.fspath(base_dir))
    _apply(out.graph, g, edits)
    del out.graph.value_info[:]  # the dense shapes; stale now
    _check(out)
    return out
