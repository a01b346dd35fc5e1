"""ONNX-level materialize: ``slice_onnx(dense_onnx(plan), plan, masks)`` run in onnxruntime computes
what the torch path computes, with exactly as many weights removed; what it cannot map it refuses.

The reference is ``apply_masks`` (test_materialize proves ``materialize`` equals it) and, for
llama_gqa and resnet18, ``materialize`` itself. Models, plans and masks come from test_materialize
(vision models with calibrated BN and a re-drawn head, so outputs are not ~0).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
import pytest
import torch
from torch import nn

import models_zoo
from osscar_export.errors import PlanError
from osscar_export.onnx_slice import FX_NODE, dense_onnx, slice_onnx
from osscar_export.passes.materialize import _sliced_shapes, apply_masks, check_masks, materialize
from osscar_export.passes.structures import find_structures
from osscar_export.plan import Consumer, ShapeArg, Slice, StructureGroup, StructurePlan
from test_materialize import TINY, _node, family, outputs, random_masks

FAMILIES = ["gpt2", "llama_gqa", "llama_mqa", "mobilenet_v2", "opt", "resnet18", "vit_small"]
SLOW = ["bert", "efficientnet_b0", "mobilenet_v3_small", "resnet50"]  # pass too; pytest -m slow


@functools.cache
def dense(name: str) -> tuple[nn.Module, StructurePlan, onnx.ModelProto]:
    """(model, plan, dense ONNX) of a zoo family or of a hand-written plan of test_materialize."""
    model, plan = TINY[name]() if name in TINY else family(name)
    return model, plan, dense_onnx(plan)


def copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def run_onnx(proto: onnx.ModelProto, args: tuple) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), args)})[0]


def n_weights(proto: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) for t in proto.graph.initializer)


def n_state(module: nn.Module) -> int:
    return sum(v.numel() for v in module.state_dict().values())


def assert_close(got: np.ndarray | torch.Tensor, want: np.ndarray | torch.Tensor) -> None:
    got, want = np.asarray(got), np.asarray(want)
    scale, diff = float(np.abs(want).max()), float(np.abs(got - want).max())
    assert diff <= 1e-4 * scale + 1e-5, f"sliced ONNX vs torch: max diff {diff:.3g} at scale {scale:.3g}"


def check_sliced(proto: onnx.ModelProto, small: onnx.ModelProto, plan: StructurePlan, masks: dict) -> None:
    """Every initializer has the shape materialize gives its tensor; nothing else changed size."""
    want = _sliced_shapes(plan, check_masks(plan, masks))
    before = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for t in small.graph.initializer:
        assert tuple(t.dims) == tuple(want.get(t.name, before[t.name])), t.name
    assert len(small.graph.initializer) == len(proto.graph.initializer)


# ---------------------------------------------------------------------------------------------
# equivalence


@pytest.mark.parametrize("name", FAMILIES + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_family_matches_masked_model(name: str) -> None:
    model, plan, proto = dense(name)
    args = plan.example_inputs
    masks = random_masks(plan, 0.5, seed=5)
    small = slice_onnx(proto, plan, masks)
    want = outputs(apply_masks(model, plan, masks), args).numpy()
    dense_out = outputs(model, args).numpy()
    assert dense_out.std() > 0.05 and np.abs(want - dense_out).max() > 1e-3 * np.abs(dense_out).max()
    assert_close(run_onnx(small, args), want)
    check_sliced(proto, small, plan, masks)
    assert n_weights(small) < n_weights(proto)


@pytest.mark.parametrize("name", ["llama_gqa", "resnet18"])
def test_same_as_materialize(name: str) -> None:
    """Against the torch path itself: same outputs, same number of weights removed."""
    model, plan, proto = dense(name)
    args = plan.example_inputs
    masks = random_masks(plan, 0.25, seed=7)
    small, torch_small = slice_onnx(proto, plan, masks), materialize(model, plan, masks)
    assert_close(run_onnx(small, args), outputs(torch_small, args))
    removed = n_state(plan.program.module()) - n_state(torch_small)
    assert n_weights(proto) - n_weights(small) == removed > 0


@pytest.mark.parametrize("fraction", [0.25, 1.0])
@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_plans(name: str, fraction: float) -> None:
    """Hand-written plans: depthwise conv groups (convnet); split sizes and head views (heads_mlp)."""
    model, plan, proto = dense(name)
    masks = random_masks(plan, fraction, seed=1)
    before = proto.SerializeToString()
    small = slice_onnx(proto, plan, masks)
    assert proto.SerializeToString() == before  # the dense model is reused for every variant
    want = outputs(apply_masks(model, plan, masks), plan.example_inputs)
    assert_close(run_onnx(small, plan.example_inputs), want)
    check_sliced(proto, small, plan, masks)


def test_weights_on_disk(tmp_path) -> None:
    """A dense model whose weights were moved to a file slices to the same model, reading only the
    tensors it cuts: the others stay references to that file."""
    model, plan, proto = dense("llama_gqa")
    masks = random_masks(plan, 0.5, seed=5)
    in_memory = slice_onnx(proto, plan, masks)
    on_disk = copy(proto)
    onnx.save(on_disk, tmp_path / "dense.onnx", save_as_external_data=True, location="dense.onnx.data", size_threshold=0)
    small = slice_onnx(on_disk, plan, masks, tmp_path)
    external = {t.name for t in small.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    cut = {t.name for t in small.graph.initializer} - external
    assert external and cut and all(t.data_location == onnx.TensorProto.EXTERNAL for t in on_disk.graph.initializer)
    onnx.load_external_data_for_model(small, str(tmp_path))
    assert [n.SerializeToString() for n in small.graph.node] == [n.SerializeToString() for n in in_memory.graph.node]
    want = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in small.graph.initializer}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_dynamic_sequence() -> None:
    """A plan captured with a dynamic sequence gives a sliced ONNX that runs at other lengths."""
    model, args = models_zoo.llama_gqa()
    plan = find_structures(model, args, dynamic_shapes=({1: torch.export.Dim("seq", min=2, max=32)},))
    masks = random_masks(plan, 0.5, seed=11)
    small = slice_onnx(dense_onnx(plan), plan, masks)
    x = (torch.randint(0, models_zoo.VOCAB, (1, 13)),)
    assert_close(run_onnx(small, x), outputs(apply_masks(model, plan, masks), x))


# ---------------------------------------------------------------------------------------------
# what cannot be mapped is refused


class FirstThree(nn.Module):
    """Only the first three of six features are read: the slice bound is a shape arg."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(3, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))[..., :3])


