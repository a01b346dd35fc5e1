"""Pass contract, in the manner of torch.fx's and onnx-ir's pass infrastructure.

Every prune pass reads and returns one ``PruneState``. A pass declares the state fields it
``requires`` (set on entry) and ``ensures`` (set on exit); ``Pass.__call__`` checks both, plus
the pass's own ``check_input`` / ``check_output``, so a broken invariant fails at the pass that
broke it. ``PassResult.changed`` says whether the pass changed the model's graph or weights,
as opposed to only analysing it. ``run_passes`` chains passes (see docs/design.md, "Passes").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from osscar_export.errors import PlanError
from osscar_export.plan import StructurePlan


@dataclass
class Grams:
    """``XᵀX`` and ``Xᵀ1`` per consumer weight FQN (float64, ``p x p`` and ``p``, rows as
    ``Consumer.input_major``): the column sums give the re-fit its intercept (docs/design.md, "Solver")."""

    xtx: dict[str, torch.Tensor]
    rows: dict[str, int]  # calibration rows (real tokens / patches) accumulated per weight
    xsum: dict[str, torch.Tensor]
    blocked: list[tuple[str, str]] = field(default_factory=list)  # (group name, reason)


@dataclass(frozen=True)
class PruneState:
    """What flows through the prune passes; each pass returns a copy with its fields filled."""

    model: Any = None  # the module being pruned (eager or captured); materialize replaces it
    example_inputs: tuple = ()
    program: torch.export.ExportedProgram | None = None  # capture
    plan: StructurePlan | None = None  # find_structures
    batches: list[tuple] | None = None  # calibration batches shaped like example_inputs
    grams: Grams | None = None  # calibrate (dense Gram matrices)
    masks: dict[str, torch.Tensor] | None = None  # solve: group name -> bool per structure
    weights: dict[str, torch.Tensor] | None = None  # solve: re-fitted consumer weights
    losses: dict[str, float] | None = None  # solve: consumer weight FQN -> layer objective increase
    shifts: dict[str, torch.Tensor] | None = None  # solve: consumer weight FQN -> added to its output (bias)

    def replace(self, **changes: Any) -> PruneState:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PassResult:
    """A pass's output state and whether it changed the model (graph or weights)."""

    state: PruneState
    changed: bool


class Pass:
    """A subclass sets ``name``, ``requires`` and ``ensures`` and implements ``run``."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()

    def run(self, state: PruneState) -> PassResult:
        raise NotImplementedError

    def check_input(self, state: PruneState) -> None:
        """Preconditions beyond the required fields; raise an ``OsscarError`` with a specific message."""

    def check_output(self, result: PassResult, state: PruneState) -> None:
        """Postconditions of ``result`` given the input ``state``."""

    def __call__(self, state: PruneState) -> PassResult:
        missing = [f for f in self.requires if getattr(state, f) is None]
        if missing:
            raise PlanError(f"pass {self.name} requires {', '.join(missing)}; run the passes that produce them first")
        self.check_input(state)
        result = self.run(state)
        unset = [f for f in self.ensures if getattr(result.state, f) is None]
        if unset:
            raise PlanError(f"pass {self.name} promised {', '.join(unset)} but left them unset")
        self.check_output(result, state)
        return result


def run_passes(passes: Sequence[Pass], state: PruneState) -> PassResult:
    """Run ``passes`` in order, each on the previous one's state; changed if any pass changed."""
    changed = False
    for p in passes:
        result = p(state)
        state, changed = result.state, changed or result.changed
    return PassResult(state, changed)
