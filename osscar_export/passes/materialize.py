"""Materialize: the only pass that mutates — masks in, a physically smaller graph out.

Two views of one pruning decision (docs/design.md, "Materialize" and "Mask-equivalence law"):
- ``apply_masks``: a copy of the original model, same shapes, with re-fitted weights applied and
  the pruned structures' consumer input rows zeroed. It is the reference the smaller model must
  match. ``zero_structures`` does that zeroing in place; it is also how sequential solving and
  the allocation search prune their working copies, so every "pruned but not removed" model is
  made by the same code.
- ``materialize`` (the ``Materialize`` pass): the captured graph with producers, followers and
  consumer weights sliced and every shape constant rewritten, re-exported so that no node
  carries a stale shape. That capture is kept (``state.program``, ``materialize_program``):
  the exporters and latency targets take it as it is instead of capturing the model again.

Both validate the masks and re-fitted weights the same way. A group missing from ``masks`` is
kept whole (callers prune a subset of groups without listing the rest); an unknown group name
is an error, because it means the masks were made for another plan.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from osscar_export.errors import PlanError
from osscar_export.passes.base import Pass, PassResult, PruneState
from osscar_export.passes.module_edit import bias, output_dim, owner, replace
from osscar_export.plan import ShapeArg, Slice, StructureGroup, StructurePlan

Masks = Mapping[str, torch.Tensor]  # group name -> bool per structure, True = kept
Weights = Mapping[str, torch.Tensor]  # consumer weight FQN -> re-fitted weight, dense shape
Shifts = Mapping[str, torch.Tensor]  # consumer weight FQN -> added to its output (its bias), dense length


def check_masks(plan: StructurePlan, masks: Masks) -> dict[str, torch.Tensor]:
    """Validated masks for every group of ``plan`` (missing groups → kept whole)."""
    known = {g.name for g in plan.groups}
    unknown = sorted(set(masks) - known)
    if unknown:
        raise PlanError(
            f"masks name {len(unknown)} group(s) the plan does not have: {unknown[:5]}; "
            "masks must come from the same plan (see plan.groups[i].name)"
        )
    checked: dict[str, torch.Tensor] = {}
    for g in plan.groups:
        if g.name not in masks:
            checked[g.name] = torch.ones(g.count, dtype=torch.bool)
            continue
        mask = masks[g.name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise PlanError(f"mask of group {g.name!r} must be a torch.bool tensor, got {got}")
        if mask.shape != (g.count,):
            raise PlanError(
                f"mask of group {g.name!r} has shape {tuple(mask.shape)}, expected ({g.count},): "
                f"one entry per structure"
            )
        if not bool(mask.any()):
            raise PlanError(
                f"mask of group {g.name!r} removes all {g.count} structures, which would disconnect "
                "the graph; keep at least one"
            )
        checked[g.name] = mask.detach().cpu()
    return checked


def check_weights(
    plan: StructurePlan, weights: Weights | None, shapes: Mapping[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """Validated re-fitted weights: consumer weights of the plan, in their original dense shape."""
    if not weights:
        return {}
    consumers = {c.weight for g in plan.groups for c in g.consumers}
    checked: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if name not in consumers:
            raise PlanError(
                f"re-fitted weight {name!r} is not the weight of any consumer in the plan; only consumer "
                "weights are re-fit"
            )
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise PlanError(f"re-fitted weight {name!r} must be a floating-point tensor")
        if w.shape != shapes[name]:
            raise PlanError(
                f"re-fitted weight {name!r} has shape {tuple(w.shape)}, expected the dense shape "
                f"{tuple(shapes[name])} (pruned rows zero, not removed)"
            )
        if not bool(torch.isfinite(w).all()):
            raise PlanError(f"re-fitted weight {name!r} has non-finite entries")
        checked[name] = w.detach()
    return checked


def check_shifts(plan: StructurePlan, shifts: Shifts | None, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Validated bias shifts: one finite vector per full consumer named, as long as its outputs."""
    if not shifts:
        return {}
    consumers = {c.weight: c for g in plan.groups for c in g.consumers if c.full}
    checked: dict[str, torch.Tensor] = {}
    for name, shift in shifts.items():
        if name not in consumers:
            raise PlanError(f"bias shift for {name!r}, which is not the weight of a re-fitted consumer of the plan")
        outputs = shapes[name][output_dim(consumers[name])]
        if not isinstance(shift, torch.Tensor) or not shift.is_floating_point() or shift.shape != (outputs,):
            got = tuple(shift.shape) if isinstance(shift, torch.Tensor) else type(shift).__name__
            raise PlanError(f"bias shift for {name!r} must be a float vector of its {outputs} outputs, got {got}")
        if not bool(torch.isfinite(shift).all()):
            raise PlanError(f"bias shift for {name!r} has non-finite entries")
        checked[name] = shift.detach()
    return checked


