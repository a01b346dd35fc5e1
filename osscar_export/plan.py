"""The structure plan: the contract between analysis (find_structures) and everything after it.

A plan names, for one captured graph, every group of structures (channels, neurons, heads, KV
groups) that can be removed together, and exactly which tensor slices and graph constants each
removal touches. Calibrate, solve, materialize and measure_latency read it; nothing writes it
after find_structures.

Index convention (one rule for every tensor): structure ``i`` of a group occupies, along
``Slice.dim`` of ``Slice.target``, the indices ``offset + i*unit ... offset + (i+1)*unit - 1`` for
every ``offset`` in ``Slice.offsets``. Fused tensors (GPT-2 ``c_attn`` holding q, k and v) use
several offsets; a KV group of SmolLM2 covers 3 query heads, so ``q_proj`` rows have unit 192 while
``k_proj`` rows have unit 64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

GroupKind = Literal["channel", "neuron", "head", "kv_group", "query_head"]
ConsumerOp = Literal["linear", "conv1d", "conv2d", "conv3d", "matmul"]


@dataclass(frozen=True)
class Slice:
    """The indices a group's structures own along one dim of one parameter, buffer or constant."""

    target: str  # fully qualified name, as in ``ExportedProgram.state_dict`` / ``.constants``
    dim: int
    unit: int = 1
    offsets: tuple[int, ...] = (0,)

    def indices(self, structures: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` owned by the given structure numbers (sorted as given)."""
        structures = torch.as_tensor(structures, dtype=torch.long).reshape(-1)
        within = torch.arange(self.unit)
        per_offset = [off + structures[:, None] * self.unit + within[None, :] for off in self.offsets]
        return torch.cat([p.reshape(-1) for p in per_offset])


@dataclass(frozen=True)
class ShapeArg:
    """An integer constant in a graph node's arguments that shrinks with the group's width.

    After removing ``r`` structures the value becomes ``old - r * unit``. ``index`` is the
    position inside a list/tuple argument (a view shape, split sizes), or ``None`` when the
    argument itself is the integer.
    """

    node: str  # FX node name in ``plan.program.graph``
    arg: int | str  # positional index, or keyword name
    index: int | None
    unit: int


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the group's dim as input features: OSSCAR re-fits its weight.

    ``input`` is the group's slice of the weight *parameter* along its input-feature dim
    (Linear/ConvNd: dim 1; ``matmul`` consumers such as GPT-2 ``Conv1D`` keep weights input-major:
    dim 0). The solver sees the input-major matrix ``W`` (``p x m``, see ``input_major``), where
    one structure is ``group_size = input.unit * kernel area`` consecutive rows. ``full`` is True
    when the group owns every input row (the layer problem is then exactly the solver's);
    otherwise the consumer is sliced but not re-fit.
    """

    node: str  # FX node name of the op in ``plan.program.graph``
    op: ConsumerOp
    weight: str  # FQN of the weight parameter
    input: Slice  # target == weight
    group_size: int
    full: bool = True

    def input_major(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight parameter as the solver's ``W`` (p x m), rows channel-major."""
        if self.op == "matmul":
            return weight
        return weight.flatten(1).T

    def from_input_major(self, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of ``input_major``: back to the parameter's layout, shape and dtype of ``like``."""
        if self.op == "matmul":
            return w.to(like.dtype).reshape(like.shape)
        return w.T.to(like.dtype).reshape(like.shape).contiguous()


@dataclass(frozen=True)
class StructureGroup:
    """One decision unit: ``count`` structures that live or die together across every tensor."""

    name: str  # stable and readable, e.g. "layer1.0.conv1.channel", "model.layers.3.mlp.neuron"
    kind: GroupKind
    count: int  # n
    unit: int  # d in the (first) consumer's input rows
    consumers: tuple[Consumer, ...]
    producers: tuple[Slice, ...]  # sliced along their output dim (weights and biases)
    followers: tuple[Slice, ...] = ()  # per-channel params/buffers in between (BN, depthwise, scales)
    shape_args: tuple[ShapeArg, ...] = ()  # graph constants rewritten on materialize
    region: tuple[str, ...] = ()  # FX node names whose work depends on the kept width

    def slices(self) -> tuple[Slice, ...]:
        """Every tensor slice a removal touches, consumers' weights included (in their own layout)."""
        return self.producers + self.followers


@dataclass
class StructurePlan:
    """Result of ``find_structures``: the captured program, its groups and what was left fixed."""

    program: torch.export.ExportedProgram
    example_inputs: tuple
    groups: list[StructureGroup]
    blocked: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)

    def group(self, name: str) -> StructureGroup:
        for g in self.groups:
            if g.name == name:
                return g
        known = ", ".join(g.name for g in self.groups[:8])
        raise KeyError(f"no structure group named {name!r} (plan has {len(self.groups)} groups: {known}...)")

    @property
    def structures(self) -> int:
        return sum(g.count for g in self.groups)
