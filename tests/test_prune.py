"""The prune pipeline: stacking, losses, sequential propagation, every method end to end."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from osscar_export import solver
from osscar_export.errors import CalibrationDataError, PlanError
from osscar_export.passes.base import PruneState, run_passes
from osscar_export.passes.calibrate import Calibrate, calibrate
from osscar_export.passes.materialize import Materialize, apply_masks
from osscar_export.passes.solve import Solve, layer_problem
from osscar_export.plan import Slice, StructurePlan
from osscar_export.prune import error_curves, prune, resolve_widths
from osscar_export.solver import METHODS
from test_calibrate import channel_group, conv_plan, mlp3_plan

SOLVER_METHODS = [m for m in METHODS if m != "exact"]


class SharedChannels(nn.Module):
    """conv1's channels are read by a 3x3 conv (d=9) and, after pooling, by a Linear (d=1): SE-like."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.conv2(h).mean((2, 3)) + self.fc(h.mean((2, 3)))


def shared_plan() -> tuple[SharedChannels, StructurePlan]:
    torch.manual_seed(0)
    model = SharedChannels().eval()
    example = (torch.randn(2, 3, 5, 5),)
    ep = torch.export.export(model, example, strict=False)
    group = channel_group(ep, "conv1.channel", "conv1", "conv2", 6, op="conv2d", area=9, extra=[("fc", "linear", 1)])
    return model, StructurePlan(ep, example, [group])


