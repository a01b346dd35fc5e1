"""The shapes every node of a plan's graph has after pruning, without materializing it.

``onnx_slice`` needs them to rewrite the sizes the ONNX export baked in: the plan's graph runs on
fake tensors (no data, well under a second for SmolLM2) with the sliced parameters' shapes and
the shape args rewritten by ``materialize``'s own rule.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from osscar_export.errors import PlanError
from osscar_export.passes.materialize import _rewrite_shape_args, _shape_value
from osscar_export.plan import ShapeArg, StructurePlan

Shapes = dict[str, list[tuple[int, ...]]]  # FX node name -> shapes of its tensor outputs
ArgEdits = dict[tuple[str, int | str, int | None], tuple[ShapeArg, int, int]]  # (node, arg, index) -> (sa, old, new)



def _shapes(value: Any) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in t.shape) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


class _Shapes(torch.fx.Interpreter):
    """Runs the plan's graph on fake tensors, with some nodes' arguments replaced; records shapes."""

    def __init__(self, gm: torch.fx.GraphModule, args: dict[str, SimpleNamespace]):
        super().__init__(gm)
        self.args = args
        self.shapes: Shapes = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.args:
            new = self.args[n.name]
            out = getattr(self, n.op)(n.target, self.map_nodes_to_values(new.args, n),
                                      self.map_nodes_to_values(new.kwargs, n))
        else:
            out = super().run_node(n)
        self.shapes[n.name] = _shapes(out)
        return out


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) else d.node.hint  # a symbolic dim: its size in the example inputs


def captured_shapes(plan: StructurePlan) -> Shapes:
    """Output shapes of every node of the plan's graph, as captured."""
    return {n.name: [tuple(_dim(d) for d in t.shape) for t in pytree.tree_leaves(n.meta["val"])
                     if isinstance(t, torch.Tensor)] for n in plan.program.graph.nodes if "val" in n.meta}


def run_shapes(plan: StructurePlan, tensors: dict[str, list[int]], args: dict[str, SimpleNamespace]) -> Shapes:
    """Output shapes of every node of the plan's graph, run on the example inputs and fake
    parameters, buffers and constants of the given shapes."""
    sig = plan.program.graph_signature
    fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    user = iter([t for t in pytree.tree_leaves(plan.example_inputs) if isinstance(t, torch.Tensor)])
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True) as mode:
        inputs = []
        for n in plan.program.graph.nodes:
            if n.op != "placeholder":
                continue
            if n.name in fqn:
                like = plan.program.state_dict.get(fqn[n.name], plan.program.constants.get(fqn[n.name]))
                inputs.append(torch.empty(tensors[fqn[n.name]], dtype=like.dtype))
            else:
                inputs.append(mode.from_tensor(next(user)))
        interp = _Shapes(plan.program.graph_module, args)
        interp.run(*inputs)
    return interp.shapes


def pruned_args(plan: StructurePlan, masks: dict[str, torch.Tensor]) -> tuple[dict[str, SimpleNamespace], ArgEdits]:
    """Rewritten arguments of the nodes whose shape args change (materialize's own rewrite, run on
    stand-ins of the nodes), and those shape args."""
    nodes = {n.name: n for n in plan.program.graph.nodes}
    names = {sa.node for g in plan.groups for sa in g.shape_args}
    if missing := sorted(names - set(nodes)):
        raise PlanError(f"shape args on nodes {missing[:3]}, which are not in the plan's graph")
    stand = {k: SimpleNamespace(name=k, args=nodes[k].args, kwargs=dict(nodes[k].kwargs)) for k in names}
    _rewrite_shape_args(SimpleNamespace(graph=SimpleNamespace(nodes=list(stand.values()))), plan, masks)
    changed = {}
    for g in plan.groups:
        for sa in g.shape_args:
            old, new = _shape_value(nodes[sa.node], sa), _shape_value(stand[sa.node], sa)
            if old != new:
                changed[(sa.node, sa.arg, sa.index)] = (sa, old, new)
    touched = {node for node, _, _ in changed}
    return {k: v for k, v in stand.items() if k in touched}, changed
