"""find_structures on the model families: expected groups per family, their slices and constants,
and a cross-check of the coupled parameters against Torch-Pruning's DependencyGraph."""

from __future__ import annotations

import functools
import re
import time

import pytest
import torch
from torch import nn

import models_zoo
from osscar_export.errors import CaptureError, PlanError
from osscar_export.passes.base import PruneState
from osscar_export.passes.capture import Capture, capture
from osscar_export.passes.structures import FindStructures, find_structures
from osscar_export.plan import StructureGroup, StructurePlan

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def plan_of(name: str) -> StructurePlan:
    model, inputs = models_zoo.ZOO[name]()
    return find_structures(model, inputs)


def by_name(plan: StructurePlan) -> dict[str, StructureGroup]:
    return {g.name: g for g in plan.groups}


def modules(targets) -> set[str]:
    return {t.rsplit(".", 1)[0] for t in targets}


def producer_modules(g: StructureGroup) -> set[str]:
    return modules(s.target for s in g.producers)


def consumer_modules(g: StructureGroup) -> set[str]:
    return modules(c.weight for c in g.consumers)


def arg_value(plan: StructurePlan, shape_arg) -> int:
    node = next(n for n in plan.program.graph.nodes if n.name == shape_arg.node)
    value = node.args[shape_arg.arg] if isinstance(shape_arg.arg, int) else node.kwargs[shape_arg.arg]
    return value if shape_arg.index is None else value[shape_arg.index]


def assert_shape_args_sane(plan: StructurePlan) -> None:
    """Every shape arg names an int constant that holds all the group's structures."""
    for g in plan.groups:
        for s in g.shape_args:
            value = arg_value(plan, s)
            assert isinstance(value, int), (g.name, s, value)
            assert value >= g.count * s.unit, (g.name, s, value)


def assert_regions(plan: StructurePlan) -> None:
    for g in plan.groups:
        region = set(g.region)
        assert {c.node for c in g.consumers} <= region, g.name


# ------------------------------------------------------------------------------------ CNNs


def test_resnet18_basic_blocks_prune_internal_channels_only():
    plan = plan_of("resnet18")
    groups = by_name(plan)
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    # one group per BasicBlock (conv1 -> bn1 -> relu -> conv2); the residual streams stay fixed
    assert sorted(groups) == sorted(f"{b}.conv1.channel" for b in blocks)
    for b in blocks:
        g = groups[f"{b}.conv1.channel"]
        assert g.kind == "channel" and g.unit == 9  # conv2 is 3x3: kh*kw rows per channel
        assert [c.weight for c in g.consumers] == [f"{b}.conv2.weight"] and g.consumers[0].full
        assert [s.target for s in g.producers] == [f"{b}.conv1.weight"]
        assert {s.target for s in g.followers} == {f"{b}.bn1.{k}" for k in ("weight", "bias", "running_mean", "running_var")}
        assert g.count == plan.program.state_dict[f"{b}.conv1.weight"].shape[0]
    assert any("residual stream" in reason for _, reason in plan.blocked)
    assert any("graph input" in reason for _, reason in plan.blocked)
    assert_regions(plan)


def test_resnet50_bottlenecks_yield_two_internal_groups_each():
    plan = plan_of("resnet50")
    groups = by_name(plan)
    blocks = [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)]
    expected = {f"{b}.conv{i}.channel" for b in blocks for i in (1, 2)}
    # + the stem: conv1 -> bn1 -> relu -> maxpool is read by layer1.0.conv1 and its downsample
    # conv, never summed (layer1.0 has a downsample), so it is a group and not a residual stream.
    assert set(groups) == expected | {"conv1.channel"} and len(groups) == 16 * 2 + 1
    for g in plan.groups:
        assert not any(re.search(r"conv3|downsample", t) for t in producer_modules(g)), g.name
    for b in blocks:
        assert consumer_modules(groups[f"{b}.conv1.channel"]) == {f"{b}.conv2"}
        assert groups[f"{b}.conv1.channel"].unit == 9
        assert consumer_modules(groups[f"{b}.conv2.channel"]) == {f"{b}.conv3"}
        assert groups[f"{b}.conv2.channel"].unit == 1
    assert consumer_modules(groups["conv1.channel"]) == {"layer1.0.conv1", "layer1.0.downsample.0"}


