"""Running a captured graph node by node, pausing anywhere and resuming from the pause.

Calibration (``passes/calibrate.py``) stops a forward right after the last input it needs and,
in sequential mode, resumes from values saved before a group; the allocation search
(``search.py``) resumes the dense run before a probed group. Weights are read when their
``get_attr`` node runs, so weights written in place between stages are seen downstream.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from osscar_export.errors import CalibrationDataError

# The input that marks padding (Hugging Face models): its zero positions are not calibration rows.
TOKEN_MASK_INPUT = "attention_mask"


@dataclass
class RunState:
    """A paused forward: the next node position and the values still needed after it."""

    pos: int
    env: dict[Node, object]
    tokens: torch.Tensor | None = None  # bool (batch, seq): real tokens, from the attention_mask input


class GraphRunner:
    """Runs a GraphModule node by node; a forward can stop anywhere and resume from a RunState.

    The module's parameters are read when their get_attr node runs, so weights changed in place
    between stages are seen by every node that runs afterwards. In-place ops run as captured;
    ``start`` and ``save`` give each state its own activations so that they cannot change a
    caller's batch or a saved state.
    """

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.pos = {n.name: i for i, n in enumerate(self.nodes)}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.mask_input = next((i for i, n in enumerate(self.placeholders) if n.name == TOKEN_MASK_INPUT), None)
        last_use: dict[Node, int] = {}
        for i, n in enumerate(self.nodes):
            for arg in n.all_input_nodes:
                last_use[arg] = i
        self.free_after: list[list[Node]] = [[] for _ in self.nodes]
        for n, i in last_use.items():
            self.free_after[i].append(n)
        self.interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
        self.mutates = any(n.op == "call_function" and getattr(getattr(n.target, "_schema", None), "is_mutable", False) for n in self.nodes)

    def start(self, inputs: Sequence[torch.Tensor]) -> RunState:
        flat = pytree.tree_leaves(tuple(inputs))
        if len(flat) != len(self.placeholders):
            raise CalibrationDataError(f"a calibration batch has {len(flat)} tensors, the model takes {len(self.placeholders)}")
        return RunState(0, self._own(dict(zip(self.placeholders, flat))), self._tokens(flat))

    def save(self, state: RunState) -> RunState:
        """A copy of ``state`` that running on from ``state`` cannot change, to resume from later."""
        return RunState(state.pos, self._own(state.env), state.tokens)

    def _own(self, env: dict[Node, object]) -> dict[Node, object]:
        """A new dict of ``env`` whose activations no other state can write.

        A functional graph never writes a value, so sharing is safe and free. Otherwise every
        activation is copied through one memo, so values that alias each other (``relu_``'s output
        and its input) still do. Tensors sharing storage with the module's parameters, buffers or
        constants (and views of them) are kept: stages write re-fitted weights into them in place
        and later nodes must see those writes.
        """
        if not self.mutates:
            return dict(env)
        module = {
            t.untyped_storage().data_ptr()
            for n in self.nodes if n.op == "get_attr"
            for t in [self.interpreter.fetch_attr(n.target)] if isinstance(t, torch.Tensor)
        }
        memo: dict = {}

        def own(v: object) -> object:
            if isinstance(v, torch.Tensor):
                return v if v.untyped_storage().data_ptr() in module else copy.deepcopy(v, memo)
            if type(v) in (tuple, list):
                return type(v)(own(x) for x in v)
            return v

        return {n: own(v) for n, v in env.items()}

    def _tokens(self, flat: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Real-token mask of a batch; None (every row counts) unless ``attention_mask`` is a bool
        or integer (batch, seq) tensor: a float or 4-d mask is additive, not a padding flag."""
        if self.mask_input is None:
            return None
        mask = flat[self.mask_input]
        if mask.is_floating_point() or mask.is_complex() or mask.dim() != 2:
            return None
        return mask != 0

    def advance(self, state: RunState, stop: int, visit: Callable[[Node, dict], None] | None = None) -> RunState:
        """Run nodes ``state.pos .. stop-1`` in place on ``state``; ``visit`` sees each before it runs."""
        self.interpreter.env = state.env
        with torch.no_grad():
            for i in range(state.pos, min(stop, len(self.nodes))):
                node = self.nodes[i]
                if node.op == "output":
                    break
                if node.op != "placeholder":
                    if visit is not None:
                        visit(node, state.env)
                    state.env[node] = self.interpreter.run_node(node)
                for dead in self.free_after[i]:
                    state.env.pop(dead, None)
        state.pos = stop
        return state

    def output(self, state: RunState) -> object:
        """The model's output from a state advanced to the end, structured as ``gm(...)`` returns it."""
        node = self.nodes[-1]
        flat = [state.env[n] if isinstance(n, Node) else n for n in pytree.tree_leaves(node.args[0])]
        spec = getattr(self.gm, "_out_spec", None)
        return pytree.tree_unflatten(flat, spec) if spec is not None else flat[0] if len(flat) == 1 else tuple(flat)
