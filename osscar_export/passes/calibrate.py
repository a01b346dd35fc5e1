"""Calibrate: accumulate every consumer's input Gram matrix ``XᵀX`` over calibration batches.

The captured graph (``plan.program.module()``, a GraphModule whose node names are those of
``plan.program.graph``) is run node by node by ``GraphRunner``, so a forward can stop right after
the last input it needs and resume later from a saved set of live values. That gives both modes
(docs/design.md, "Calibrate") at the cost of about one forward each:

* **dense**: one pass, every consumer sees the unpruned model (error curves, parallel solves);
* **sequential**: ``SequentialCalibrator`` serves one group at a time in graph order; between
  stages the caller writes the group's re-fitted weights into the same GraphModule in place, and
  the next stage resumes from the activations saved just before that group's first consumer, so
  later consumers see the already-pruned model (the OSSCAR reference protocol).

In-place ops (``relu_``, ``add_``, ``hardswish_`` of torchvision CNNs) run as captured, in graph
order, which is exactly the model's eager semantics; only a saved state needs care, because the
forward that runs on from it would otherwise write into the values it holds (``GraphRunner.save``).
This is simpler and as correct as functionalising a copy of the program for calibration
(``run_decompositions({})``): node names stay those of the plan by construction, so nothing has to
be mapped back, and no graph is re-traced (seconds per call on a ResNet).

Only Gram matrices and column sums are kept (float32 per batch, summed in float64); activations are held only as
the live values of a saved state in sequential mode. Rows follow ``Consumer.input_major``:
Linear/matmul features, Conv input channels unfolded channel-major (``c·kh·kw + a·kw + b``).
Grams are keyed by the consumer's weight FQN; a weight used by several nodes sums their Grams,
which is exactly its layer problem.

Padding is not data: when the model has an input named ``attention_mask`` (the Hugging Face
convention, 1 = token, 0 = padding; bool or integer, ``(batch, seq)``), the rows of padded
positions are left out of every token-shaped Gram (a Linear/matmul input whose leading dims are
the mask's). Their outputs reach no real token (the keys are masked) and no pooled embedding,
yet with sentences padded to a fixed length they are most of the rows and would steer the re-fit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function
from tqdm.auto import tqdm

from osscar_export.errors import CalibrationDataError, PlanError
from osscar_export.passes.base import Grams, Pass, PassResult, PruneState
from osscar_export.passes.runner import GraphRunner
from osscar_export.plan import Consumer, StructureGroup, StructurePlan

# The activation operand and the weight operand of each consumer op, by schema argument name.
_OPERANDS: dict[str, tuple[str, str]] = {
    "aten.linear.default": ("input", "weight"),
    "aten.conv1d.default": ("input", "weight"),
    "aten.conv1d.padding": ("input", "weight"),
    "aten.conv2d.default": ("input", "weight"),
    "aten.conv2d.padding": ("input", "weight"),
    "aten.addmm.default": ("mat1", "mat2"),
    "aten.mm.default": ("self", "mat2"),
    "aten.matmul.default": ("self", "other"),
}


@dataclass(frozen=True)
class ConsumerInput:
    """How to turn one consumer node's activation into rows of ``X`` (``N x p``)."""

    weight: str
    node: str
    operand: str
    kernel: tuple[int, ...] = ()  # conv only (1-d convs as (1, k))
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # left, right, top, bottom
    dilation: tuple[int, int] = (1, 1)
    features: int = 0  # p

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The activation as ``X`` (float32, one row per token or conv patch)."""
        x = x.detach()
        if not self.kernel:
            if x.shape[-1] != self.features:
                raise PlanError(f"consumer {self.node} ({self.weight}) got {x.shape[-1]} input features, weight has {self.features}")
            return x.reshape(-1, self.features).float()
        if x.dim() == 3:  # conv1d: (B, C, L) -> (B, C, 1, L)
            x = x.unsqueeze(2)
        if any(self.padding):
            x = F.pad(x, self.padding)
        patches = F.unfold(x.float(), self.kernel, dilation=self.dilation, stride=self.stride)  # (B, C*kh*kw, L)
        if patches.shape[1] != self.features:
            raise PlanError(f"consumer {self.node} ({self.weight}) unfolds to {patches.shape[1]} rows, weight has {self.features}")
        return patches.transpose(1, 2).reshape(-1, self.features)


def consumer_input(plan: StructurePlan, gm: GraphModule, consumer: Consumer) -> ConsumerInput:
    """Read a consumer node's op and conv geometry from the graph; PlanError if it can't be re-fit."""
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes.get(consumer.node)
    if node is None or node.op != "call_function":
        raise PlanError(f"consumer node {consumer.node!r} ({consumer.weight}) is not an op in the captured graph")
    op = str(node.target)
    if op not in _OPERANDS:
        raise PlanError(f"consumer {consumer.node} is {op}; re-fitting supports {sorted(_OPERANDS)}")
    operand, weight_arg = _OPERANDS[op]
    kwargs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
    w = kwargs[weight_arg]
    if not (isinstance(w, Node) and w.op == "get_attr" and w.target == consumer.weight):
        raise PlanError(f"consumer {consumer.node}: its weight operand is not the parameter {consumer.weight}")
    weight = gm.get_parameter(consumer.weight)
    if "conv" not in op:
        features = weight.shape[0] if consumer.op == "matmul" else weight.shape[1]
        return ConsumerInput(consumer.weight, consumer.node, operand, features=int(features))
    if kwargs["groups"] != 1:
        raise PlanError(f"consumer {consumer.node} is a grouped conv (groups={kwargs['groups']}): its input rows do not form one least-squares problem")
    kernel = tuple(weight.shape[2:])
    spatial = len(kernel)
    stride, dilation = _pair(kwargs["stride"], spatial), _pair(kwargs["dilation"], spatial)
    if spatial == 1:
        kernel = (1, kernel[0])
    padding = _padding(kwargs["padding"], kernel, dilation, spatial)
    return ConsumerInput(
        consumer.weight, consumer.node, operand, kernel=kernel, stride=stride, padding=padding,
        dilation=dilation, features=int(weight.shape[1] * math.prod(kernel)),
    )


def _pair(value: int | Sequence[int], spatial: int) -> tuple[int, int]:
    v = [value] * spatial if isinstance(value, int) else list(value)
    v = v * spatial if len(v) == 1 else v
    return (1, v[0]) if spatial == 1 else (v[0], v[1])


def _padding(value: str | int | Sequence[int], kernel: tuple[int, int], dilation: tuple[int, int], spatial: int) -> tuple[int, int, int, int]:
    """F.pad order (left, right, top, bottom); 'same' splits odd totals like PyTorch (extra right)."""
    if value == "valid":
        return (0, 0, 0, 0)
    if value == "same":
        (th, tw) = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = _pair(value, spatial)
    return (pw, pw, ph, ph)


def blocked_groups(plan: StructurePlan, gm: GraphModule) -> list[tuple[str, str]]:
    """Groups calibrate cannot serve, with the reason (no re-fittable consumer, grouped conv, ...)."""
    blocked = []
    for group in plan.groups:
        full = [c for c in group.consumers if c.full]
        if not full:
            blocked.append((group.name, "no consumer owns all its input rows, so nothing can be re-fit"))
            continue
        for c in full:
            try:
                consumer_input(plan, gm, c)
            except PlanError as err:
                blocked.append((group.name, str(err)))
                break
    return blocked


# Batches whose XᵀX are summed in float32 before the sum is added into the float64 total: a
# float64 add of a p×p matrix per batch and consumer cost as much as the product itself (a third
# of SmolLM2's calibration time), while float32 over a few batches loses nothing measurable.
BLOCK = 8


class _Accumulator:
    """Adds each visited consumer's ``XᵀX`` into float64 sums keyed by weight FQN, in float32
    blocks of ``BLOCK`` batches (``grams`` adds the last partial block).

    ``tokens`` is the current batch's real-token mask (set per batch); padded rows are skipped.
    """

    def __init__(self, inputs: Iterable[ConsumerInput]):
        self.by_node = {ci.node: ci for ci in inputs}
        self.xtx: dict[str, torch.Tensor] = {}
        self.xsum: dict[str, torch.Tensor] = {}
        self.block: dict[str, torch.Tensor] = {}
        self.batches: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.tokens: torch.Tensor | None = None

    def __call__(self, node: Node, env: dict) -> None:
        ci = self.by_node.get(node.name)
        if ci is None:
            return
        kwargs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        activation = env[kwargs[ci.operand]]
        x = ci.rows(activation)
        if self.tokens is not None and not ci.kernel and activation.shape[:-1] == self.tokens.shape:
            x = x[self.tokens.reshape(-1).to(x.device)]
        w = ci.weight
        x = x.float()
        if w in self.block:
            self.block[w].addmm_(x.T, x)
        else:
            self.block[w] = x.T @ x
        self.batches[w] = self.batches.get(w, 0) + 1
        self.rows[w] = self.rows.get(w, 0) + x.shape[0]
        total = x.sum(0, dtype=torch.float64)
        self.xsum[w] = self.xsum[w] + total if w in self.xsum else total
        if self.batches[w] % BLOCK == 0:
            self._flush(w)

    def _flush(self, w: str) -> None:
        block = self.block.pop(w).double()
        self.xtx[w] = self.xtx[w] + block if w in self.xtx else block

    def grams(self) -> Grams:
        for w in list(self.block):
            self._flush(w)
        return Grams(self.xtx, self.rows, self.xsum)


def full_consumer_inputs(plan: StructurePlan, gm: GraphModule, groups: Iterable[StructureGroup]) -> list[ConsumerInput]:
    return [consumer_input(plan, gm, c) for g in groups for c in g.consumers if c.full]


def check_batches(plan: StructurePlan, batches: Iterable) -> list[tuple[torch.Tensor, ...]]:
    """Calibration as a list of input tuples; CalibrationDataError if empty, mis-shaped or not finite.

    Each batch must match the captured program's inputs: same count, dtype and rank, and every
    dimension that was not exported as dynamic must have the exported size.
    """
    specs = [n.meta["val"] for n in plan.program.graph.nodes if n.op == "placeholder" and n.name in plan.program.graph_signature.user_inputs]
    # The program may have been captured on the first batch itself, so its input dtypes prove
    # nothing: a float input must also match a float dtype of the weights, or the run fails in ATen.
    weight_dtypes = sorted({str(t.dtype) for t in plan.program.state_dict.values() if t.is_floating_point()})
    all_zero = None  # whether every float input seen so far is all zeros; None: none seen
    out = []
    for i, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        elif isinstance(batch, (tuple, list)):
            batch = tuple(batch)
        else:
            raise CalibrationDataError(f"calibration batch {i} is {type(batch).__name__}, expected a tensor or a tuple of tensors")
        if len(batch) != len(specs):
            raise CalibrationDataError(f"calibration batch {i} has {len(batch)} inputs, the model takes {len(specs)}")
        for j, (x, spec) in enumerate(zip(batch, specs)):
            if not isinstance(x, torch.Tensor):
                raise CalibrationDataError(f"calibration batch {i} input {j} is {type(x).__name__}, expected a tensor")
            if x.dtype != spec.dtype:
                raise CalibrationDataError(f"calibration batch {i} input {j} has dtype {x.dtype}, the model was captured with {spec.dtype}")
            static = [d if isinstance(d, int) else None for d in spec.shape]
            if x.dim() != len(static) or any(s is not None and s != d for s, d in zip(static, x.shape)):
                want = "(" + ", ".join("*" if s is None else str(s) for s in static) + ")"
                raise CalibrationDataError(f"calibration batch {i} input {j} has shape {tuple(x.shape)}, the model takes {want}")
            if x.is_floating_point() and weight_dtypes and str(x.dtype) not in weight_dtypes:
                raise CalibrationDataError(
                    f"calibration batch {i} input {j} has dtype {x.dtype}, expected {' or '.join(weight_dtypes)} "
                    f"(the model's weights); convert the batches, e.g. x.to({weight_dtypes[0]})"
                )
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise CalibrationDataError(f"calibration batch {i} input {j} contains NaN or Inf")
            if x.is_floating_point() and all_zero is not False:
                all_zero = not bool(x.any())
        out.append(batch)
    if not out:
        raise CalibrationDataError("calibration data is empty: pass at least one batch of real inputs")
    if all_zero:
        warnings.warn(
            "calibration data is all zeros (every floating-point input of every batch): the Gram "
            "matrices come out zero, so the pruning choice and re-fit mean nothing; calibrate on real inputs",
            stacklevel=1,  # one location, so a warning filter shows it once though each pass checks
        )
    return out


def dense_grams(plan: StructurePlan, gm: GraphModule, batches: Sequence[tuple], groups: Sequence[StructureGroup], progress: bool = True) -> Grams:
    """Every full consumer's Gram from one pass of the unpruned model, stopping after the last one."""
    inputs = full_consumer_inputs(plan, gm, groups)
    runner = GraphRunner(gm)
    stop = max((runner.pos[ci.node] for ci in inputs), default=-1) + 1
    acc = _Accumulator(inputs)
    for batch in tqdm(batches, desc="calibrate (dense)", disable=not progress or len(batches) < 2, leave=False):
        state = runner.start(batch)
        acc.tokens = state.tokens
        runner.advance(state, stop, acc)
    return acc.grams()