def _depthwise_shape_arg(plan: StructurePlan, g: StructureGroup, dw_weight: str) -> None:
    """The depthwise conv's ``groups`` argument shrinks with the group (unit 1)."""
    dw_nodes = [
        n.name
        for n in plan.program.graph.nodes
        if n.op == "call_function" and "conv" in str(n.target) and any(
            a.op == "placeholder" and plan.program.graph_signature.inputs_to_parameters.get(a.name) == dw_weight
            for a in n.args if isinstance(a, torch.fx.Node)
        )
    ]
    assert len(dw_nodes) == 1
    assert any(s.node == dw_nodes[0] and s.unit == 1 and arg_value(plan, s) == g.count for s in g.shape_args)


def test_mobilenet_v2_expansion_groups():
    plan = plan_of("mobilenet_v2")
    groups = by_name(plan)
    # 16 inverted residuals with expansion (features.2..17): expand 1x1 -> depthwise -> project 1x1
    for i in range(2, 18):
        g = groups[f"features.{i}.conv.0.0.channel"]
        assert producer_modules(g) == {f"features.{i}.conv.0.0"}
        assert consumer_modules(g) == {f"features.{i}.conv.2"}
        followers = {s.target for s in g.followers}
        assert f"features.{i}.conv.1.0.weight" in followers  # the depthwise channels follow
        assert {f"features.{i}.conv.0.1.weight", f"features.{i}.conv.1.1.running_var"} <= followers
        _depthwise_shape_arg(plan, g, f"features.{i}.conv.1.0.weight")
    # + 4: the stem (read by features.1's depthwise, then its project conv), features.1's project
    # output (features.2 changes width: no residual), the single-block 320-channel stage
    # (features.17.conv.2 -> features.18) and the 1280-channel head conv -> classifier.
    others = {"features.0.0.channel", "features.1.conv.1.channel", "features.17.conv.2.channel", "features.18.0.channel"}
    assert set(groups) == {f"features.{i}.conv.0.0.channel" for i in range(2, 18)} | others
    assert len(plan.groups) == 20
    assert consumer_modules(groups["features.18.0.channel"]) == {"classifier.1"}
    assert_shape_args_sane(plan)


def _check_se_block(groups: dict[str, StructureGroup], block: str, expand: str, se: str, project: str) -> None:
    """Squeeze-excite: fc1 also reads the expanded channels, fc2's rows also scale them."""
    g = groups[f"{expand}.channel"]
    assert consumer_modules(g) == {f"{se}.fc1", project}
    assert producer_modules(g) == {expand, f"{se}.fc2"}
    hidden = groups[f"{se}.fc1.channel"]
    assert producer_modules(hidden) == {f"{se}.fc1"} and consumer_modules(hidden) == {f"{se}.fc2"}
    assert hidden.kind == "channel"


def test_mobilenet_v3_small_hardswish_and_squeeze_excite():
    plan = plan_of("mobilenet_v3_small")
    groups = by_name(plan)
    # 10 expansions (features.2..11), 9 SE hidden groups (features.1, 4..11), the stem (read by
    # features.1's depthwise + SE + project), features.1's project output, features.12's 576-channel
    # conv -> classifier.0, and the classifier MLP's 1024 neurons: 23.
    assert len(plan.groups) == 23
    assert sum(1 for n in groups if re.fullmatch(r"features\.\d+\.block\.0\.0\.channel", n)) == 10
    assert sum(1 for n in groups if n.endswith(".fc1.channel")) == 9
    for i in range(4, 12):  # blocks with expansion + squeeze-excite (hardswish from features.4)
        _check_se_block(groups, f"features.{i}", f"features.{i}.block.0.0", f"features.{i}.block.2", f"features.{i}.block.3.0")
    assert producer_modules(groups["features.0.0.channel"]) == {"features.0.0", "features.1.block.1.fc2"}
    assert groups["classifier.neuron"].kind == "neuron" and groups["features.12.0.channel"].kind == "channel"
    assert_shape_args_sane(plan)


