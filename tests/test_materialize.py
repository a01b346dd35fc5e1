"""The mask-equivalence law (docs/design.md, "Mask-equivalence law"): materialize(model) computes
what apply_masks(model) computes.

Hand-written plans on tiny models pin the mechanics (producers, followers, consumers, fused
offsets, shape constants, validation); the model families go through the real structure pass.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models_zoo
from osscar_export.errors import PlanError
from osscar_export.export import export_onnx
from osscar_export.passes.base import PruneState
from osscar_export.passes.materialize import Materialize, apply_masks, materialize
from osscar_export.passes.structures import find_structures
from osscar_export.plan import Consumer, ShapeArg, Slice, StructureGroup, StructurePlan

# ---------------------------------------------------------------------------------------------
# helpers


def random_masks(plan: StructurePlan, fraction: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random mask per group keeping round(fraction·n) structures (at least one)."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in plan.groups:
        k = max(1, round(fraction * g.count))
        mask = torch.zeros(g.count, dtype=torch.bool)
        mask[torch.randperm(g.count, generator=gen)[:k]] = True
        masks[g.name] = mask
    return masks


def expected_removed_params(plan: StructurePlan, masks: dict[str, torch.Tensor]) -> int:
    """Parameter count the slices say must go, from counts, units and offsets alone."""
    shapes = {k: list(v.shape) for k, v in plan.program.state_dict.items() if isinstance(v, nn.Parameter)}
    dense = {k: math.prod(v) for k, v in shapes.items()}
    for g in plan.groups:
        r = int((~masks[g.name]).sum()) if g.name in masks else 0
        slices = dict.fromkeys(g.producers + g.followers + tuple(c.input for c in g.consumers))
        for s in slices:
            if s.target in shapes:
                shapes[s.target][s.dim] -= r * s.unit * len(s.offsets)
    return sum(dense[k] - math.prod(v) for k, v in shapes.items())


def materialize_state(model: nn.Module, plan: StructurePlan, masks: dict, weights: dict | None = None) -> PruneState:
    """What the Materialize pass reads."""
    return PruneState(model=model, example_inputs=plan.example_inputs, program=plan.program, plan=plan, masks=masks,
                      weights=weights)


def _new_bias_params(model: nn.Module, plan: StructurePlan, masks: dict, shifts: dict) -> list[int]:
    """Sizes of the biases materialize adds (consumers without one that get a shift): kept outputs."""
    have = dict(model.named_parameters())
    cut = {(s.target, s.dim): int((~masks[g.name]).sum()) * s.unit * len(s.offsets) for g in plan.groups if g.name in masks
           for s in g.producers}
    sizes = []
    for g in plan.groups:
        for c in g.consumers:
            if c.full and c.weight in shifts and c.weight.removesuffix("weight") + "bias" not in have:
                dim = 1 if c.op == "matmul" else 0
                sizes.append(have[c.weight].shape[dim] - cut.get((c.weight, dim), 0))
    return sizes


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def outputs(module: nn.Module, args: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = module(*args)
    return out if isinstance(out, torch.Tensor) else out[0]


def check_onnx(res: dict, args: tuple, path) -> float:
    """Export the small model to ONNX (parity-checked in onnxruntime); its max abs diff."""
    rep = export_onnx(res["small"], args, path)
    assert rep.max_abs_diff <= 1e-3 * res["scale"] + 1e-5
    return rep.max_abs_diff


def show(name: str, fraction: float, res: dict, onnx_diff: float | None = None) -> None:
    """The numbers behind the report (pytest -s): the assertions are in check_equivalence."""
    line = f"{name} kept {fraction:.0%}: small vs masked max|diff| {res['diff']:.2g} (scale {res['scale']:.3g})"
    print(line + ("" if onnx_diff is None else f", ONNX vs small {onnx_diff:.2g}"))


def random_shifts(plan: StructurePlan, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random bias shift (the re-fit's intercept) for every full consumer of the plan."""
    gen = torch.Generator().manual_seed(seed)
    weights = plan.program.state_dict
    consumers = {c.weight: c for g in plan.groups for c in g.consumers if c.full}
    return {w: 0.1 * torch.randn(weights[w].shape[1 if c.op == "matmul" else 0], generator=gen) for w, c in consumers.items()}