class SequentialCalibrator:
    """Serves groups in graph order, each from the model as already pruned by the caller.

    ``order`` sorts groups by their first consumer node. ``stage(group)`` resumes every batch
    from the state saved at the previous stage, saves a new state just before this group's first
    consumer and stops after its last full consumer. The caller must process groups in ``order``
    and write each group's weights into ``gm`` (in place) before the next stage.
    """

    def __init__(self, plan: StructurePlan, gm: GraphModule, batches: Sequence[tuple]):
        self.plan, self.gm = plan, gm
        self.runner = GraphRunner(gm)
        self.states = [self.runner.start(b) for b in batches]

    def order(self, groups: Iterable[StructureGroup]) -> list[StructureGroup]:
        return sorted(groups, key=self._first)

    def _first(self, group: StructureGroup) -> int:
        return min(self.runner.pos[c.node] for c in group.consumers)

    def stage(self, group: StructureGroup) -> Grams:
        first = self._first(group)
        inputs = full_consumer_inputs(self.plan, self.gm, [group])
        stop = max(self.runner.pos[ci.node] for ci in inputs) + 1
        if any(s.pos > first for s in self.states):
            raise PlanError(f"group {group.name} comes before an earlier stage's first consumer: call stage() in order()")
        acc = _Accumulator(inputs)
        for k, state in enumerate(self.states):
            self.states[k] = self.runner.save(self.runner.advance(state, first))
            acc.tokens = state.tokens
            self.runner.advance(state, stop, acc)
        return acc.grams()