def test_efficientnet_b0_mbconv_with_se():
    plan = plan_of("efficientnet_b0")
    groups = by_name(plan)
    blocks = [f"features.{s}.{b}" for s, n in zip(range(1, 8), (1, 2, 2, 3, 3, 4, 1)) for b in range(n)]
    # every MBConv has an SE hidden group (16); all but features.1.0 (expand ratio 1) have an
    # expansion group (15); + stem, features.1.0's project output, the single-block 320 stage
    # (features.7.0) and the 1280 head conv: 35.
    assert len(blocks) == 16 and len(plan.groups) == 35
    for b in blocks[1:]:
        _check_se_block(groups, b, f"{b}.block.0.0", f"{b}.block.2", f"{b}.block.3.0")
        assert f"{b}.block.1.0.weight" in {s.target for s in groups[f"{b}.block.0.0.channel"].followers}
    assert {"features.0.0.channel", "features.1.0.block.2.0.channel", "features.7.0.block.3.0.channel", "features.8.0.channel"} <= set(groups)


def test_efficientnet_lite0_real_weights():
    pytest.importorskip("efficientnet_lite_pytorch")
    from osscar_export.models import load_model

    loaded = load_model("efficientnet-lite0")
    plan = find_structures(loaded.model, loaded.example_inputs)
    groups = by_name(plan)
    # lite0 MBConv blocks have no SE: 15 expansion groups (blocks 1..15; block 0 has ratio 1),
    # the stem (read by block 0's depthwise), block 0's and block 15's project outputs (no
    # residual after them) and the 1280-channel head conv -> fc: 19.
    assert {f"_blocks.{i}._expand_conv.channel" for i in range(1, 16)} <= set(groups)
    assert len(plan.groups) == 19
    for i in range(1, 16):
        g = groups[f"_blocks.{i}._expand_conv.channel"]
        assert consumer_modules(g) == {f"_blocks.{i}._project_conv"}
        assert f"_blocks.{i}._depthwise_conv.weight" in {s.target for s in g.followers}
    assert_shape_args_sane(plan)


# ------------------------------------------------------------------------------------ transformers


def test_vit_heads_from_fused_in_proj_and_mlp_neurons():
    plan = plan_of("vit_small")
    groups = by_name(plan)
    assert len(plan.groups) == 2 * 2  # per encoder layer: one head group, one MLP neuron group
    for i in range(2):
        layer = f"encoder.layers.encoder_layer_{i}"
        head = groups[f"{layer}.self_attention.head"]
        assert head.kind == "head" and head.count == 4 and head.unit == 16
        in_proj = {s.target: s for s in head.producers}[f"{layer}.self_attention.in_proj_weight"]
        assert in_proj.offsets == (0, 64, 128) and in_proj.unit == 16 and in_proj.dim == 0
        assert head.consumers[0].weight == f"{layer}.self_attention.out_proj.weight" and head.consumers[0].full
        # head counts in the view shapes and E in unflatten(-1, (3, E)) are rewritten
        assert {arg_value(plan, s) for s in head.shape_args} >= {4, 64}
        mlp = groups[f"{layer}.mlp.neuron"]
        assert mlp.kind == "neuron" and mlp.count == 128 and consumer_modules(mlp) == {f"{layer}.mlp.3"}
    assert any("normalised over by layer_norm" in r for _, r in plan.blocked)
    assert_shape_args_sane(plan)


@pytest.mark.slow
def test_vit_b_16_full_size():
    model, inputs = models_zoo.vit_b_16()
    t0 = time.perf_counter()
    plan = find_structures(model, inputs)
    assert len(plan.groups) == 24 and sum(g.kind == "head" for g in plan.groups) == 12
    assert all(g.count == 12 and g.unit == 64 for g in plan.groups if g.kind == "head")
    assert all(g.count == 3072 for g in plan.groups if g.kind == "neuron")
    assert time.perf_counter() - t0 < 120


def test_gpt2_conv1d_matmul_consumers_and_fused_c_attn():
    plan = plan_of("gpt2")
    groups = by_name(plan)
    assert len(plan.groups) == 2 * 2
    for i in range(2):
        head = groups[f"transformer.h.{i}.attn.head"]
        c_attn = {s.target: s for s in head.producers}[f"transformer.h.{i}.attn.c_attn.weight"]
        assert (c_attn.dim, c_attn.unit, c_attn.offsets) == (1, 16, (0, 64, 128))  # Conv1D weight is (in, out)
        (c_proj,) = head.consumers
        assert c_proj.op == "matmul" and c_proj.input.dim == 0 and c_proj.input.unit == 16
        split = [s for s in head.shape_args if s.node.startswith("split")]
        assert len(split) == 1 and split[0].unit == 16 and arg_value(plan, split[0]) == 64
        mlp = groups[f"transformer.h.{i}.mlp.neuron"]
        assert mlp.consumers[0].op == "matmul" and mlp.consumers[0].input.dim == 0
        assert {(s.target, s.dim) for s in mlp.producers} == {
            (f"transformer.h.{i}.mlp.c_fc.weight", 1), (f"transformer.h.{i}.mlp.c_fc.bias", 0)}
        assert {arg_value(plan, s) for s in mlp.shape_args} == {256}  # view(-1, 256) and view(1, 8, 256)
    assert_shape_args_sane(plan)
    assert_regions(plan)