def optimum_increase(h: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> float:
    """min over W supported on ``rows`` of ½ tr((W−Ŵ)ᵀ H (W−Ŵ)) = ½tr(ŴᵀHŴ) − ½tr(G_Rᵀ H_RR⁻¹ G_R)."""
    g = h @ w
    gr = g[rows]
    return float(0.5 * (w * g).sum() - 0.5 * (gr * torch.linalg.solve(h[rows][:, rows], gr)).sum())


def consumer_increase(model: SharedChannels, grams, support: list[int]) -> float:
    """The two consumers' layer problems solved separately, each with its own damping, summed."""
    total = 0.0
    for fqn, w, area in (("conv2.weight", model.conv2.weight.detach().flatten(1).T, 9), ("fc.weight", model.fc.weight.detach().T, 1)):
        h = grams.xtx[fqn]
        h = h + 0.01 * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
        rows = torch.tensor([c * area + a for c in support for a in range(area)])
        total += optimum_increase(h, w.double(), rows)
    return total


def test_stacked_problem_is_the_sum_of_its_consumers():
    model, plan = shared_plan()
    grams = calibrate(plan, [torch.randn(2, 3, 5, 5) for _ in range(3)], progress=False)
    problem = layer_problem(plan.groups[0], grams, plan.program.state_dict.__getitem__, damp=0.01, intercept=False)
    assert problem.d == 10 and problem.H.shape == (60, 60) and problem.W.shape == (60, 10)
    split = problem.split(problem.W)
    torch.testing.assert_close(split["conv2.weight"], model.conv2.weight.flatten(1).T.double())
    torch.testing.assert_close(split["fc.weight"], model.fc.weight.T.double())
    for support in ([0, 2, 3], [1, 4], [5], [0, 1, 2, 3, 4]):
        rows = torch.tensor([i * problem.d + r for i in support for r in range(problem.d)])
        assert optimum_increase(problem.H, problem.W, rows) == pytest.approx(consumer_increase(model, grams, support), rel=1e-9, abs=1e-9)


def test_exact_method_on_a_shared_group_finds_the_best_joint_support():
    model, plan = shared_plan()
    batches = [torch.randn(2, 3, 5, 5) for _ in range(3)]
    grams = calibrate(plan, batches, progress=False)
    result = prune(model, batches, widths={"conv1.channel": 3}, method="exact", mode="dense", plan=plan, progress=False,
                   intercept=False)
    best = min(itertools.combinations(range(6), 3), key=lambda s: consumer_increase(model, grams, list(s)))
    assert result.masks["conv1.channel"].nonzero().reshape(-1).tolist() == list(best)
    assert sum(result.layer_losses.values()) == pytest.approx(consumer_increase(model, grams, list(best)), rel=1e-7)
    # each consumer's re-fit is its own least-squares solution on the shared support
    for fqn, area in (("conv2.weight", 9), ("fc.weight", 1)):
        h = grams.xtx[fqn] + 0.01 * grams.xtx[fqn].diagonal().mean() * torch.eye(len(grams.xtx[fqn]), dtype=torch.float64)
        w = (model.conv2.weight.flatten(1).T if area == 9 else model.fc.weight.T).double()
        rows = torch.tensor([c * area + a for c in best for a in range(area)])
        want = torch.zeros_like(w)
        want[rows] = torch.linalg.solve(h[rows][:, rows], (h @ w)[rows])
        got = result.weights[fqn].flatten(1).T.double() if area == 9 else result.weights[fqn].T.double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pipeline_loss_and_support_equal_the_solver_on_the_same_gram():
    model, plan = mlp3_plan()
    batches = [torch.randn(5, 3, 6) for _ in range(4)]
    result = prune(model, batches, widths={"fc1.neuron": 3}, method="osscar", mode="dense", plan=plan, progress=False,
                   intercept=False)
    x = torch.cat([torch.relu(model.fc1(b)).reshape(-1, 8) for b in batches]).double()
    ref = solver.prune_layer(x.T @ x, model.fc2.weight.T.double(), group_size=1, width=3, method="osscar", damp=0.01)
    assert torch.equal(result.masks["fc1.neuron"], torch.as_tensor(ref.mask))
    assert result.layer_losses["fc2.weight"] == pytest.approx(float(ref.loss), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(result.weights["fc2.weight"].T.double(), torch.as_tensor(ref.weight, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert set(result.layer_losses) == {"fc2.weight"}  # the whole fc2.neuron group was kept: no re-fit


def test_sequential_mode_feeds_later_consumers_the_pruned_model():
    model, plan = mlp3_plan()
    batches = [torch.randn(5, 3, 6) for _ in range(4)]
    counts = {"fc1.neuron": 4, "fc2.neuron": 3}
    result = prune(model, batches, widths=counts, method="greedy", mode="sequential", plan=plan, progress=False,
                   intercept=False)
    x1 = torch.cat([torch.relu(model.fc1(b)).reshape(-1, 8) for b in batches]).double()
    first = solver.prune_layer(x1.T @ x1, model.fc2.weight.T.double(), group_size=1, width=4, method="greedy", damp=0.01)
    w2 = torch.as_tensor(first.weight).T.float()
    x2 = torch.cat([torch.relu(F.linear(torch.relu(model.fc1(b)), w2, model.fc2.bias)).reshape(-1, 7) for b in batches]).double()
    second = solver.prune_layer(x2.T @ x2, model.fc3.weight.T.double(), group_size=1, width=3, method="greedy", damp=0.01)
    assert torch.equal(result.masks["fc2.neuron"], torch.as_tensor(second.mask))
    assert result.layer_losses["fc3.weight"] == pytest.approx(float(second.loss), rel=1e-5, abs=1e-9)
    torch.testing.assert_close(result.weights["fc3.weight"].T.double(), torch.as_tensor(second.weight, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    dense = prune(model, batches, widths=counts, method="greedy", mode="dense", plan=plan, progress=False, intercept=False)
    x2_dense = torch.cat([torch.relu(model.fc2(torch.relu(model.fc1(b)))).reshape(-1, 7) for b in batches]).double()
    ref_dense = solver.prune_layer(x2_dense.T @ x2_dense, model.fc3.weight.T.double(), group_size=1, width=3, method="greedy", damp=0.01)
    assert dense.layer_losses["fc3.weight"] == pytest.approx(float(ref_dense.loss), rel=1e-5, abs=1e-9)
    # dense mode given calibrate's Grams of the same batches decides the same
    given = prune(model, batches, widths=counts, method="greedy", mode="dense", plan=plan, progress=False,
                  grams=calibrate(plan, batches, progress=False), intercept=False)
    assert all(torch.equal(given.masks[g], dense.masks[g]) for g in dense.masks)
    assert given.layer_losses == pytest.approx(dense.layer_losses, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_materializes_to_the_masked_refit_model(method):
    model, plan = conv_plan()
    batches = [torch.randn(2, 3, 11, 9) for _ in range(2)]
    result = prune(model, batches, keep_fraction=0.5, method=method, plan=plan, progress=False)
    assert [int(result.masks[g].sum()) for g in ("conv1.channel", "conv2.channel", "conv3.channel")] == [3, 2, 2]
    assert set(result.weights) == {"conv2.weight", "conv3.weight", "head.weight"}
    for fqn, mask in (("conv2.weight", "conv1.channel"), ("conv3.weight", "conv2.channel"), ("head.weight", "conv3.channel")):
        assert result.weights[fqn][:, ~result.masks[mask]].abs().sum() == 0
    assert result.model.get_parameter("conv2.weight").shape == (2, 3, 3, 3)
    assert result.model.get_parameter("dw.weight").shape == (2, 1, 3, 3)
    masked = apply_masks(model, plan, result.masks, result.weights, result.shifts)
    x = torch.randn(2, 3, 11, 9)
    torch.testing.assert_close(result.model(x), masked(x), rtol=1e-4, atol=1e-5)


def test_keep_fraction_by_kind_name_and_widths():
    _, plan = mlp3_plan()
    assert resolve_widths(plan, 0.3, None) == {"fc1.neuron": 2, "fc2.neuron": 2}
    assert resolve_widths(plan, None, None) == {"fc1.neuron": 4, "fc2.neuron": 4}
    assert resolve_widths(plan, {"channel": 0.5, "fc2.neuron": 0.01}, None) == {"fc1.neuron": 4, "fc2.neuron": 1}
    assert resolve_widths(plan, {"fc2.neuron": 0.75}, None) == {"fc1.neuron": 8, "fc2.neuron": 5}
    assert resolve_widths(plan, None, {"fc1.neuron": 6}) == {"fc1.neuron": 6, "fc2.neuron": 7}
    for bad in ({"head": 0.5}, {"fc1.neuron": 0.0}, 1.5):
        with pytest.raises(PlanError):
            resolve_widths(plan, bad, None)
    for bad in ({"nope": 2}, {"fc1.neuron": 0}, {"fc1.neuron": 9}):
        with pytest.raises(PlanError):
            resolve_widths(plan, None, bad)
    with pytest.raises(PlanError, match="not both"):
        resolve_widths(plan, 0.5, {"fc1.neuron": 2})


def test_blocked_groups_are_kept_whole_and_cannot_be_named():
    model, plan = conv_plan()
    last = plan.groups[2]
    plan.groups[2] = dataclasses.replace(last, consumers=tuple(dataclasses.replace(c, full=False) for c in last.consumers))
    x = [torch.randn(2, 3, 11, 9)]
    with pytest.raises(PlanError, match="no consumer owns"):
        prune(model, x, widths={"conv3.channel": 2}, plan=plan, progress=False)
    result = prune(model, x, keep_fraction=0.5, method="mp", plan=plan, progress=False)
    assert [name for name, _ in result.blocked] == ["conv3.channel"]
    assert bool(result.masks["conv3.channel"].all()) and "head.weight" not in result.weights


@pytest.mark.parametrize("calibration, match", [([], "empty"), (torch.randn(5, 3, 6), "iterable"), ([torch.randn(5, 3, 7)], "shape")])
def test_prune_rejects_bad_calibration(calibration, match):
    model, plan = mlp3_plan()
    with pytest.raises(CalibrationDataError, match=match):
        prune(model, calibration, plan=plan, progress=False)


def test_error_curves_are_cached_and_resume(tmp_path, monkeypatch):
    model, plan = mlp3_plan()
    batches = [torch.randn(5, 3, 6) for _ in range(3)]
    grams = calibrate(plan, batches, progress=False)
    levels = 4  # fractions 1/4 … 1 (widths.width_grid), as the pipeline passes --levels
    curves = error_curves(plan, grams, levels, cache_dir=tmp_path, progress=False)
    assert {name: widths.tolist() for name, (widths, _) in curves.items()} == {"fc1.neuron": [2, 4, 6, 8], "fc2.neuron": [2, 4, 5, 7]}
    for widths, losses in curves.values():
        assert np.all(np.diff(losses) <= 1e-9) and losses[-1] == pytest.approx(0.0, abs=1e-9)
    x = torch.cat([torch.relu(model.fc1(b)).reshape(-1, 8) for b in batches]).double()
    direct = solver.error_curve(x.T @ x, model.fc2.weight.T.double(), group_size=1, levels=[2, 4, 6, 8], damp=0.01)
    np.testing.assert_allclose(curves["fc1.neuron"][1], direct.losses.numpy(), rtol=1e-6, atol=1e-9)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    monkeypatch.setattr(solver, "error_curve", lambda *a, **k: pytest.fail("a cached curve was recomputed"))
    again = error_curves(plan, grams, levels, cache_dir=tmp_path, progress=False)
    for name, (widths, losses) in curves.items():
        np.testing.assert_array_equal(again[name][0], widths)
        np.testing.assert_array_equal(again[name][1], losses)


@pytest.mark.parametrize("build", ["llama_gqa", "bert"])
def test_prune_without_a_plan_finds_structures_and_matches_the_masked_model(build):
    from models_zoo import VOCAB, ZOO

    model, example = ZOO[build]()
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, VOCAB, example[0].shape, generator=gen) for _ in range(3)]
    result = prune(model, calibration, keep_fraction=0.5, progress=False)
    assert {g.kind for g in result.plan.groups} >= {"neuron"}
    for g in result.plan.groups:
        assert int(result.masks[g.name].sum()) == max(1, round(0.5 * g.count))
    assert set(result.layer_losses) == {c.weight for g in result.plan.groups for c in g.consumers if c.full}
    masked = apply_masks(model, result.plan, result.masks, result.weights, result.shifts)
    with torch.no_grad():
        torch.testing.assert_close(result.model(*example), masked(*example), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["dense", "sequential"])
def test_the_passes_prune_does_only_materialize_changes_the_model(mode):
    model, plan = mlp3_plan()
    batches = [(torch.randn(5, 3, 6),) for _ in range(3)]
    widths = {"fc1.neuron": 4, "fc2.neuron": 3}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = PruneState(model=model, example_inputs=plan.example_inputs, program=plan.program, plan=plan, batches=batches)
    calibrated = Calibrate(progress=False)(state)
    solve = Solve("greedy", mode, widths, progress=False)
    solved = solve(calibrated.state)
    assert not calibrated.changed and not solved.changed
    assert solved.state.model is model and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {g: int(m.sum()) for g, m in solved.state.masks.items()} == widths
    assert set(solved.state.weights) == set(solved.state.losses) == {"fc2.weight", "fc3.weight"}
    done = Materialize()(solved.state)
    assert done.changed and done.state.model.fc2.weight.shape == (3, 4)
    result = prune(model, batches, widths=widths, method="greedy", mode=mode, plan=plan, progress=False)
    chained = run_passes([Calibrate(progress=False), Solve("greedy", mode, widths, progress=False), Materialize()], state)
    assert chained.changed
    for g, mask in result.masks.items():
        assert torch.equal(chained.state.masks[g], mask)
    for fqn, w in result.weights.items():
        assert torch.equal(chained.state.weights[fqn], w)


def test_solve_refuses_a_width_for_a_group_it_cannot_serve():
    model, plan = conv_plan()
    last = plan.groups[2]
    plan.groups[2] = dataclasses.replace(last, consumers=tuple(dataclasses.replace(c, full=False) for c in last.consumers))
    state = PruneState(model=model, plan=plan, program=plan.program, batches=[(torch.randn(2, 3, 11, 9),)])
    with pytest.raises(PlanError, match="conv3.channel.*cannot be pruned"):
        Solve("mp", "sequential", {"conv3.channel": 2}, progress=False)(state)
    with pytest.raises(PlanError, match="outside 1..6"):
        Solve("mp", "sequential", {"conv1.channel": 7}, progress=False)(state)


def test_a_consumer_slice_with_several_offsets_is_one_structure_per_offset_set():
    """RegNet's grouped convs make structures that own one channel in every conv group: the
    consumer slice has offsets (0, 4), so a structure owns group_size rows at each offset."""
    model, plan = mlp3_plan()
    fc1 = plan.groups[0]
    consumer = dataclasses.replace(fc1.consumers[0], input=Slice("fc2.weight", 1, 1, (0, 4)))
    plan.groups[:] = [dataclasses.replace(fc1, name="fc1.pair", count=4, consumers=(consumer,),
                                          producers=(Slice("fc1.weight", 0, 1, (0, 4)), Slice("fc1.bias", 0, 1, (0, 4))))]
    batches = [torch.randn(5, 3, 6) for _ in range(3)]
    result = prune(model, batches, widths={"fc1.pair": 2}, method="exact", mode="dense", plan=plan, progress=False,
                   intercept=False)
    x = torch.cat([torch.relu(model.fc1(b)).reshape(-1, 8) for b in batches]).double()
    pairs = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # structure i owns channels i and i + 4
    ref = solver.prune_layer((x.T @ x)[pairs][:, pairs], model.fc2.weight.T.double()[pairs], group_size=2, width=2, method="exact", damp=0.01)
    assert torch.equal(result.masks["fc1.pair"], torch.as_tensor(ref.mask))
    assert result.layer_losses["fc2.weight"] == pytest.approx(float(ref.loss), rel=1e-6, abs=1e-9)
    assert result.model.get_parameter("fc2.weight").shape == (7, 4)
    masked = apply_masks(model, plan, result.masks, result.weights, result.shifts)
    x = torch.randn(5, 3, 6)
    torch.testing.assert_close(result.model(x), masked(x), rtol=1e-4, atol=1e-5)
