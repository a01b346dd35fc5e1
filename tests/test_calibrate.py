"""Calibrate: Gram matrices match hand computations; sequential stages see the pruned model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from osscar_export.errors import CalibrationDataError, PlanError
from osscar_export.passes.base import PruneState
from osscar_export.passes.calibrate import BLOCK, Calibrate, SequentialCalibrator, blocked_groups, calibrate, check_batches
from osscar_export.plan import Consumer, ShapeArg, Slice, StructureGroup, StructurePlan


def consumer_node(ep: torch.export.ExportedProgram, weight: str) -> str:
    """FX node name of the op that reads parameter ``weight``."""
    placeholder = {v: k for k, v in ep.graph_signature.inputs_to_parameters.items()}[weight]
    return next(n.name for n in ep.graph.nodes if n.op == "call_function" and any(getattr(a, "name", None) == placeholder for a in n.args))


def channel_group(ep, name: str, producer: str, consumer: str, count: int, op: str = "linear", area: int = 1, extra=()) -> StructureGroup:
    """A group of ``count`` unit channels: ``producer`` rows (+ bias) feed ``consumer`` (+ ``extra``) input columns."""
    consumers = tuple(
        Consumer(consumer_node(ep, f"{c}.weight"), o, f"{c}.weight", Slice(f"{c}.weight", 1), a)
        for c, o, a in ((consumer, op, area), *extra)
    )
    return StructureGroup(
        name, "channel", count, area, consumers,
        producers=(Slice(f"{producer}.weight", 0), Slice(f"{producer}.bias", 0)),
    )


class MLP3(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 7), nn.Linear(7, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp3_plan(batch_shape=(5, 3, 6)) -> tuple[MLP3, StructurePlan]:
    torch.manual_seed(0)
    model = MLP3().eval()
    example = (torch.randn(*batch_shape),)
    ep = torch.export.export(model, example, strict=False)
    groups = [channel_group(ep, "fc1.neuron", "fc1", "fc2", 8), channel_group(ep, "fc2.neuron", "fc2", "fc3", 7)]
    return model, StructurePlan(ep, example, groups)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1, dilation=2)
        self.conv3 = nn.Conv2d(5, 4, (2, 3), padding="same")
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(self.dw(torch.relu(self.conv3(h))))


def conv_plan(depthwise_consumer: bool = False) -> tuple[ConvNet, StructurePlan]:
    """conv3's channels pass the depthwise conv (a follower) to the 1x1 head (the consumer).

    ``depthwise_consumer`` instead names the depthwise conv as the consumer, which calibrate must block.
    """
    torch.manual_seed(0)
    model = ConvNet().eval()
    example = (torch.randn(2, 3, 11, 9),)
    ep = torch.export.export(model, example, strict=False)
    if depthwise_consumer:
        last = channel_group(ep, "conv3.channel", "conv3", "dw", 4, op="conv2d", area=9)
    else:
        last = channel_group(ep, "conv3.channel", "conv3", "head", 4, op="conv2d", area=1)
        groups_arg = ShapeArg(consumer_node(ep, "dw.weight"), 6, None, 1)
        last = dataclasses.replace(last, followers=(Slice("dw.weight", 0), Slice("dw.bias", 0)), shape_args=(groups_arg,))
    groups = [
        channel_group(ep, "conv1.channel", "conv1", "conv2", 6, op="conv2d", area=9),
        channel_group(ep, "conv2.channel", "conv2", "conv3", 5, op="conv2d", area=6),
        last,
    ]
    return model, StructurePlan(ep, example, groups)


@pytest.mark.parametrize("n_batches", [3, 2 * BLOCK + 3])
def test_linear_gram_is_xtx_over_all_tokens(n_batches: int):
    """Streaming accumulation (float32 blocks of BLOCK batches added into float64) gives the Gram
    of all rows at once, also across several blocks and a partial last one."""
    model, plan = mlp3_plan()
    batches = [torch.randn(5, 3, 6) for _ in range(n_batches)]
    result = Calibrate(progress=False)(PruneState(plan=plan, batches=batches))
    assert not result.changed  # calibrate analyses, it never alters the model
    grams = result.state.grams
    x1 = torch.cat([torch.relu(model.fc1(b)).reshape(-1, 8) for b in batches]).double()
    x2 = torch.cat([torch.relu(model.fc2(torch.relu(model.fc1(b)))).reshape(-1, 7) for b in batches]).double()
    torch.testing.assert_close(grams.xtx["fc2.weight"], x1.T @ x1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grams.xtx["fc3.weight"], x2.T @ x2, rtol=1e-5, atol=1e-5)
    assert grams.rows == {"fc2.weight": 15 * n_batches, "fc3.weight": 15 * n_batches}
    torch.testing.assert_close(grams.xsum["fc2.weight"], x1.sum(0), rtol=1e-5, atol=1e-5)  # the intercept's column sums
    torch.testing.assert_close(grams.xsum["fc3.weight"], x2.sum(0), rtol=1e-5, atol=1e-5)
    assert grams.xtx["fc2.weight"].dtype == torch.float64


def test_conv_gram_rows_reproduce_the_conv_with_its_stride_padding_dilation():
    model, plan = conv_plan()
    batches = [torch.randn(2, 3, 11, 9) for _ in range(2)]
    grams = calibrate(plan, batches, progress=False)
    inputs = {
        "conv2": lambda b: torch.relu(model.conv1(b)),
        "conv3": lambda b: torch.relu(model.conv2(torch.relu(model.conv1(b)))),
    }
    for name, prev in inputs.items():
        conv = getattr(model, name)
        xs = []
        for b in batches:
            x = prev(b)
            # independent of the implementation: X such that conv(x) == X @ W_input_major + bias
            if conv.padding == "same":  # kernel (2, 3): total (1, 2) -> top 0, bottom 1, left 1, right 1
                x_padded, pad = F.pad(x, (1, 1, 0, 1)), (0, 0)
            else:
                x_padded, pad = x, conv.padding
            cols = F.unfold(x_padded, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)
            X = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            y = conv(x)
            out = (X @ conv.weight.flatten(1).T + conv.bias).reshape(x.shape[0], -1, y.shape[1])
            torch.testing.assert_close(out.transpose(1, 2).reshape(y.shape), y, rtol=1e-4, atol=1e-5)
            xs.append(X)
        X = torch.cat(xs).double()
        torch.testing.assert_close(grams.xtx[f"{name}.weight"], X.T @ X, rtol=1e-5, atol=1e-4)


def test_depthwise_consumer_is_blocked_with_a_reason():
    model, plan = conv_plan(depthwise_consumer=True)
    blocked = dict(blocked_groups(plan, plan.program.module()))
    assert set(blocked) == {"conv3.channel"}
    assert "grouped conv" in blocked["conv3.channel"]
    grams = calibrate(plan, [torch.randn(2, 3, 11, 9)], progress=False)
    assert "dw.weight" not in grams.xtx and grams.blocked == list(blocked.items())


def test_sequential_stage_sees_weights_written_by_earlier_stages():
    model, plan = mlp3_plan()
    batches = [(torch.randn(5, 3, 6),) for _ in range(2)]
    gm = plan.program.module()
    cal = SequentialCalibrator(plan, gm, batches)
    g1, g2 = cal.order(plan.groups)
    assert (g1.name, g2.name) == ("fc1.neuron", "fc2.neuron")
    first = cal.stage(g1)
    x1 = torch.cat([torch.relu(model.fc1(b[0])).reshape(-1, 8) for b in batches]).double()
    torch.testing.assert_close(first.xtx["fc2.weight"], x1.T @ x1, rtol=1e-5, atol=1e-5)
    new_w2 = torch.randn(7, 8)
    new_w2[:, [1, 4, 5]] = 0
    with torch.no_grad():
        gm.get_parameter("fc2.weight").copy_(new_w2)
    second = cal.stage(g2)
    x2 = torch.cat([torch.relu(F.linear(torch.relu(model.fc1(b[0])), new_w2, model.fc2.bias)).reshape(-1, 7) for b in batches]).double()
    torch.testing.assert_close(second.xtx["fc3.weight"], x2.T @ x2, rtol=1e-5, atol=1e-5)
    assert set(second.xtx) == {"fc3.weight"}
    with pytest.raises(PlanError, match="in order"):
        cal.stage(g1)


@pytest.mark.parametrize(
    "batches, match",
    [
        ([], "empty"),
        ([torch.full((5, 3, 6), float("nan"))], "NaN"),
        ([torch.randn(5, 4, 6)], r"shape \(5, 4, 6\)"),
        ([torch.randn(5, 3, 6).double()], "dtype"),
        ([(torch.randn(5, 3, 6), torch.randn(1))], "2 inputs"),
        (["text"], "str"),
    ],
)
def test_bad_calibration_data_is_rejected(batches, match):
    _, plan = mlp3_plan()
    with pytest.raises(CalibrationDataError, match=match):
        check_batches(plan, batches)


def test_dynamic_batch_dim_accepts_other_sizes():
    torch.manual_seed(0)
    model = MLP3().eval()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (torch.randn(4, 6),), dynamic_shapes=({0: batch},), strict=False)
    plan = StructurePlan(ep, (torch.randn(4, 6),), [channel_group(ep, "fc1.neuron", "fc1", "fc2", 8)])
    xs = [torch.randn(3, 6), torch.randn(9, 6)]
    grams = calibrate(plan, xs, progress=False)
    x1 = torch.relu(model.fc1(torch.cat(xs))).double()
    torch.testing.assert_close(grams.xtx["fc2.weight"], x1.T @ x1, rtol=1e-5, atol=1e-5)
    with pytest.raises(CalibrationDataError, match=r"\(\*, 6\)"):
        check_batches(plan, [torch.randn(3, 5)])


class TinyEncoder(nn.Module):
    """Embedding + one masked mixing step + MLP: an encoder whose padded positions have real
    (non-zero, input-dependent) activations, like a BERT at its [PAD] tokens."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        keys = attention_mask.unsqueeze(-1).to(h.dtype)
        h = h + (h * keys).sum(1, keepdim=True) / keys.sum(1, keepdim=True)  # pads attend to tokens only
        return self.fc2(torch.relu(self.fc1(h)))