def test_opt_constant_head_counts_in_views():
    plan = plan_of("opt")
    groups = by_name(plan)
    assert len(plan.groups) == 2 * 2
    for i in range(2):
        head = groups[f"model.decoder.layers.{i}.self_attn.head"]
        assert head.kind == "head" and (head.count, head.unit) == (4, 16)
        assert producer_modules(head) == {f"model.decoder.layers.{i}.self_attn.{p}_proj" for p in "qkv"}
        # view(1, -1, 4, 16) for q, k and v: the 4 is a head count (unit 1)
        assert sorted((arg_value(plan, s), s.unit) for s in head.shape_args) == [(4, 1)] * 3
        mlp = groups[f"model.decoder.layers.{i}.neuron"]
        assert producer_modules(mlp) == {f"model.decoder.layers.{i}.fc1"}
        assert consumer_modules(mlp) == {f"model.decoder.layers.{i}.fc2"}


def test_llama_gqa_kv_groups_and_swiglu():
    plan = plan_of("llama_gqa")
    groups = by_name(plan)
    assert len(plan.groups) == 2 * 2  # per layer: one kv_group group, one SwiGLU neuron group
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        kv = groups[f"{attn}.kv_group"]
        assert kv.kind == "kv_group" and kv.count == 3 and kv.unit == 3 * 64
        units = {s.target: (s.dim, s.unit, s.offsets) for s in kv.producers}
        assert units == {
            f"{attn}.q_proj.weight": (0, 192, (0,)),
            f"{attn}.k_proj.weight": (0, 64, (0,)),
            f"{attn}.v_proj.weight": (0, 64, (0,)),
        }
        assert kv.consumers[0].weight == f"{attn}.o_proj.weight" and kv.consumers[0].input.unit == 192
        # repeat_kv: expand(1, 3, 3, T, 64) (KV count, unit 1) and reshape(1, 9, T, 64) (unit n_rep)
        assert sorted((arg_value(plan, s), s.unit) for s in kv.shape_args) == [(3, 1), (3, 1), (9, 3), (9, 3)]
        mlp = groups[f"model.layers.{i}.mlp.neuron"]
        assert producer_modules(mlp) == {f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"}
        assert consumer_modules(mlp) == {f"model.layers.{i}.mlp.down_proj"}
    assert any("query heads sharing one of several KV heads" in r for _, r in plan.blocked)


def test_bert_encoder_heads_and_neurons():
    plan = plan_of("bert")
    groups = by_name(plan)
    assert len(plan.groups) == 2 * 2
    for i in range(2):
        head = groups[f"encoder.layer.{i}.attention.head"]
        assert (head.kind, head.count, head.unit) == ("head", 4, 16)
        assert consumer_modules(head) == {f"encoder.layer.{i}.attention.output.dense"}
        mlp = groups[f"encoder.layer.{i}.neuron"]
        assert producer_modules(mlp) == {f"encoder.layer.{i}.intermediate.dense"}
        assert consumer_modules(mlp) == {f"encoder.layer.{i}.output.dense"}


# ------------------------------------------------------------------------------------ contract


def test_plan_targets_are_program_fqns_and_within_bounds():
    for name in ("resnet18", "vit_small", "llama_gqa"):
        plan = plan_of(name)
        tensors = {**plan.program.state_dict, **plan.program.constants}
        for g in plan.groups:
            for s in g.slices() + tuple(c.input for c in g.consumers):
                idx = s.indices(torch.arange(g.count))
                assert s.target in tensors and int(idx.max()) < tensors[s.target].shape[s.dim]


def test_dynamic_batch_and_sequence_give_the_same_groups():
    from torch.export import Dim

    model, (ids,) = models_zoo.gpt2()
    ids = torch.cat([ids, ids])
    static = find_structures(model, (ids,))
    dynamic = find_structures(model, (ids,), dynamic_shapes=({0: Dim("b", min=1, max=8), 1: Dim("t", min=2, max=32)},))
    assert [g.name for g in static.groups] == [g.name for g in dynamic.groups]
    for g in dynamic.groups:  # symbolic entries (batch*seq) are not constants; width entries still are
        assert all(isinstance(arg_value(dynamic, s), int) for s in g.shape_args)
    assert {s.unit for g in dynamic.groups for s in g.shape_args} == {s.unit for g in static.groups for s in g.shape_args}


def test_capture_errors_are_clear():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError, match="could not capture DataDependent"):
        capture(DataDependent(), (torch.randn(3),))
    with pytest.raises(CaptureError, match="tuple"):
        capture(nn.Linear(2, 2), [torch.randn(2)])
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    capture(model, (torch.randn(1, 2),))
    assert model.training and model[1].training  # capture runs in eval mode and restores the flags


