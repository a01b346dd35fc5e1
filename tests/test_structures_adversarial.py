"""Hard cases from other tools' trackers: each yields the right groups or a blocked reason, never
a wrong group (docs/design.md, "Op rules": blocking, never guessing).

"Right" is checked numerically where a group is found: zeroing a set of structures in the
producers (rows + biases), in the consumers' input columns, or in both gives the same output
whenever the coupling is exact. A mis-grouped channel (wrong offsets, a missed consumer, a
channel read by an unlisted layer) breaks one of the two equalities.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from osscar_export.passes.structures import find_structures
from osscar_export.plan import StructureGroup, StructurePlan

torch.set_num_threads(1)


def zeroed(model: nn.Module, plan_group: StructureGroup, structures: list[int], where: str) -> nn.Module:
    """A copy of ``model`` with the given structures zeroed in producers and/or consumer inputs."""
    import copy

    m = copy.deepcopy(model)
    params = dict(m.named_parameters()) | dict(m.named_buffers())
    slices = []
    if where in ("producers", "both"):
        slices += list(plan_group.producers)
    if where in ("consumers", "both"):
        slices += [c.input for c in plan_group.consumers]
    with torch.no_grad():
        for s in slices:
            idx = s.indices(torch.tensor(structures))
            params[s.target].index_fill_(s.dim, idx, 0.0)
    return m


def assert_exact_coupling(model: nn.Module, inputs: tuple, group: StructureGroup, structures: list[int]) -> None:
    with torch.no_grad():
        prod = zeroed(model, group, structures, "producers")(*inputs)
        cons = zeroed(model, group, structures, "consumers")(*inputs)
        both = zeroed(model, group, structures, "both")(*inputs)
        dense = model(*inputs)
    torch.testing.assert_close(prod, both, atol=1e-5, rtol=1e-5)  # consumers never see these channels
    torch.testing.assert_close(cons, both, atol=1e-5, rtol=1e-5)  # nothing else reads them
    assert not torch.allclose(dense, both, atol=1e-4)  # and the structures did matter


def plan_for(model: nn.Module, *inputs: torch.Tensor) -> StructurePlan:
    torch.manual_seed(0)
    return find_structures(model.eval(), inputs)


def by_producer(plan: StructurePlan) -> dict[str, StructureGroup]:
    return {g.producers[0].target.rsplit(".", 1)[0]: g for g in plan.groups}


def blocked_text(plan: StructurePlan) -> str:
    return "\n".join(f"{w}: {r}" for w, r in plan.blocked)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ cat


class CatSelf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(torch.cat([y, y], dim=1))


def test_cat_of_a_tensor_with_itself():
    model = CatSelf()
    plan = plan_for(model, X)
    (g,) = plan.groups
    assert g.count == 6 and g.consumers[0].input.offsets == (0, 6) and g.consumers[0].full
    assert_exact_coupling(model, (X,), g, [1, 4])


class CatBranches(nn.Module):
    """DenseNet / YOLO-neck style: two branches concatenated, then read by one conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1))


def test_cat_of_two_branches():
    model = CatBranches()
    plan = plan_for(model, X)
    groups = by_producer(plan)
    assert set(groups) == {"a", "b"}
    assert groups["a"].consumers[0].input.offsets == (0,) and groups["b"].consumers[0].input.offsets == (4,)
    assert not groups["a"].consumers[0].full  # c's other rows belong to b: sliced, not re-fit alone
    assert_exact_coupling(model, (X,), groups["a"], [0, 3])
    # sigmoid(0) != 0: zeroing b's producers does not zero its channels, so check consumers only
    with torch.no_grad():
        cons = zeroed(model, groups["b"], [2], "consumers")(X)
        ref = model(X)
    assert not torch.allclose(cons, ref)


# ------------------------------------------------------------------------------------ split / chunk


