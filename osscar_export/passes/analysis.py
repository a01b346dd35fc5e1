"""The graph walk: one pass over ``ep.graph`` that gives every tensor dim a layout.

Each ``call_function`` node is handed to its op rule (``rules/``), which reads its inputs'
layouts and records its outputs' through the rule API below; an op without a rule, or a rule
that fails on its arguments, blocks every dim it touches. Graph inputs and outputs are blocked
here. ``structures.py`` reads the groups off the finished analysis (see docs/design.md,
"Op rules" and "Structures").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx

from osscar_export.passes.dims import DimSpace, Layout, Size, to_size

GRAPH_INPUT = "reaches a graph input"
GRAPH_OUTPUT = "reaches a graph output"


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


class GraphAnalysis:
    """Walks ``ep.graph`` applying ``rule_for(node.target)`` to each op; rules see only the rule API.

    ``rule_for`` is passed in (not imported) so the rules can import this module without a cycle.
    """

    def __init__(self, ep: torch.export.ExportedProgram, rule_for: Callable[[Any], Callable | None]):
        self.ep = ep
        self.graph = ep.graph
        self.space = DimSpace()
        self.dims: dict[fx.Node, Any] = {}
        self.tags: list[Tag] = []
        self.candidates: list[ShapeCandidate] = []
        self.touched: dict[fx.Node, list[Layout]] = {}
        self.rule_errors: list[str] = []
        sig = ep.graph_signature
        self.fqn: dict[str, str] = {
            **sig.inputs_to_parameters,
            **sig.inputs_to_buffers,
            **sig.inputs_to_lifted_tensor_constants,
        }
        self.user_inputs = set(sig.user_inputs)
        self._rule_for = rule_for

    # -- the rule API (summarised in rules/api.py): all a rule reads from or tells the analysis
    def where(self, node: fx.Node) -> str:
        """``module.path:node``, the place a block reason names."""
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return f"{path}:{node.name}" if path else node.name

    def is_tensor(self, x: Any) -> bool:
        """Whether ``x`` is a node whose single-tensor output has layouts."""
        return isinstance(x, fx.Node) and isinstance(self.dims.get(x), list)

    def param_fqn(self, x: Any) -> str | None:
        """The parameter / buffer / constant name when ``x`` is a lifted weight, else None."""
        if isinstance(x, fx.Node) and x.op == "placeholder":
            return self.fqn.get(x.name)
        return None

    def shape(self, x: fx.Node, index: int | None = None) -> tuple[Size, ...]:
        """Sizes of ``x``'s output (output ``index`` of a multi-output node)."""
        val = x.meta["val"]
        if index is not None:
            val = val[index]
        return tuple(to_size(s) for s in val.shape)

    def layout(self, x: fx.Node) -> list[Layout]:
        """Layouts of ``x``'s dims, outermost first (a copy: edit it freely)."""
        return list(self.dims[x])

    def part_layout(self, x: fx.Node, index: int) -> list[Layout] | None:
        """Layouts of output ``index`` of a multi-output node; None when it has none."""
        d = self.dims.get(x)
        if not isinstance(d, tuple) or d[index] is None:
            return None
        return list(d[index])

    def set_layout(self, node: fx.Node, dims: list[Layout] | tuple[list[Layout] | None, ...]) -> None:
        """Record ``node``'s output layouts: a list for one tensor, a tuple of lists for several."""
        self.dims[node] = dims

    def fresh(self, size: Size, *flags: str) -> int:
        """A new atom of ``size``, coupled to nothing yet."""
        return self.space.new(size, *flags)

    def fresh_dims(self, shape: Iterable[Size], *flags: str) -> list[Layout]:
        """One new atom per size of ``shape``."""
        return [self.space.new(s, *flags) for s in shape]

    def unify(self, x: Layout, y: Layout, node: fx.Node) -> None:
        """Couple two layouts of one size position by position (blocks both when they cannot be)."""
        self.space.unify(x, y, self.where(node))

    def block(self, lay: Layout, node: fx.Node, reason: str) -> None:
        """Keep every atom of ``lay`` unpruned, saying why at ``node``."""
        self.space.block(lay, self.where(node), reason)

    def block_everything(self, node: fx.Node, reason: str) -> None:
        """Block every input and output dim of ``node``; outputs get fresh layouts."""
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

    def split(self, lay: Layout, sizes: list[Size], node: fx.Node) -> list[Layout] | None:
        """``lay`` as a row-major product of parts of ``sizes`` (refining atoms); None if it is not one."""
        return self.space.split(lay, sizes, self.where(node))

    def split_concat(self, lay: Layout, sizes: list[Size]) -> list[Layout] | None:
        """``lay`` as a concatenation of consecutive parts of ``sizes``; None if it is not one."""
        return self.space.split_concat(lay, sizes)

    def leaves(self, lay: Layout) -> list[int]:
        """The atoms ``lay`` is made of, in order."""
        return self.space.leaves(lay)

    def size(self, lay: Layout) -> Size:
        """Number of indices of ``lay``."""
        return self.space.size_of(lay)

    def flag(self, lay: Layout, name: str) -> None:
        """Mark every atom of ``lay`` (``head``, ``kv``, ``broadcast``, ``producer``)."""
        self.space.flag(lay, name)

    def has_flag(self, lay: Layout, name: str) -> bool:
        """Whether some atom of ``lay`` carries the mark ``name``."""
        return any(self.space.has_flag(leaf, name) for leaf in self.space.leaves(lay))

    def tag(self, param: fx.Node, dim: int, role: str, node: fx.Node, **info: Any) -> None:
        """Record that weight ``param``'s ``dim`` is a producer, consumer or follower at ``node``."""
        self.tags.append(Tag(param, dim, role, node, **info))
        if role == "producer":
            self.space.flag(self.dims[param][dim], "producer")

    def shape_arg(
        self, node: fx.Node, arg: int | str, index: int | None, layouts: list[Layout], uniform: bool = False
    ) -> None:
        """Record that ``node``'s int argument ``arg`` (item ``index``) is the size of ``layouts``."""
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
                self.block_everything(node, f"{op_name(node.target)} is not in the op table")
            else:
                rule(self, node)
        except Exception as exc:  # a rule that cannot handle these args blocks instead of guessing
            self.rule_errors.append(f"{node.name} ({op_name(node.target)}): {type(exc).__name__}: {exc}")
            self.block_everything(node, f"rule for {op_name(node.target)} failed: {type(exc).__name__}: {exc}")
        touched: list[Layout] = []
        for x in inputs + [node]:
            touched.extend(self._all_dims(x))
        if touched:
            self.touched[node] = touched

    def _all_dims(self, x: fx.Node) -> list[Layout]:
        d = self.dims.get(x)
        if isinstance(d, list):
            return d
        if isinstance(d, tuple):
            return [lay for part in d if part is not None for lay in part]
        return []


def op_name(target: Any) -> str:
    """``aten.linear.default`` for an ATen overload, else the callable's name."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", None) or str(target)


def _flat_nodes(x: Any) -> Iterable[fx.Node]:
    if isinstance(x, fx.Node):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat_nodes(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat_nodes(y)