def check_equivalence(model: nn.Module, plan: StructurePlan, masks: dict[str, torch.Tensor], args: tuple,
                      shifts: dict[str, torch.Tensor] | None = None) -> dict:
    """Assert the law for one support (and bias shifts); return the measured numbers."""
    dense = outputs(model, args)
    masked_model = apply_masks(model, plan, masks, shifts=shifts)
    small = materialize(model, plan, masks, shifts=shifts)
    masked = outputs(masked_model, args)
    got = outputs(small, args)
    scale = float(masked.abs().max())
    diff = float((got - masked).abs().max())
    assert diff <= 1e-4 * scale + 1e-5, f"small vs masked: max diff {diff:.3g} at scale {scale:.3g}"
    removed = n_params(model) - n_params(small)
    assert removed == expected_removed_params(plan, masks) - sum(_new_bias_params(model, plan, masks, shifts or {}))
    if any(not bool(m.all()) for m in masks.values()):
        assert removed > 0
        change = float((masked - dense).abs().max())
        assert change > 1e-3 * float(dense.abs().max()), "masking changed nothing: the test would be trivial"
    return {"diff": diff, "scale": scale, "removed": removed, "small": small}


# ---------------------------------------------------------------------------------------------
# tiny models with hand-written plans


class ConvNet(nn.Module):
    """conv → BN → ReLU → depthwise → conv 1×1: an inverted-residual-like expansion group."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.project(self.dw(F.relu(self.bn(self.expand(x)))))


class HeadsMLP(nn.Module):
    """Fused-qkv attention (split sizes and head views are shape constants) then an MLP with a scale."""

    def __init__(self, d: int = 16, heads: int = 4, hidden: int = 12):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, hidden)
        self.scale = nn.Parameter(torch.rand(hidden) + 0.5)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(b, s, self.heads, self.hd).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(x)) * self.scale)


def _node(program: torch.export.ExportedProgram, target, nth: int = 0) -> str:
    return [n.name for n in program.graph.nodes if n.target == target][nth]


def convnet_plan() -> tuple[nn.Module, StructurePlan]:
    torch.manual_seed(0)
    model = ConvNet()
    model.train()
    with torch.no_grad():  # calibrate BN so the channels carry signal
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8))
    model.eval()
    args = (torch.randn(2, 3, 8, 8),)
    ep = torch.export.export(model, args, strict=False)
    dw = _node(ep, torch.ops.aten.conv2d.default, 1)
    group = StructureGroup(
        name="expand.channel",
        kind="channel",
        count=8,
        unit=9,
        consumers=(
            Consumer(
                _node(ep, torch.ops.aten.conv2d.default, 2), "conv2d", "project.weight", Slice("project.weight", 1), 1
            ),
        ),
        producers=(Slice("expand.weight", 0), Slice("expand.bias", 0)),
        followers=(
            Slice("bn.weight", 0), Slice("bn.bias", 0), Slice("bn.running_mean", 0), Slice("bn.running_var", 0),
            Slice("dw.weight", 0), Slice("dw.bias", 0),
        ),
        shape_args=(ShapeArg(dw, 6, None, 1),),
    )
    return model, StructurePlan(ep, args, [group])


def heads_mlp_plan() -> tuple[nn.Module, StructurePlan]:
    torch.manual_seed(0)
    model = HeadsMLP().eval()
    args = (torch.randn(2, 5, 16),)
    ep = torch.export.export(model, args, strict=False)
    view, reshape = torch.ops.aten.view.default, torch.ops.aten.reshape.default
    linear = torch.ops.aten.linear.default
    heads = StructureGroup(
        name="attn.head",
        kind="head",
        count=4,
        unit=4,
        consumers=(Consumer(_node(ep, linear, 1), "linear", "o.weight", Slice("o.weight", 1, 4), 4),),
        producers=(Slice("qkv.weight", 0, 4, (0, 16, 32)), Slice("qkv.bias", 0, 4, (0, 16, 32))),
        shape_args=(
            ShapeArg(_node(ep, torch.ops.aten.split.Tensor), 1, None, 4),
            *(ShapeArg(_node(ep, view, i), 1, 2, 1) for i in range(3)),
            ShapeArg(_node(ep, reshape), 1, 2, 4),
        ),
    )
    mlp = StructureGroup(
        name="mlp.neuron",
        kind="neuron",
        count=12,
        unit=1,
        consumers=(Consumer(_node(ep, linear, 3), "linear", "fc2.weight", Slice("fc2.weight", 1), 1),),
        producers=(Slice("fc1.weight", 0), Slice("fc1.bias", 0)),
        followers=(Slice("scale", 0),),
    )
    return model, StructurePlan(ep, args, [heads, mlp])


TINY = {"convnet": convnet_plan, "heads_mlp": heads_mlp_plan}


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_equivalence(name: str, fraction: float) -> None:
    model, plan = TINY[name]()
    masks = random_masks(plan, fraction, seed=1)
    res = check_equivalence(model, plan, masks, plan.example_inputs)
    # the result is a plain graph that re-exports and runs
    again = torch.export.export(res["small"], plan.example_inputs, strict=False).module()
    torch.testing.assert_close(outputs(again, plan.example_inputs), outputs(res["small"], plan.example_inputs))


def test_inputs_untouched_and_fresh_inputs_agree() -> None:
    model, plan = heads_mlp_plan()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan_before = {k: v.clone() for k, v in plan.program.state_dict.items()}
    masks = random_masks(plan, 0.5)
    small = materialize(model, plan, masks)
    masked = apply_masks(model, plan, masks)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in plan.program.state_dict.items():
        assert torch.equal(v, plan_before[k]), k
    x = (torch.randn(2, 5, 16),)  # not the example the graph was captured with
    torch.testing.assert_close(outputs(small, x), outputs(masked, x), rtol=1e-5, atol=1e-5)


def test_dynamic_dims_stay_dynamic() -> None:
    model, plan = heads_mlp_plan()
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    ep = torch.export.export(model, plan.example_inputs, dynamic_shapes=dims, strict=False)
    shape_nodes = {sa.node for g in plan.groups for sa in g.shape_args}
    assert shape_nodes <= {n.name for n in ep.graph.nodes}
    plan = StructurePlan(ep, plan.example_inputs, plan.groups)
    masks = random_masks(plan, 0.5)
    small, masked = materialize(model, plan, masks), apply_masks(model, plan, masks)
    x = (torch.randn(3, 7, 16),)  # another batch and sequence length than the example
    torch.testing.assert_close(outputs(small, x), outputs(masked, x), rtol=1e-5, atol=1e-5)


def test_keep_one_and_keep_all() -> None:
    model, plan = heads_mlp_plan()
    one = {g.name: torch.arange(g.count) == g.count - 1 for g in plan.groups}
    res = check_equivalence(model, plan, one, plan.example_inputs)
    assert res["small"].qkv.weight.shape == (3 * 4, 16)
    whole = {g.name: torch.ones(g.count, dtype=torch.bool) for g in plan.groups}
    result = Materialize()(materialize_state(model, plan, whole))
    assert not result.changed
    torch.testing.assert_close(outputs(result.state.model, plan.example_inputs), outputs(model, plan.example_inputs))
    assert Materialize()(materialize_state(model, plan, random_masks(plan, 0.5))).changed


def test_missing_group_is_kept_whole() -> None:
    model, plan = heads_mlp_plan()
    masks = {"mlp.neuron": random_masks(plan, 0.5)["mlp.neuron"]}
    res = check_equivalence(model, plan, masks | {"attn.head": torch.ones(4, dtype=torch.bool)}, plan.example_inputs)
    small = materialize(model, plan, masks)
    assert small.qkv.weight.shape == model.qkv.weight.shape
    torch.testing.assert_close(outputs(small, plan.example_inputs), outputs(res["small"], plan.example_inputs))


def test_refit_weights_applied_in_dense_layout() -> None:
    model, plan = heads_mlp_plan()
    masks = random_masks(plan, 0.5, seed=3)
    gen = torch.Generator().manual_seed(0)
    consumers = [c.weight for g in plan.groups for c in g.consumers]
    weights = {w: torch.randn(model.get_parameter(w).shape, generator=gen) for w in consumers}
    masked = apply_masks(model, plan, masks, weights)
    small = materialize(model, plan, masks, weights)
    args = plan.example_inputs
    torch.testing.assert_close(outputs(small, args), outputs(masked, args), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs(masked, args), outputs(apply_masks(model, plan, masks), args))
    kept_heads = masks["attn.head"].nonzero().reshape(-1)
    rows = Slice("o.weight", 1, 4).indices(kept_heads)
    torch.testing.assert_close(small.o.weight, weights["o.weight"][:, rows])
    # all groups kept whole, weights applied: still a change
    whole = {g.name: torch.ones(g.count, dtype=torch.bool) for g in plan.groups}
    assert Materialize()(materialize_state(model, plan, whole, weights)).changed


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "masks, message",
    [
        ({"mlp.neuron": torch.ones(11, dtype=torch.bool)}, "expected \\(12,\\)"),
        ({"mlp.neuron": torch.ones(12)}, "torch.bool"),
        ({"mlp.neuron": [True] * 12}, "torch.bool"),
        ({"mlp.nueron": torch.ones(12, dtype=torch.bool)}, "does not have"),
        ({"attn.head": torch.zeros(4, dtype=torch.bool)}, "removes all 4"),
    ],
)
def test_bad_masks(masks, message) -> None:
    model, plan = heads_mlp_plan()
    with pytest.raises(PlanError, match=message):
        materialize(model, plan, masks)
    with pytest.raises(PlanError, match=message):
        apply_masks(model, plan, masks)


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"fc1.weight": torch.zeros(12, 16)}, "not the weight of any consumer"),
        ({"fc2.weight": torch.zeros(16, 6)}, "dense shape"),
        ({"fc2.weight": torch.full((16, 12), float("nan"))}, "non-finite"),
    ],
)
def test_bad_weights(weights, message) -> None:
    model, plan = heads_mlp_plan()
    with pytest.raises(PlanError, match=message):
        materialize(model, plan, random_masks(plan, 0.5), weights)
    with pytest.raises(PlanError, match=message):
        apply_masks(model, plan, random_masks(plan, 0.5), weights)


def test_missing_shape_arg_is_reported() -> None:
    """A plan that forgets a head-count constant fails loudly instead of building a wrong model."""
    model, plan = heads_mlp_plan()
    heads = plan.group("attn.head")
    broken = StructureGroup(**{**heads.__dict__, "shape_args": heads.shape_args[:-1]})
    plan = StructurePlan(plan.program, plan.example_inputs, [broken, plan.group("mlp.neuron")])
    with pytest.raises(PlanError, match="does not re-export"):
        materialize(model, plan, random_masks(plan, 0.5))


def test_overlapping_groups_are_rejected() -> None:
    model, plan = heads_mlp_plan()
    mlp = plan.group("mlp.neuron")
    twin = StructureGroup(**{**mlp.__dict__, "name": "mlp.twin"})
    with pytest.raises(PlanError, match="both own"):
        materialize(model, StructurePlan(plan.program, plan.example_inputs, [mlp, twin]), {})


def test_plan_for_another_model_is_rejected() -> None:
    _, plan = heads_mlp_plan()
    with pytest.raises(PlanError, match="another model"):
        materialize(HeadsMLP(hidden=10), plan, random_masks(plan, 0.5))


def test_tiny_onnx_export_of_small(tmp_path) -> None:
    model, plan = heads_mlp_plan()
    small = materialize(model, plan, random_masks(plan, 0.5))
    rep = export_onnx(small, plan.example_inputs, tmp_path / "small.onnx")
    assert rep.path.exists() and rep.max_abs_diff <= 1e-4


# ---------------------------------------------------------------------------------------------
# model families, through the real structure pass


def calibrated(model: nn.Module, args: tuple) -> nn.Module:
    """Random-init vision models output ~0: set BN statistics from random images, re-draw the head."""
    x = args[0]
    model.train()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            model(torch.randn(8, *x.shape[1:], generator=gen))
    model.eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    torch.manual_seed(2)
    nn.init.normal_(head.weight)
    with torch.no_grad():  # unit-scale logits, so float tolerances mean the same in every family
        head.weight /= outputs(model, args).std()
    return model


@functools.cache
def family(name: str) -> tuple[nn.Module, StructurePlan]:
    """(model, plan) of a zoo model; images get calibrated BN and a re-drawn head."""
    model, args = models_zoo.ZOO[name]()
    if args[0].is_floating_point():
        model = calibrated(model, args)
    return model, find_structures(model, args)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("name", sorted(models_zoo.ZOO))
def test_family_equivalence(name: str, fraction: float, tmp_path) -> None:
    model, plan = family(name)
    assert plan.groups, f"{name}: the structure pass found no groups"
    args = plan.example_inputs
    assert float(outputs(model, args).std()) > 0.05, "model output ~constant: equivalence would be trivial"
    masks = random_masks(plan, fraction, seed=round(fraction * 100))
    res = check_equivalence(model, plan, masks, args, random_shifts(plan) if fraction == 0.5 else None)
    onnx_diff = check_onnx(res, args, tmp_path / f"{name}.onnx") if fraction == 0.5 else None
    show(name, fraction, res, onnx_diff)


def test_gqa_whole_kv_groups() -> None:
    """SmolLM2-shaped attention (9 query heads over 3 KV heads): KV groups go with their query heads."""
    model, plan = family("llama_gqa")
    kv = [g for g in plan.groups if g.kind == "kv_group"]
    assert len(kv) == 2 and all(g.count == 3 for g in kv)
    for removed in ([1], [0, 2]):
        masks = {g.name: ~torch.isin(torch.arange(3), torch.tensor(removed)) for g in kv}
        res = check_equivalence(model, plan, masks, plan.example_inputs)
        small, left = res["small"], 3 - len(removed)
        shape = {k: tuple(v.shape) for k, v in small.named_parameters() if k.startswith("model.layers.0.self_attn")}
        assert shape["model.layers.0.self_attn.q_proj.weight"] == (left * 3 * 64, 576)
        assert shape["model.layers.0.self_attn.k_proj.weight"] == (left * 64, 576)
        assert shape["model.layers.0.self_attn.v_proj.weight"] == (left * 64, 576)
        assert shape["model.layers.0.self_attn.o_proj.weight"] == (576, left * 3 * 64)


def test_mqa_query_heads() -> None:
    """Multi-query attention (4 query heads, 1 KV head): removed query heads leave q_proj and
    o_proj, the shared key and value keep their size."""
    model, plan = family("llama_mqa")
    heads = [g for g in plan.groups if g.kind == "query_head"]
    assert len(heads) == 2 and all(g.count == 4 for g in heads)
    for removed in ([1], [0, 2, 3]):
        masks = {g.name: ~torch.isin(torch.arange(4), torch.tensor(removed)) for g in heads}
        res = check_equivalence(model, plan, masks, plan.example_inputs)
        shape = {k: tuple(v.shape) for k, v in res["small"].named_parameters() if k.startswith("model.layers.1.self_attn")}
        left = 4 - len(removed)
        assert shape["model.layers.1.self_attn.q_proj.weight"] == (left * 64, 256)
        assert shape["model.layers.1.self_attn.k_proj.weight"] == shape["model.layers.1.self_attn.v_proj.weight"] == (64, 256)
        assert shape["model.layers.1.self_attn.o_proj.weight"] == (256, left * 64)


def test_gqa_dynamic_sequence() -> None:
    """A plan captured with a dynamic sequence gives a small model that runs at other lengths."""
    model, args = models_zoo.llama_gqa()
    plan = find_structures(model, args, dynamic_shapes=({1: torch.export.Dim("seq", min=2, max=32)},))
    masks = random_masks(plan, 0.5, seed=11)
    small, masked = materialize(model, plan, masks), apply_masks(model, plan, masks)
    x = (torch.randint(0, models_zoo.VOCAB, (1, 13)),)
    torch.testing.assert_close(outputs(small, x), outputs(masked, x), rtol=1e-4, atol=1e-5)


def test_efficientnet_lite0_real_weights(tmp_path) -> None:
    """The real pretrained EfficientNet-lite0 (ReLU6 MBConv expansions), at a small image size."""
    from osscar_export.models import load_model

    loaded = load_model("efficientnet-lite0", image_size=96)
    args = (torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)),)
    plan = find_structures(loaded.model, args)
    assert len(plan.groups) >= 10
    for fraction in (0.25, 0.5, 0.9):
        res = check_equivalence(loaded.model, plan, random_masks(plan, fraction, seed=7), args)
        onnx_diff = check_onnx(res, args, tmp_path / "lite0.onnx") if fraction == 0.5 else None
        show("efficientnet-lite0", fraction, res, onnx_diff)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm-l6", "smollm2-135m"])
def test_real_language_models(name: str, tmp_path) -> None:
    from osscar_export.models import load_model

    loaded = load_model(name, seq_len=16)
    plan = find_structures(loaded.model, loaded.example_inputs)
    kinds = {g.kind for g in plan.groups}
    assert "neuron" in kinds and kinds & {"head", "kv_group"}
    args = loaded.example_inputs
    for fraction in (0.25, 0.5, 0.9):
        res = check_equivalence(loaded.model, plan, random_masks(plan, fraction, seed=5), args)
        onnx_diff = check_onnx(res, args, tmp_path / f"{name}.onnx") if fraction == 0.5 else None
        show(name, fraction, res, onnx_diff)