class Calibrate(Pass):
    """The dense calibrate pass: plan + calibration batches -> Gram matrices of every solvable group.

    It only reads the captured program (``changed`` is False); groups it cannot serve are listed
    in ``Grams.blocked`` with the reason.
    """

    name = "calibrate"
    requires = ("plan", "batches")
    ensures = ("grams",)

    def __init__(self, progress: bool = True):
        self.progress = progress

    def check_input(self, state: PruneState) -> None:
        if not state.plan.groups:
            raise PlanError("the structure plan has no groups: nothing to calibrate")

    def run(self, state: PruneState) -> PassResult:
        plan = state.plan
        gm = plan.program.module()
        blocked = blocked_groups(plan, gm)
        skip = {name for name, _ in blocked}
        batches = check_batches(plan, state.batches)
        grams = dense_grams(plan, gm, batches, [g for g in plan.groups if g.name not in skip], self.progress)
        grams.blocked = blocked
        return PassResult(state.replace(grams=grams), changed=False)

    def check_output(self, result: PassResult, state: PruneState) -> None:
        for fqn, h in result.state.grams.xtx.items():
            if not torch.isfinite(h).all():
                raise CalibrationDataError(f"the Gram matrix of {fqn} is not finite: calibration activations overflow")


def calibrate(plan: StructurePlan, batches: Iterable, progress: bool = True) -> Grams:
    """The dense Gram matrices of ``batches`` (the ``Calibrate`` pass on its own)."""
    state = PruneState(example_inputs=tuple(plan.example_inputs), program=plan.program, plan=plan, batches=list(batches))
    return Calibrate(progress)(state).state.grams