def encoder_plan() -> tuple[TinyEncoder, StructurePlan]:
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    example = (torch.randint(0, 11, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    ep = torch.export.export(model, example, strict=False)
    return model, StructurePlan(ep, example, [channel_group(ep, "fc1.neuron", "fc1", "fc2", 8)])


def padded_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for lengths in ((5, 2), (3, 1)):
        ids = torch.randint(1, 11, (2, 5), generator=gen)
        mask = (torch.arange(5) < torch.tensor(lengths)[:, None]).long()
        out.append((ids * mask, mask))  # pad id 0
    return out


def test_padded_positions_are_not_calibration_rows_in_either_mode():
    model, plan = encoder_plan()
    batches = padded_batches()
    real = []
    for ids, mask in batches:
        h = model.emb(ids)
        keys = mask.unsqueeze(-1).float()
        x = torch.relu(model.fc1(h + (h * keys).sum(1, keepdim=True) / keys.sum(1, keepdim=True)))
        real.append(x[mask.bool()])
    x = torch.cat(real).double().detach()
    dense = calibrate(plan, batches, progress=False)
    torch.testing.assert_close(dense.xtx["fc2.weight"], x.T @ x, rtol=1e-5, atol=1e-5)
    assert dense.rows == {"fc2.weight": 5 + 2 + 3 + 1}
    sequential = SequentialCalibrator(plan, plan.program.module(), batches)
    staged = sequential.stage(plan.groups[0])
    torch.testing.assert_close(staged.xtx["fc2.weight"], x.T @ x, rtol=1e-5, atol=1e-5)
    # what sits at the padded positions cannot change the Grams
    noisy = [(torch.where(m.bool(), ids, torch.randint(1, 11, ids.shape)), m) for ids, m in batches]
    torch.testing.assert_close(calibrate(plan, noisy, progress=False).xtx["fc2.weight"], x.T @ x, rtol=1e-5, atol=1e-5)


def test_a_float_attention_mask_is_not_read_as_padding():
    """An additive float mask is not the 0/1 convention: every row stays a calibration row."""
    ids, mask = padded_batches()[0]
    model = TinyEncoder().eval()
    ep = torch.export.export(model, (ids, mask.float()), strict=False)
    plan = StructurePlan(ep, (ids, mask.float()), [channel_group(ep, "fc1.neuron", "fc1", "fc2", 8)])
    grams = calibrate(plan, [(ids, mask.float())], progress=False)
    assert grams.rows == {"fc2.weight": ids.numel()}


class InPlaceNet(nn.Module):
    """In-place ops as torchvision writes them, at the places that can go wrong.

    The input is scaled in place (a caller's batch must not change), and ``y`` is read by fc3,
    then written by ``add_`` before fc4 reads it: ``y`` is live where the fc2.neuron stage saves
    its state (before fc3), so a stage resuming from a state that shares ``y`` with the forward
    that ran on would see the write twice.
    """

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 7)
        self.fc3, self.fc4, self.fc5 = nn.Linear(7, 5), nn.Linear(7, 5), nn.Linear(5, 4)

    def forward(self, x):
        y = self.fc2(torch.relu_(self.fc1(x.mul_(2.0))))
        a = self.fc3(y)
        y.add_(1.0)
        return self.fc5((a + self.fc4(y)).relu_())


def test_in_place_graph_calibrates_like_eager_in_both_modes():
    torch.manual_seed(0)
    model = InPlaceNet().eval()
    example = (torch.randn(5, 6),)
    ep = torch.export.export(copy.deepcopy(model), tuple(x.clone() for x in example), strict=False)
    plan = StructurePlan(ep, example, [
        channel_group(ep, "fc1.neuron", "fc1", "fc2", 8),
        channel_group(ep, "fc2.neuron", "fc2", "fc3", 7, extra=(("fc4", "linear", 1),)),
        channel_group(ep, "fc3.neuron", "fc3", "fc5", 5),
    ])
    batches = [(torch.randn(5, 6),) for _ in range(2)]
    kept = [b[0].clone() for b in batches]

    def eager_grams(reference: nn.Module) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {}
        hooks = [getattr(reference, n).register_forward_pre_hook(lambda m, a, n=n: rows.setdefault(n, []).append(a[0].clone()))
                 for n in ("fc2", "fc3", "fc4", "fc5")]
        with torch.no_grad():
            for x in kept:
                reference(x.clone())
        for h in hooks:
            h.remove()
        return {f"{n}.weight": (torch.cat(r).double().T @ torch.cat(r).double()) for n, r in rows.items()}

    dense = calibrate(plan, batches, progress=False).xtx
    for fqn, gram in eager_grams(model).items():
        torch.testing.assert_close(dense[fqn], gram, rtol=1e-5, atol=1e-5)

    gm = plan.program.module()
    cal = SequentialCalibrator(plan, gm, batches)
    reference = copy.deepcopy(model)
    staged = {}
    for group, written in zip(cal.order(plan.groups), ("fc2.weight", "fc3.weight", None)):
        staged.update(cal.stage(group).xtx)
        if written:  # what Solve does between stages: re-fitted weights written into gm in place
            new = torch.randn_like(gm.get_parameter(written))
            with torch.no_grad():
                gm.get_parameter(written).copy_(new)
                reference.get_parameter(written).copy_(new)
    expected = eager_grams(reference)
    for fqn in ("fc3.weight", "fc4.weight", "fc5.weight"):
        torch.testing.assert_close(staged[fqn], expected[fqn], rtol=1e-5, atol=1e-5)
    for b, k in zip(batches, kept):
        assert torch.equal(b[0], k)