class ChunkC2f(nn.Module):
    """C2f-style: one conv, chunked; one half read directly, the other by a conv and directly."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.m = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        a, b = torch.relu(self.stem(x)).chunk(2, dim=1)
        return self.out(torch.cat([a, b, torch.relu(self.m(b))], dim=1))


def test_chunk_feeding_several_consumers():
    model = ChunkC2f()
    plan = plan_for(model, X)
    stem = [g for g in plan.groups if g.producers[0].target == "stem.weight"]
    assert len(stem) == 2  # the two halves are independent groups
    first, second = sorted(stem, key=lambda g: g.producers[0].offsets)
    assert first.producers[0].offsets == (0,) and second.producers[0].offsets == (4,)
    assert {c.weight for c in second.consumers} == {"m.weight", "out.weight"}
    assert {c.weight for c in first.consumers} == {"out.weight"}
    for g in stem:
        assert_exact_coupling(model, (X,), g, [1, 2])
    (m_group,) = [g for g in plan.groups if g.producers[0].target == "m.weight"]
    assert m_group.consumers[0].input.offsets == (8,)


class FusedQKVHeadNorm(nn.Module):
    """Fused qkv split three ways; q/k normalised per head (fine) or across heads (blocks)."""

    def __init__(self, across_heads: bool):
        super().__init__()
        self.heads, self.dim = 4, 8
        self.qkv = nn.Linear(32, 96)
        self.norm = nn.LayerNorm(32 if across_heads else 8)
        self.across = across_heads
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(32, dim=-1)
        if self.across:
            q, k = self.norm(q), self.norm(k)
        q, k, v = (y.view(b, t, self.heads, self.dim).transpose(1, 2) for y in (q, k, v))
        if not self.across:
            q, k = self.norm(q), self.norm(k)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, t, 32))


def test_fused_qkv_split_with_per_head_norm_keeps_heads():
    model = FusedQKVHeadNorm(across_heads=False)
    x = torch.randn(2, 5, 32)
    plan = plan_for(model, x)
    (g,) = plan.groups
    assert g.kind == "head" and g.count == 4
    (qkv_w,) = [s for s in g.producers if s.target == "qkv.weight"]
    assert qkv_w.offsets == (0, 32, 64) and qkv_w.unit == 8
    assert_exact_coupling(model, (x,), g, [2])


def test_norm_across_heads_blocks_heads():
    plan = plan_for(FusedQKVHeadNorm(across_heads=True), torch.randn(2, 5, 32))
    assert not any(g.kind == "head" for g in plan.groups)
    assert "normalised over by layer_norm" in blocked_text(plan)


class UnbindQKV(nn.Module):
    """timm-style qkv: reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, 32))


def test_unbind_qkv_with_explicit_attention():
    model = UnbindQKV()
    x = torch.randn(2, 5, 32)
    plan = plan_for(model, x)
    (g,) = plan.groups
    assert g.kind == "head" and g.count == 4 and g.unit == 8
    assert [s.offsets for s in g.producers if s.target == "qkv.weight"] == [(0, 32, 64)]
    assert_exact_coupling(model, (x,), g, [0, 3])


# ------------------------------------------------------------------------------------ shuffles


class ChannelShuffle(nn.Module):
    def __init__(self, builtin: bool):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.shuffle = nn.ChannelShuffle(2) if builtin else None

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.shuffle is not None:
            y = self.shuffle(y)
        else:
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(y)


@pytest.mark.parametrize("builtin", [False, True])
def test_channel_shuffle_is_blocked(builtin):
    plan = plan_for(ChannelShuffle(builtin), X)
    assert plan.groups == []
    text = blocked_text(plan)
    assert ("product of two prunable widths" in text) if not builtin else ("channel_shuffle" in text)


def test_shufflenet_groups_stay_inside_branches():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    plan = find_structures(model, (torch.randn(1, 3, 64, 64),))
    assert len(plan.groups) > 0
    for g in plan.groups:
        producers = {s.target.rsplit(".", 2)[0] for s in g.producers}
        assert len(producers) == 1, (g.name, producers)  # one branch (or the stem) makes them
        # the branch outputs are concatenated and shuffled: never a group
        assert not any(re.search(r"branch1\.2\.|branch2\.5\.", s.target) for s in g.producers), g.name
    assert "does not follow the dim layout" in blocked_text(plan)


class PixelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.b = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.shuffle(self.a(x))))


def test_pixel_shuffle_groups_r_squared_rows():
    model = PixelShuffle()
    plan = plan_for(model, X)
    (g,) = plan.groups
    assert g.count == 4 and g.producers[0].unit == 4 and g.consumers[0].input.unit == 1
    assert_exact_coupling(model, (X,), g, [1, 2])
    assert "sub-pixel position of pixel_shuffle" in blocked_text(plan)


# ------------------------------------------------------------------------------------ unknown ops


@torch.library.custom_op("osscar_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1).clone()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class WithOp(nn.Module):
    """a -> op -> b -> relu -> c, where op is a custom op or an ATen op absent from the table."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 6, 1)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = mystery(y) if self.op == "custom" else torch.erfinv(torch.tanh(y) * 0.5)
        return self.c(torch.relu(self.b(y)))


@pytest.mark.parametrize(("op", "name"), [("custom", "osscar_test.mystery.default"), ("erfinv", "aten.erfinv.default")])
def test_op_missing_from_the_table_blocks_its_dims(op, name):
    model = WithOp(op)
    plan = plan_for(model, X)
    assert [g.producers[0].target for g in plan.groups] == ["b.weight"]  # b -> c is still found
    assert f"{name} is not in the op table" in blocked_text(plan)
    assert_exact_coupling(model, (X,), plan.groups[0], [0, 5])


# ------------------------------------------------------------------------------------ convs


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.g(torch.relu(self.a(x)))))


def test_grouped_conv_prunes_channels_alike_in_every_group():
    model = GroupedConv()
    plan = plan_for(model, X)
    groups = by_producer(plan)
    a, g = groups["a"], groups["g"]
    assert a.count == 4 and a.producers[0].offsets == (0, 4)  # local channel i of both groups
    assert a.consumers[0].weight == "g.weight" and not a.consumers[0].full
    assert g.count == 4 and g.consumers[0].input.offsets == (0, 4)
    assert "channel groups of a grouped convolution" in blocked_text(plan)
    assert_exact_coupling(model, (X,), a, [1])
    assert_exact_coupling(model, (X,), g, [0, 3])


class OneChannel(nn.Module):
    """A conv with one output channel feeding a conv with one input channel: not depthwise."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 1, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_single_channel_conv_is_not_depthwise():
    model = OneChannel()
    plan = plan_for(model, X)
    assert [(g.producers[0].target, g.count) for g in plan.groups] == [("b.weight", 6)]
    assert all(s.node not in {c.node for g in plan.groups for c in g.consumers} for g in plan.groups for s in g.shape_args)
    assert "a single structure" in blocked_text(plan)


class TransposeAfterView(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8 * 4 * 4)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c = nn.Conv2d(4, 3, 1)

    def forward(self, z):
        return self.c(torch.relu(self.up(self.fc(z).view(-1, 8, 4, 4))))


def test_conv_transpose_after_view():
    model = TransposeAfterView()
    z = torch.randn(2, 16)
    plan = plan_for(model, z)
    # fc's rows viewed as (8 channels x 16 pixels) feed a transposed conv: not re-fit, blocked
    assert "transposed convolution" in blocked_text(plan)
    (g,) = plan.groups  # the transposed conv's own output channels are a normal group
    assert g.producers[0].target == "up.weight" and g.producers[0].dim == 1
    assert_exact_coupling(model, (z,), g, [1, 2])


class LayerScaleBlock(nn.Module):
    """ConvNeXt-style: x + gamma * mlp(x), plus a class token and position embedding."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.pos = nn.Parameter(torch.randn(1, 5, 16))
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.gamma = nn.Parameter(torch.rand(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.gamma * self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


def test_layer_scale_cls_token_and_position_embedding_stay_on_the_fixed_stream():
    model = LayerScaleBlock()
    x = torch.randn(2, 4, 16)
    plan = plan_for(model, x)
    (g,) = plan.groups
    assert g.producers[0].target == "fc1.weight" and g.count == 32
    assert "gamma" not in {s.target for s in g.slices()}
    # the stream (class token, position embedding, gamma, fc2's rows) starts at the input
    assert "cls[dim 2] (+6 tensors): x: reaches a graph input" in blocked_text(plan)
    assert_exact_coupling(model, (x,), g, [3, 7, 30])


# ------------------------------------------------------------------------------------ attention


def _llama(heads: int, kv_heads: int):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=1, hidden_size=heads * 16, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, head_dim=16, intermediate_size=32, vocab_size=64)
    model = T.LlamaModel(cfg).eval()

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, use_cache=False).last_hidden_state

    return Hidden().eval(), (torch.randint(0, 64, (1, 6)),)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (6, 2)])
def test_gqa_with_two_or_three_query_heads_per_kv_head(heads, kv_heads):
    model, inputs = _llama(heads, kv_heads)
    plan = find_structures(model, inputs)
    (kv,) = [g for g in plan.groups if g.kind == "kv_group"]
    n_rep = heads // kv_heads
    assert kv.count == kv_heads and kv.unit == n_rep * 16
    units = {s.target.rsplit(".", 2)[-2]: s.unit for s in kv.producers}
    assert units == {"q_proj": n_rep * 16, "k_proj": 16, "v_proj": 16}
    assert_exact_coupling(model, inputs, kv, [1])


def test_mqa_query_heads_are_pruned_alone():
    """One KV head shared by 4 query heads: the query heads are a group of their own (q_proj rows
    and o_proj columns, head_dim each); the shared key and value are never touched."""
    model, inputs = _llama(4, 1)
    plan = find_structures(model, inputs)
    (q,) = [g for g in plan.groups if g.kind != "neuron"]
    assert q.kind == "query_head" and q.count == 4 and q.unit == 16
    assert {s.target.rsplit(".", 2)[-2]: s.unit for s in q.producers} == {"q_proj": 16}
    assert [c.weight.rsplit(".", 2)[-2] for c in q.consumers] == ["o_proj"]
    assert not any("k_proj" in s.target or "v_proj" in s.target for s in q.slices())
    assert "query heads sharing" not in blocked_text(plan)
    # A query head with zero queries still averages the shared values, so only its o_proj
    # columns remove it: zeroing them equals zeroing everything the group owns.
    with torch.no_grad():
        cons, both, dense = (zeroed(model, q, [1], "consumers")(*inputs), zeroed(model, q, [1], "both")(*inputs),
                             model(*inputs))
    torch.testing.assert_close(cons, both, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, both, atol=1e-4)


class SdpaGQA(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 48)
        self.k = nn.Linear(32, 16)
        self.v = nn.Linear(32, 16)
        self.o = nn.Linear(48, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 6, 8).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 8).transpose(1, 2)
        v = self.v(x).view(b, t, 2, 8).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(b, t, 48))


def test_sdpa_enable_gqa():
    model = SdpaGQA()
    x = torch.randn(2, 5, 32)
    plan = plan_for(model, x)
    (g,) = plan.groups
    assert g.kind == "kv_group" and g.count == 2 and g.unit == 24
    assert {s.target: s.unit for s in g.producers if s.target.endswith("weight")} == {"q.weight": 24, "k.weight": 8, "v.weight": 8}
    # views (b, t, 2, 8) for k and v, (b, t, 6, 8) for q (3 query heads per KV head), and the
    # final reshape (b, t, 48): 24 columns per KV group
    assert sorted((s.unit, s.index) for s in g.shape_args) == [(1, 2), (1, 2), (3, 2), (24, 2)]
    assert_exact_coupling(model, (x,), g, [0])
