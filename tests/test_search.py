"""The allocation search: candidates, the uniform allocation, end-to-end scoring, the choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from osscar_export.allocate import allocate, group_losses
from osscar_export.passes.calibrate import calibrate
from osscar_export.passes.structures import find_structures
from osscar_export.prune import error_curves
from osscar_export.search import (
    KIND_FACTORS,
    SENSITIVITY_FLOOR,
    Scorer,
    candidates,
    probe_widths,
    search_allocation,
    sensitivities,
    uniform_allocation,
)
from osscar_export.tasks import TASKS
from tests.test_allocate import make_table

WIDTHS = [2, 4, 6, 8]


def two_kind_instance():
    """Four groups of two kinds; kind "b" is cheap in loss but costs as much time as kind "a"."""
    times = {f"{k}{i}": {w: 0.5 * w for w in WIDTHS} for k in "ab" for i in range(2)}
    curves = {g: (WIDTHS, [(1 - w / 8) ** (2 if g[0] == "a" else 1) for w in WIDTHS]) for g in times}
    return make_table(times, base_ms=1.0), curves, {g: g[0] for g in times}


def test_uniform_allocation_is_the_largest_fraction_that_fits():
    table, curves, _ = two_kind_instance()
    budget = 1.0 + 4 * 0.5 * 6 + 0.1  # every group at 6 of 8 fits, at 8 of 8 it does not
    uniform = uniform_allocation(curves, table, budget)
    assert uniform.widths == {g: 6 for g in curves}
    assert uniform.predicted_ms <= budget
    assert uniform_allocation(curves, table, 1.0 + 4 * 0.5 * 2 - 0.01) is None


def test_candidates_cover_the_kind_weights_and_uniform_without_duplicates():
    table, curves, kinds = two_kind_instance()
    budget = 1.0 + 4 * 0.5 * 5
    found = candidates(curves, table, budget, kinds)
    names = [n for n, _ in found]
    assert names[0] == "knapsack" and found[0][1].widths == allocate(curves, table, budget).widths
    assert "uniform" in names
    assert len({tuple(sorted(a.widths.items())) for _, a in found}) == len(found)
    assert len(found) <= 2 + len(KIND_FACTORS)
    assert all(a.predicted_ms <= budget + 1e-9 for _, a in found)
    # weighting kind b up moves width from kind a to kind b
    heavy = allocate(curves, table, budget, weights={g: 8.0 for g in curves if g[0] == "b"})
    light = allocate(curves, table, budget)
    assert sum(heavy.widths[g] for g in curves if g[0] == "b") > sum(light.widths[g] for g in curves if g[0] == "b")


def test_search_returns_the_lowest_scoring_candidate():
    table, curves, kinds = two_kind_instance()
    budget = 1.0 + 4 * 0.5 * 5

    def score(widths):  # prefers keeping kind "b": a candidate other than the plain knapsack must win
        return -sum(w for g, w in widths.items() if g[0] == "b")

    chosen, tried = search_allocation(curves, table, budget, kinds, score, log=lambda m: None)
    sensitivity = sensitivities(curves, table, probe_widths(curves, table, budget), score)
    assert len(tried) == len(candidates(curves, table, budget, kinds, sensitivity))
    assert chosen is min(tried, key=lambda c: c.score).allocation
    assert score(chosen.widths) < score(allocate(curves, table, budget).widths)


def test_probes_sit_at_the_uniform_widths_below_full():
    table, curves, _ = two_kind_instance()
    budget = 1.0 + 4 * 0.5 * 6 + 0.1
    assert probe_widths(curves, table, budget) == uniform_allocation(curves, table, budget).widths == {g: 6 for g in curves}
    assert probe_widths(curves, table, 100.0) == {g: 6 for g in curves}  # uniform keeps all 8: probe one step below
    assert probe_widths(curves, table, 1.0) == {g: 2 for g in curves}  # not even uniform fits: the narrowest


def test_measured_sensitivities_recover_an_additive_end_to_end_loss():
    """When the end-to-end loss is a weighted sum of the curves, the sensitivity-weighted
    knapsack is the knapsack with the true weights, whatever the curves' own scales."""
    table, curves, kinds = two_kind_instance()
    curves = {g: (w, [3.0 ** i * x for x in losses]) for i, (g, (w, losses)) in enumerate(curves.items())}
    true = {"a0": 5.0, "a1": 0.2, "b0": 1.0, "b1": 3.0}
    budget = 1.0 + 4 * 0.5 * 5

    def score(widths):
        losses = group_losses(curves, table, widths)
        return 7.0 + sum(true[g] * losses[g] for g in widths)

    at = probe_widths(curves, table, budget)
    found = sensitivities(curves, table, at, score)
    assert found == pytest.approx(true)
    assert allocate(curves, table, budget, weights=found).widths == allocate(curves, table, budget, weights=true).widths
    assert allocate(curves, table, budget, weights=found).widths != allocate(curves, table, budget).widths
    named = dict(candidates(curves, table, budget, kinds, found))
    assert named["knapsack, measured sensitivities"].widths == allocate(curves, table, budget, weights=true).widths

    # a group whose probe did not hurt is not free: it gets a small fraction of the median
    harmless = sensitivities(curves, table, at, lambda w: score(w) - (10.0 if "a1" in w else 0.0))
    assert harmless["a1"] == pytest.approx(SENSITIVITY_FLOOR * sorted(true[g] for g in ("a0", "b0", "b1"))[1])


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_scorer_builds_refitted_models_whose_loss_grows_as_widths_shrink():
    torch.manual_seed(0)
    mix = torch.randn(16, 16)
    batches = [(torch.randn(64, 16) @ mix,) for _ in range(3)]
    model = Mlp().eval()
    plan = find_structures(model, batches[0])
    (group,) = plan.groups
    grams = calibrate(plan, batches)
    curves = error_curves(plan, grams, [0.25, 0.5, 0.75, 1.0], progress=False)
    scorer = Scorer(plan, grams, curves, batches, task=TASKS["encoder"])
    assert scorer({group.name: group.count}) == pytest.approx(0.0, abs=1e-12)
    widths = sorted((int(w) for w in curves[group.name][0] if w < group.count), reverse=True)
    assert len(widths) >= 3
    losses = [scorer({group.name: w}) for w in widths]
    assert 0 < losses[0] and all(a < b for a, b in zip(losses, losses[1:]))
    # the built model zeroes exactly the pruned neurons' inputs of fc2 and re-fits the rest:
    # it beats the same support with the dense weights left in place
    masked = Mlp().eval()
    masked.load_state_dict(model.state_dict())
    with scorer.model({group.name: widths[1]}) as pruned:
        kept = pruned.get_parameter("fc2.weight").abs().sum(0) > 0
        assert int(kept.sum()) == widths[1]
        refitted = TASKS["encoder"].end_to_end_loss(pruned, batches, scorer.dense_outputs)
    with torch.no_grad():
        masked.fc2.weight[:, ~kept] = 0
    assert refitted < TASKS["encoder"].end_to_end_loss(masked, batches, scorer.dense_outputs)
    # the working copy is restored after each candidate and the captured program never changes
    assert scorer({group.name: group.count}) == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(plan.program.state_dict["fc2.weight"], model.fc2.weight)