def removed_structures(mask: torch.Tensor) -> torch.Tensor:
    """Structure numbers a mask removes."""
    return (~mask).nonzero().reshape(-1)


def _group_slices(g: StructureGroup) -> tuple[Slice, ...]:
    """Every distinct slice a group owns: producers, followers and consumer inputs."""
    return tuple(dict.fromkeys(g.slices() + tuple(c.input for c in g.consumers)))


def _cuts(plan: StructurePlan, masks: Mapping[str, torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
    """Original indices to drop, per (tensor FQN, dim), over every group (order-independent)."""
    parts: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
    for g in plan.groups:
        gone = removed_structures(masks[g.name])
        if gone.numel() == 0:
            continue
        for s in _group_slices(g):
            parts[(s.target, s.dim)].append(s.indices(gone))
    return {key: torch.unique(torch.cat(idx)) for key, idx in parts.items()}


def _check_slices(plan: StructurePlan, shapes: Mapping[str, torch.Size]) -> None:
    """Every slice names a real tensor and in-range indices; no index is owned by two groups."""
    owned: dict[tuple[str, int], torch.Tensor] = {}
    owner_group: dict[tuple[str, int], list[str]] = defaultdict(list)
    for g in plan.groups:
        every = torch.arange(g.count)
        for s in _group_slices(g):
            if s.target not in shapes:
                raise PlanError(f"group {g.name!r} slices {s.target!r}, which is not a tensor of the captured graph")
            shape = shapes[s.target]
            if not 0 <= s.dim < len(shape):
                raise PlanError(f"group {g.name!r} slices dim {s.dim} of {s.target!r} with shape {tuple(shape)}")
            idx = s.indices(every)
            if int(idx.max()) >= shape[s.dim] or int(idx.min()) < 0:
                raise PlanError(
                    f"group {g.name!r} owns indices up to {int(idx.max())} along dim {s.dim} of {s.target!r}, "
                    f"which has size {shape[s.dim]}"
                )
            key = (s.target, s.dim)
            taken = owned.get(key, torch.zeros(shape[s.dim], dtype=torch.bool))
            if bool(taken[idx].any()):
                raise PlanError(
                    f"group {g.name!r} and group(s) {owner_group[key]} both own indices of dim {s.dim} "
                    f"of {s.target!r}; a tensor index can belong to one group only"
                )
            taken[idx] = True
            owned[key] = taken
            owner_group[key].append(g.name)


def _tensor_shapes(program: torch.export.ExportedProgram) -> dict[str, torch.Size]:
    shapes = {k: v.shape for k, v in program.state_dict.items()}
    shapes.update({k: v.shape for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    return shapes


def zero_structures(module: nn.Module, groups: Iterable[StructureGroup], masks: Masks, weights: Weights,
                    shifts: Shifts | None = None) -> None:
    """Prune ``groups`` of ``module`` in place, same shapes: copy the re-fitted ``weights`` in and add
    the ``shifts`` to their consumers' biases (``module_edit.bias``), then zero every consumer's
    input rows of each removed structure (``masks`` names every group given).

    Zeroing the consumer rows is enough: a pruned structure then contributes nothing downstream,
    whatever its producers compute, which is exactly what removing it does. Weights are copied
    before any row is zeroed, so a weight read by several groups keeps every group's zeros.
    """
    groups = list(groups)
    consumers = {c.weight: c for g in groups for c in g.consumers if c.full}
    with torch.no_grad():
        for name, w in weights.items():
            getattr(*owner(module, name)).copy_(w)
        for name, shift in (shifts or {}).items():
            if name not in consumers:
                raise PlanError(f"bias shift for {name!r}, which is not a re-fitted consumer of the groups pruned")
            tensor = getattr(*owner(module, bias(module, consumers[name])))
            tensor.add_(shift.to(tensor))
        for g in groups:
            gone = removed_structures(masks[g.name])
            if gone.numel() == 0:
                continue
            for c in g.consumers:
                param = getattr(*owner(module, c.weight))
                param.index_fill_(c.input.dim, c.input.indices(gone).to(param.device), 0)


def writable_copy(plan: StructurePlan, biases: bool = False) -> torch.fx.GraphModule:
    """The captured model with private copies of its consumer weights, which ``zero_structures``
    writes, and with ``biases`` (the re-fit's intercept) of its full consumers' biases too, made
    (zero) up front where a consumer has none, so the graph does not change while it is run.
    Every other tensor is the capture's own, shared rather than copied (a deep copy doubled a
    large-vocabulary model's embedding in memory for nothing)."""
    gm = plan.program.module()
    with torch.no_grad():
        for fqn in dict.fromkeys(c.weight for g in plan.groups for c in g.consumers):
            replace(gm, fqn, getattr(*owner(gm, fqn)).clone())
        for c in {c.weight: c for g in plan.groups for c in g.consumers if c.full and biases}.values():
            fqn = bias(gm, c)
            replace(gm, fqn, getattr(*owner(gm, fqn)).clone())
    return gm


def apply_masks(model: nn.Module, plan: StructurePlan, masks: Masks, weights: Weights | None = None,
                shifts: Shifts | None = None) -> nn.Module:
    """A deep copy of ``model`` pruned by ``zero_structures``: the reference ``materialize`` must match."""
    checked = check_masks(plan, masks)
    shapes = _tensor_shapes(plan.program)
    weights = check_weights(plan, weights, shapes)
    masked = copy.deepcopy(model)
    zero_structures(masked, plan.groups, checked, weights, check_shifts(plan, shifts, shapes))
    return masked


def _shape_value(node: torch.fx.Node, sa: ShapeArg) -> int:
    if isinstance(sa.arg, int):
        if sa.arg >= len(node.args):
            raise PlanError(f"shape arg {sa} points past the {len(node.args)} arguments of node {node.name!r}")
        value = node.args[sa.arg]
    else:
        if sa.arg not in node.kwargs:
            raise PlanError(f"shape arg {sa} names keyword {sa.arg!r}, which node {node.name!r} does not have")
        value = node.kwargs[sa.arg]
    if sa.index is not None:
        if not isinstance(value, (list, tuple)) or sa.index >= len(value):
            raise PlanError(f"shape arg {sa}: argument of node {node.name!r} is {value!r}, not a list with that index")
        value = value[sa.index]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlanError(
            f"shape arg {sa}: node {node.name!r} holds {value!r} there, not a positive integer constant "
            f"(inferred -1 dims and symbolic sizes must not be listed as shape args)"
        )
    return value


def _set_shape_value(node: torch.fx.Node, sa: ShapeArg, new: int) -> None:
    def put(old):
        if sa.index is None:
            return new
        items = list(old)
        items[sa.index] = new
        return items

    if isinstance(sa.arg, int):
        args = list(node.args)
        args[sa.arg] = put(args[sa.arg])
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, sa.arg: put(node.kwargs[sa.arg])}


def _rewrite_shape_args(gm: torch.fx.GraphModule, plan: StructurePlan, masks: Mapping[str, torch.Tensor]) -> None:
    """new = old − removed × unit for every shape constant; all reads happen before any write."""
    nodes = {n.name: n for n in gm.graph.nodes}
    edits: dict[tuple[str, int | str, int | None], tuple[ShapeArg, int, int]] = {}
    for g in plan.groups:
        r = int((~masks[g.name]).sum())
        if r == 0:
            continue
        for sa in g.shape_args:
            if sa.node not in nodes:
                raise PlanError(f"group {g.name!r} has a shape arg on node {sa.node!r}, which is not in the graph")
            key = (sa.node, sa.arg, sa.index)
            old = edits[key][1] if key in edits else _shape_value(nodes[sa.node], sa)
            drop = (edits[key][2] if key in edits else 0) + r * sa.unit
            edits[key] = (sa, old, drop)
    for sa, old, drop in edits.values():
        if old - drop <= 0:
            raise PlanError(f"shape arg {sa} would become {old - drop} (was {old}); the plan's unit is wrong")
        _set_shape_value(nodes[sa.node], sa, old - drop)


def _sliced_shapes(plan: StructurePlan, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Expected shape of every tensor after materialize, derived from counts and units alone."""
    shapes = {k: list(v) for k, v in _tensor_shapes(plan.program).items()}
    for g in plan.groups:
        r = int((~masks[g.name]).sum())
        for s in _group_slices(g):
            shapes[s.target][s.dim] -= r * s.unit * len(s.offsets)
    return {k: torch.Size(v) for k, v in shapes.items()}


def dynamic_shapes(program: torch.export.ExportedProgram, args: tuple):
    """The captured program's symbolic input dims as a ``dynamic_shapes`` spec (None if all static).

    Re-exporting the sliced graph with these keeps a dynamic batch or sequence dynamic; plain
    static re-export would silently specialise it to the example's size.
    """
    user = set(program.graph_signature.user_inputs)
    vals = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    leaves, spec = pytree.tree_flatten(args)
    dims, k = [], 0
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            dims.append(None)
            continue
        shape = vals[k].shape
        k += 1
        symbolic = {i: torch.export.Dim.DYNAMIC for i, s in enumerate(shape) if not isinstance(s, int)}
        dims.append(symbolic or None)
    if not any(dims):
        return None
    return pytree.tree_unflatten(dims, spec)


def _output_shapes(graph: torch.fx.Graph) -> list[tuple[int | None, ...]]:
    """Shapes of the tensor outputs of a graph from node metadata, symbolic dims as None."""
    leaves = pytree.tree_leaves(graph.output_node().args[0])
    vals = [n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in leaves]
    return [tuple(d if isinstance(d, int) else None for d in v.shape) for v in vals if isinstance(v, torch.Tensor)]


class Materialize(Pass):
    """model + plan + masks (+ re-fitted weights) -> the physically smaller model.

    Slices every tensor the removed structures own, rewrites shape constants and re-exports;
    ``program`` becomes that export and ``model`` its module. ``changed`` is True when a structure was removed or re-fitted weights were applied: both give
    a model that computes something else than the captured one.
    """

    name = "materialize"
    requires = ("model", "plan", "masks")
    ensures = ("model", "program")

    def check_input(self, state: PruneState) -> None:
        plan = state.plan
        shapes = _tensor_shapes(plan.program)
        check_masks(plan, state.masks)
        check_weights(plan, state.weights, shapes)
        check_shifts(plan, state.shifts, shapes)
        _check_slices(plan, shapes)
        own = dict(state.model.state_dict())
        for name, shape in shapes.items():
            if name in own and own[name].shape != shape:
                raise PlanError(
                    f"model tensor {name!r} has shape {tuple(own[name].shape)} but the plan captured "
                    f"{tuple(shape)}: the plan was made for another model"
                )

    def run(self, state: PruneState) -> PassResult:
        model, plan = state.model, state.plan
        masks = check_masks(plan, state.masks)
        shapes = _tensor_shapes(plan.program)
        weights = check_weights(plan, state.weights, shapes)
        shifts = check_shifts(plan, state.shifts, shapes)
        # A fresh graph whose tensors are the capture's own: every tensor below is rebound, never
        # written, so the capture is untouched and nothing is copied that is not sliced (a deep
        # copy cost a whole model's memory, twice for --mode best).
        gm = plan.program.module()
        values = {**model.state_dict(), **weights}  # the model's current values win over the capture's
        cuts = _cuts(plan, masks)
        touched = {fqn for fqn, _ in cuts} | set(weights)
        consumers = {c.weight: c for g in plan.groups for c in g.consumers if c.full}
        for name, shift in shifts.items():  # into the consumer's bias, made where it has none
            c, fqn = consumers[name], bias(gm, consumers[name])
            current = values.get(fqn, getattr(*owner(gm, fqn)))
            values[fqn] = current + shift.to(current)
            if (name, output_dim(c)) in cuts:  # a new bias is in no slice of the plan: cut it as its weight
                cuts.setdefault((fqn, 0), cuts[(name, output_dim(c))])
            touched.add(fqn)
        with torch.no_grad():
            for fqn in touched:
                module, attr = owner(gm, fqn)
                old = getattr(module, attr)
                value = values.get(fqn, old).to(device=old.device, dtype=old.dtype)
                for dim in range(value.dim()):
                    if (fqn, dim) in cuts:
                        alive = torch.ones(value.shape[dim], dtype=torch.bool)
                        alive[cuts[(fqn, dim)]] = False
                        value = value.index_select(dim, alive.nonzero().reshape(-1).to(value.device))
                replace(gm, fqn, value.contiguous().clone())
            follow: dict[int, torch.Tensor] = {}  # storage -> its tensor in gm: tied weights stay tied
            for fqn, value in model.state_dict().items():  # untouched tensors follow the model, shared
                if fqn in touched or fqn not in plan.program.state_dict:
                    continue
                module, attr = owner(gm, fqn)
                if getattr(module, attr).data_ptr() != value.data_ptr():  # the model's values are not the capture's
                    if value.data_ptr() not in follow:
                        replace(gm, fqn, value)
                        follow[value.data_ptr()] = getattr(module, attr)
                    else:
                        setattr(module, attr, follow[value.data_ptr()])
        _rewrite_shape_args(gm, plan, masks)
        gm.recompile()
        args = tuple(plan.example_inputs)
        try:
            dims = dynamic_shapes(plan.program, args)
            program = torch.export.export(gm, args, dynamic_shapes=dims, strict=False)
        except Exception as e:  # any trace failure here means the plan left something stale
            raise PlanError(
                f"the materialized graph does not re-export ({type(e).__name__}: {e}); a shape constant or "
                "slice of the plan is missing or wrong"
            ) from e
        return PassResult(state.replace(model=program.module(), program=program), changed=bool(cuts or weights or shifts))

    def check_output(self, result: PassResult, state: PruneState) -> None:
        plan, small = state.plan, result.state.model
        want = _sliced_shapes(plan, check_masks(plan, state.masks))
        have = {**dict(small.named_parameters()), **dict(small.named_buffers())}
        for fqn, shape in want.items():
            if fqn in have and have[fqn].shape != shape:
                raise PlanError(f"materialized {fqn!r} has shape {tuple(have[fqn].shape)}, expected {tuple(shape)}")
        dense_shapes = _output_shapes(plan.program.graph)
        small_shapes = _output_shapes(small.graph)
        if small_shapes != dense_shapes:
            raise PlanError(
                f"materialized outputs have shapes {small_shapes}, the captured graph {dense_shapes}: a pruned "
                "dim reached a graph output"
            )


def materialize_program(model: nn.Module, plan: StructurePlan, masks: Masks, weights: Weights | None = None,
                        shifts: Shifts | None = None) -> torch.export.ExportedProgram:
    """The physically smaller model as captured by ``Materialize``, ready for the exporters."""
    state = PruneState(model=model, example_inputs=tuple(plan.example_inputs), program=plan.program, plan=plan,
                       masks=masks, weights=weights, shifts=shifts)
    return Materialize()(state).state.program


def materialize(model: nn.Module, plan: StructurePlan, masks: Masks, weights: Weights | None = None,
                shifts: Shifts | None = None) -> torch.fx.GraphModule:
    """The physically smaller model: ``small(x) == apply_masks(model, plan, masks, weights, shifts)(x)``."""
    return materialize_program(model, plan, masks, weights, shifts).module()
