"""Edits of a module's tensors by fully qualified name, and the bias each re-fitted consumer adds.

The re-fit's intercept (docs/design.md, "Solver") shifts a consumer's output by a constant
vector. Every consumer gets one place that vector lives, its *bias*: the bias operand it already
has (Linear, Conv, ``addmm``), or a new zero parameter beside its weight. ``bias`` finds or makes
it in a captured graph (the consumer node takes it as its bias argument, or an ``add`` follows a
``mm``/``matmul``) and in an eager model (the weight's module's ``bias``, made for an
``nn.Linear``/``nn.Conv*`` without one).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.operator_schemas import normalize_function

from osscar_export.errors import PlanError
from osscar_export.plan import Consumer

# position of the bias argument of consumer ops that take one
_BIAS_ARG = {
    "aten.linear.default": 2,
    "aten.conv1d.default": 2,
    "aten.conv1d.padding": 2,
    "aten.conv2d.default": 2,
    "aten.conv2d.padding": 2,
}


def owner(root: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    """The module holding attribute ``fqn`` and the attribute name."""
    path, _, attr = fqn.rpartition(".")
    try:
        module = root.get_submodule(path) if path else root
    except AttributeError as e:
        raise PlanError(f"tensor {fqn!r} of the plan is not in the model: {e}") from e
    if not isinstance(getattr(module, attr, None), torch.Tensor):
        raise PlanError(f"tensor {fqn!r} of the plan is not in the model")
    return module, attr


def replace(root: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Swap the tensor at ``fqn`` for ``value``, keeping its kind (parameter, buffer, constant)."""
    module, attr = owner(root, fqn)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(module, attr, value)  # nn.Module.__setattr__ keeps a registered buffer a buffer


def output_dim(consumer: Consumer) -> int:
    """The dim of the consumer's weight that indexes its outputs (``matmul`` weights are input-major)."""
    return 1 if consumer.op == "matmul" else 0


def bias(root: nn.Module, consumer: Consumer) -> str:
    """The FQN in ``root`` of the tensor added to ``consumer``'s output, made (zeros, a parameter
    beside the weight) when it has none. ``root`` is a graph holding the consumer's node
    (``plan.program.module()`` and its copies), or an eager model whose weight's owner is a
    Linear or Conv layer."""
    graph = root.graph if isinstance(root, torch.fx.GraphModule) else None
    node = next((n for n in graph.nodes if n.name == consumer.node), None) if graph is not None else None
    module, attr = owner(root, consumer.weight)
    prefix = consumer.weight[: len(consumer.weight) - len(attr)]
    if node is None:
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            return prefix + "bias"
        if not (isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and module.bias is None):
            raise PlanError(f"cannot give {consumer.weight} a bias: its module is a {type(module).__name__} without "
                            "one, not a Linear or Conv layer, and the model is not the captured graph")
        module.bias = _zeros(module.weight, consumer)
        return prefix + "bias"
    op = str(node.target)
    if op == "aten.addmm.default" and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr":
        return node.args[0].target
    current = None
    if op in _BIAS_ARG:
        current = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs.get("bias")
        if isinstance(current, torch.fx.Node) and current.op == "get_attr":
            return current.target
    name = "bias" if not hasattr(module, "bias") else f"{attr}_bias"
    module.register_parameter(name, _zeros(getattr(module, attr), consumer))
    with graph.inserting_before(node):
        value = graph.get_attr(prefix + name)
    if op in _BIAS_ARG and current is None:
        args = list(node.args) + [None] * (_BIAS_ARG[op] + 1 - len(node.args))
        args[_BIAS_ARG[op]] = value
        node.args = tuple(args)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
    else:  # no bias operand to set: add it to the output, broadcast along the last dim (features)
        with graph.inserting_after(node):
            added = graph.call_function(torch.ops.aten.add.Tensor, (node, value))
        node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
    root.recompile()
    return prefix + name


def _zeros(weight: torch.Tensor, consumer: Consumer) -> nn.Parameter:
    outputs = weight.shape[output_dim(consumer)]
    return nn.Parameter(torch.zeros(outputs, dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad)