@pytest.mark.parametrize("family", ["llama_gqa", "mobilenet_v2"])
def test_one_group_probes_resume_the_dense_run_and_score_as_the_whole_model(family: str) -> None:
    """A sensitivity probe starts from the dense run paused before its group (search._Tails):
    the same loss as running the whole pruned model, on a stack of layers and on a CNN with
    BatchNorm and residual branches."""
    import models_zoo

    torch.manual_seed(0)
    model, inputs = getattr(models_zoo, family)()
    model.eval()
    if family == "llama_gqa":
        batches = [(torch.randint(0, models_zoo.VOCAB, inputs[0].shape),) for _ in range(3)]
        task = TASKS["causal-lm"]
    else:
        batches = [(torch.randn(inputs[0].shape),) for _ in range(3)]
        task = TASKS["encoder"]
    plan = find_structures(model, inputs)
    grams = calibrate(plan, batches, progress=False)
    curves = error_curves(plan, grams, [0.5, 1.0], progress=False)
    resumed = Scorer(plan, grams, curves, batches, task=task)
    whole = Scorer(plan, grams, curves, batches, task=task)
    whole._tails = None  # no paused runs: every score runs the whole model
    probes = {g: int(curves[g][0][0]) for g in list(curves)[:: max(1, len(curves) // 6)]}
    for g, w in probes.items():
        assert resumed({g: w}) == pytest.approx(whole({g: w}), rel=1e-5, abs=1e-9), g
    assert resumed._tails is not None and len(resumed._tails.states) == len(plan.groups)
    assert any(whole({g: w}) > whole({}) for g, w in probes.items())


def test_scores_are_saved_and_a_rerun_scores_nothing_twice(tmp_path, monkeypatch):
    torch.manual_seed(0)
    batches = [(torch.randn(32, 16) @ torch.randn(16, 16),) for _ in range(2)]
    model = Mlp().eval()
    plan = find_structures(model, batches[0])
    (group,) = plan.groups
    grams = calibrate(plan, batches, progress=False)
    curves = error_curves(plan, grams, [0.25, 0.5, 1.0], progress=False)
    path = tmp_path / "scores.json"
    first = Scorer(plan, grams, curves, batches, task=TASKS["encoder"], scores_file=path)
    widths = [int(w) for w in curves[group.name][0] if w < group.count]
    losses = [first({group.name: w}) for w in widths]
    monkeypatch.setattr(TASKS["encoder"].__class__, "end_to_end_loss", lambda *a, **k: pytest.fail("scored again"))
    again = Scorer(plan, grams, curves, batches, task=TASKS["encoder"], scores_file=path)
    assert [again({group.name: w}) for w in widths] == losses
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unusable"):
        assert Scorer(plan, grams, curves, batches, task=TASKS["encoder"], scores_file=path)._scores == {}


def test_scorer_with_intercept_restores_the_biases_it_shifts():
    torch.manual_seed(0)
    batches = [(torch.randn(64, 16) + 1.0,) for _ in range(3)]
    model = Mlp().eval()
    plan = find_structures(model, batches[0])
    (group,) = plan.groups
    grams = calibrate(plan, batches)
    curves = error_curves(plan, grams, [0.25, 0.5, 1.0], progress=False, intercept=True)
    scorer = Scorer(plan, grams, curves, batches, task=TASKS["encoder"], intercept=True)
    width = int(curves[group.name][0][0])
    first = scorer({group.name: width})
    with scorer.model({group.name: width}) as pruned:
        assert not torch.equal(pruned.get_parameter("fc2.bias"), model.fc2.bias)  # the intercept moved it
    assert torch.equal(scorer.work.get_parameter("fc2.bias"), model.fc2.bias)
    assert scorer({group.name: group.count}) == pytest.approx(0.0, abs=1e-12)
    scorer._scores.clear()  # score again from the restored working copy, not the memo
    assert scorer({group.name: width}) == pytest.approx(first, rel=1e-6)
