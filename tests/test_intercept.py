"""The re-fit's intercept (passes/solve.py): each re-fitted consumer's bias takes the mean of what
the removed structures contributed, and materialize adds a bias where the layer had none."""

from __future__ import annotations

import torch
from torch import nn

from osscar_export import apply_masks, find_structures, prune


class MLP(nn.Module):
    """fc2 has no bias: the intercept has to add one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def constant_neurons_model() -> MLP:
    """Neurons 4..7 of fc1 output a constant (zero weights, positive bias) after the ReLU."""
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[4:] = 0
        model.fc1.bias[4:] = torch.tensor([0.5, 1.0, 2.0, 3.0])
        model.fc1.bias[:4] = 0.0  # the others vary with the input, so none can stand in for a constant
    return model


def test_constant_structures_move_into_the_bias_exactly():
    model = constant_neurons_model()
    batches = [torch.randn(4, 6) for _ in range(4)]
    plan = find_structures(model, (batches[0],))
    for mode in ("dense", "sequential"):
        result = prune(model, batches, widths={"fc1.neuron": 4}, mode=mode, plan=plan, progress=False, intercept=True)
        assert result.masks["fc1.neuron"].tolist() == [True] * 4 + [False] * 4  # constant inputs are dead: they go first
        assert set(result.shifts) == {"fc2.weight"}
        assert "fc2.bias" in dict(result.model.named_parameters())  # added where the layer had none
        x = torch.randn(4, 6)  # not calibration data: a constant is constant everywhere
        with torch.no_grad():
            torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
            masked = apply_masks(model, plan, result.masks, result.weights, result.shifts)
            torch.testing.assert_close(masked(x), model(x), rtol=1e-5, atol=1e-5)
        without = prune(model, batches, widths={"fc1.neuron": 4}, mode=mode, plan=plan, progress=False, intercept=False)
        with torch.no_grad():
            assert float((without.model(x) - model(x)).abs().max()) > 0.1  # the shift is what makes it exact
        assert not without.shifts


def test_the_shift_is_least_squares_with_an_intercept_column():
    """On the kept inputs, W' and b' are the least-squares fit of the dense outputs with a free
    intercept, which no fit without one beats."""
    model = MLP()
    batches = [torch.randn(16, 6) + 2.0 for _ in range(4)]
    plan = find_structures(model, (batches[0],))
    result = prune(model, batches, widths={"fc1.neuron": 3}, mode="dense", plan=plan, progress=False, damp=1e-10,
                   intercept=True)
    keep = result.masks["fc1.neuron"]
    x = torch.cat([torch.relu(model.fc1(b)) for b in batches]).double().detach()
    target = x @ model.fc2.weight.T.double().detach()
    design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    best = torch.linalg.lstsq(design, target).solution
    w = result.weights["fc2.weight"].double()[:, keep]
    b = result.shifts["fc2.weight"].double()  # fc2 had no bias: the shift is the whole bias
    torch.testing.assert_close(w, best[:-1].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, best[-1], rtol=1e-4, atol=1e-5)
    plain = prune(model, batches, widths={"fc1.neuron": 3}, mode="dense", plan=plan, progress=False, damp=1e-10,
                  intercept=False)
    fit = x[:, keep] @ w.T + b
    no_intercept = x @ plain.weights["fc2.weight"].double().T
    assert float(((fit - target) ** 2).sum()) < float(((no_intercept - target) ** 2).sum())