class Halves(nn.Module):
    """tensor_split into halves: structure i owns features i and i + 8."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(8, 4)

    def forward(self, x):
        a, b = torch.tensor_split(torch.relu(self.fc1(x)), 2, dim=-1)
        return self.fc2(a * b)


def linear_plan(model: nn.Module, args: tuple, count: int, offsets: tuple[int, ...],
                bound: bool = False) -> StructurePlan:
    """One neuron group: fc1 rows (at ``offsets``) read by fc2; ``bound``: a slice end is its width."""
    ep = torch.export.export(model.eval(), args, strict=False)
    group = StructureGroup(
        name="fc1.neuron", kind="neuron", count=count, unit=1,
        consumers=(Consumer(_node(ep, torch.ops.aten.linear.default, 1), "linear", "fc2.weight",
                            Slice("fc2.weight", 1), 1),),
        producers=(Slice("fc1.weight", 0, 1, offsets), Slice("fc1.bias", 0, 1, offsets)),
        shape_args=(ShapeArg(_node(ep, torch.ops.aten.slice.Tensor), 3, None, 1),) if bound else (),
    )
    return StructurePlan(ep, args, [group])


def first_three_plan(rank: int) -> tuple[nn.Module, StructurePlan]:
    torch.manual_seed(0)
    model = FirstThree()
    return model, linear_plan(model, (torch.randn(*[2] * (rank - 1), 4),), 3, (0,), bound=True)


def test_slice_bound_found_by_value() -> None:
    model, plan = first_three_plan(rank=3)  # slice(x, dim=2, 0, end=3): the 3 occurs once
    masks = {"fc1.neuron": torch.tensor([True, False, True])}
    small = slice_onnx(dense_onnx(plan), plan, masks)
    assert_close(run_onnx(small, plan.example_inputs), outputs(materialize(model, plan, masks), plan.example_inputs))


def test_ambiguous_shape_arg_is_refused() -> None:
    """slice(x, dim=3, 0, end=3): two ONNX constants hold 3; the torch path still works."""
    model, plan = first_three_plan(rank=4)
    masks = {"fc1.neuron": torch.tensor([True, False, True])}
    assert_close(outputs(materialize(model, plan, masks), plan.example_inputs),
                 outputs(apply_masks(model, plan, masks), plan.example_inputs))
    with pytest.raises(PlanError, match=r"the value 3 occurs 2 times.*use materialize"):
        slice_onnx(dense_onnx(plan), plan, masks)


def test_size_made_by_decomposition_is_refused() -> None:
    """The exporter lowers tensor_split to slices with sizes the plan does not list."""
    torch.manual_seed(0)
    model = Halves()
    plan = linear_plan(model, (torch.randn(3, 8),), 8, (0, 8))
    masks = {"fc1.neuron": torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)}
    assert_close(outputs(materialize(model, plan, masks), plan.example_inputs),
                 outputs(apply_masks(model, plan, masks), plan.example_inputs))
    with pytest.raises(PlanError, match="made by the exporter's decomposition of 'tensor_split'"):
        slice_onnx(dense_onnx(plan), plan, masks)


def test_shape_arg_without_onnx_nodes_is_refused() -> None:
    """An ONNX model whose nodes for the split lost their FX record: the split size cannot be found."""
    _, plan, proto = dense("heads_mlp")
    proto = copy(proto)
    split = plan.group("attn.head").shape_args[0].node
    for node in proto.graph.node:
        kept = [(p.key, p.value) for p in node.metadata_props if (p.key, p.value) != (FX_NODE, split)]
        del node.metadata_props[:]
        for k, v in kept:
            node.metadata_props.add(key=k, value=v)
    with pytest.raises(PlanError, match=rf"node='{split}'.*occurs 0 times"):
        slice_onnx(proto, plan, random_masks(plan, 0.5))


def test_bad_inputs_are_refused() -> None:
    _, plan, proto = dense("heads_mlp")
    bare = copy(proto)
    del bare.metadata_props[:]
    with pytest.raises(PlanError, match="dense_onnx"):
        slice_onnx(bare, plan, random_masks(plan, 0.5))
    with pytest.raises(PlanError, match="does not have"):
        slice_onnx(proto, plan, {"mlp.nueron": torch.ones(12, dtype=torch.bool)})
    _, other, _ = dense("convnet")
    with pytest.raises(PlanError, match="not initializers of the ONNX model"):
        slice_onnx(proto, other, random_masks(other, 0.5))