def test_pass_contract():
    with pytest.raises(PlanError, match="requires program"):
        FindStructures()(PruneState())
    with pytest.raises(PlanError, match="ExportedProgram"):
        FindStructures()(PruneState(program=nn.Linear(2, 2)))
    with pytest.raises(PlanError, match="requires model"):
        Capture()(PruneState())
    plan = plan_of("resnet18")
    result = FindStructures()(PruneState(program=plan.program, example_inputs=plan.example_inputs))
    assert result.changed is False and result.state.program is plan.program
    assert [g.name for g in result.state.plan.groups] == [g.name for g in plan.groups]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    captured = Capture()(PruneState(model=model, example_inputs=(torch.randn(1, 4),)))
    assert captured.changed is False and isinstance(captured.state.program, torch.export.ExportedProgram)


def test_pass_speed_on_resnet50():
    """The analysis alone (capture excluded) stays interactive on a mid-sized CNN."""
    plan = plan_of("resnet50")
    t0 = time.perf_counter()
    FindStructures()(PruneState(program=plan.program))
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.slow
def test_pass_speed_on_30_layer_smollm2_shape():
    with torch.device("meta"):
        model, (ids,) = models_zoo.llama_gqa(layers=30, intermediate=1536)
    ep = capture(model, (ids.to("meta"),))
    t0 = time.perf_counter()
    plan = FindStructures()(PruneState(program=ep)).state.plan
    elapsed = time.perf_counter() - t0
    assert len(plan.groups) == 60 and {g.kind for g in plan.groups} == {"kv_group", "neuron"}
    assert elapsed < 10.0, elapsed


# ------------------------------------------------------------------------------------ Torch-Pruning


def _prunes_out_rows(dep) -> bool:
    """A dependency that slices a dense layer's output rows (a producer, in our terms)."""
    m = dep.target.module
    if dep.handler.__name__ != "prune_out_channels":
        return False
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _tp_groups(model: nn.Module, inputs) -> list[tuple[set[str], int]]:
    """Torch-Pruning's groups as (module names, number of producers)."""
    tp = pytest.importorskip("torch_pruning")
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for group in dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        mods = {names[dep.target.module] for dep, _ in group if dep.target.module in names}
        producers = {names[dep.target.module] for dep, _ in group if _prunes_out_rows(dep)}
        out.append((mods, len(producers)))
    return out


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_coupled_parameters_agree_with_torch_pruning(name):
    """Every group of ours is a Torch-Pruning group (same modules: producers, BN and depthwise
    followers, consumers). TP groups we do not have are exactly the ones TP couples through a
    residual sum (two or more convs whose outputs are added: we keep residual streams fixed)
    or whose channels reach the graph output (the classifier's logits)."""
    model, inputs = models_zoo.ZOO[name]()
    ours = plan_of(name)
    tp_groups = _tp_groups(model, inputs)
    tp_sets = [mods for mods, _ in tp_groups]
    for g in ours.groups:
        mine = modules(s.target for s in g.slices()) | consumer_modules(g)
        assert mine in tp_sets, (g.name, sorted(mine))
    ours_sets = [modules(s.target for s in g.slices()) | consumer_modules(g) for g in ours.groups]
    head = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for mods, n_producers in tp_groups:
        if mods in ours_sets:
            continue
        residual = n_producers >= 2
        logits = mods <= head
        assert residual or logits, sorted(mods)
