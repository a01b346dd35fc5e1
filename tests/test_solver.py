"""The layer solver: closed forms vs brute-force re-solves, methods vs the exact optimum, conv parity."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from solver_cases import correlated_layer, damped, objective_increase
from torch import nn

from osscar_export.solver import METHODS, error_curve, prune_layer
from osscar_export.solver.gradual import Gradual
from osscar_export.solver.layer import group_rows, nested_refit_losses, prepare, refit_support
from osscar_export.solver.swaps import Swept, local_search


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: one thread avoids oversubscription on a shared CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _optimum(H: torch.Tensor, G: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, float]:
    """Brute force: minimise f(W) = ½tr(WᵀHW) − tr(GᵀW) with W zero outside ``rows`` (lstsq)."""
    W = torch.zeros_like(G)
    if rows:
        idx = torch.tensor(rows)
        W[idx] = torch.linalg.lstsq(H[idx][:, idx], G[idx]).solution
    return W, float(0.5 * torch.trace(W.T @ H @ W) - torch.trace(G.T @ W))


def _group_rows(groups, d: int) -> list[int]:
    return [g * d + i for g in sorted(int(x) for x in groups) for i in range(d)]


def _layer(p=12, m=5, d=2, seed=0, dead=0):
    XtX, W = correlated_layer(p, m, seed, dead=dead)
    return XtX, W, prepare(XtX, W, d, 0.01)


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("d", [1, 3])
def test_support_optimum_and_value_closed_forms(d):
    XtX, W, layer = _layer(p=12, d=d, seed=1)
    H, G = damped(XtX), damped(XtX) @ W
    assert torch.allclose(layer.H, H) and torch.allclose(layer.G, G)
    mask = torch.tensor([True, False, True, True] + [False] * (12 // d - 4))
    rows = _group_rows(mask.nonzero(), d)
    W_bf, f_bf = _optimum(H, G, rows)
    W_cf, loss = refit_support(layer, mask)
    # W_R = H_RR⁻¹ G_R, zero elsewhere; the gradient vanishes on R.
    assert torch.allclose(W_cf, W_bf, atol=1e-9)
    assert (H @ W_cf - G)[rows].abs().max() < 1e-8
    # f*(R) = −½ tr(G_Rᵀ H_RR⁻¹ G_R), and the loss is f*(R) − f(Ŵ) = ½ tr((W−Ŵ)ᵀH(W−Ŵ)).
    idx = torch.tensor(rows)
    f_cf = -0.5 * float(torch.trace(G[idx].T @ torch.linalg.solve(H[idx][:, idx], G[idx])))
    f_dense = -0.5 * float(torch.trace(W.T @ H @ W))
    assert f_cf == pytest.approx(f_bf, rel=1e-10)
    assert loss == pytest.approx(f_bf - f_dense, rel=1e-9)
    assert loss == pytest.approx(objective_increase(H, W_cf, W), rel=1e-9)


@pytest.mark.parametrize("d", [1, 2])
def test_removal_costs_and_joint_downdate_match_resolves(d):
    XtX, W, layer = _layer(p=16, d=d, seed=2)
    H, G = layer.H, layer.G
    n = layer.n
    engine = Gradual(layer, torch.arange(n))
    engine.remove(torch.tensor([1]))  # start from a non-trivial support
    kept = [g for g in range(n) if g != 1]
    _, f_R = _optimum(H, G, _group_rows(kept, d))
    rho = engine.costs()
    assert math.isinf(float(rho[1]))
    for j in kept:  # ρ_J = f*(R∖J) − f*(R)
        _, f_minus = _optimum(H, G, _group_rows([g for g in kept if g != j], d))
        assert float(rho[j]) == pytest.approx(f_minus - f_R, rel=1e-8)
    # joint downdate of U = {3, 5, 6}: W and H_RR⁻¹ equal a fresh re-solve and inverse on R∖U
    U = [3, 5, 6]
    cost = engine.remove(torch.tensor(U))
    rest = [g for g in kept if g not in U]
    rows = _group_rows(rest, d)
    W_bf, f_rest = _optimum(H, G, rows)
    assert cost == pytest.approx(f_rest - f_R, rel=1e-8)
    assert torch.allclose(engine.weight(layer), W_bf, atol=1e-9)
    idx = torch.tensor(rows)
    pos = engine.alive.nonzero().reshape(-1)
    assert engine.groups[pos].tolist() == rest
    A = engine.A[group_rows(pos, d)][:, group_rows(pos, d)]
    assert torch.allclose(A, torch.linalg.inv(H[idx][:, idx]), atol=1e-10)


@pytest.mark.parametrize("d", [1, 3])
def test_swept_reentry_gains_and_removal_costs_match_resolves(d):
    XtX, W, layer = _layer(p=15, d=d, seed=3)
    H, G, n = layer.H, layer.G, layer.n
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[0, 2, 3]] = True
    state = Swept(layer, mask)
    R = _group_rows(mask.nonzero(), d)
    W_R, f_R = _optimum(H, G, R)
    p = layer.p
    assert torch.allclose(state.T[torch.tensor(R), p:], W_R[torch.tensor(R)], atol=1e-9)  # W_R
    pruned = (~mask).nonzero().reshape(-1)
    gamma = -state.deltas(pruned, add=True)
    for j, g in zip(pruned.tolist(), gamma.tolist()):  # γ_J = f*(R) − f*(R∪J)
        _, f_plus = _optimum(H, G, _group_rows(mask.nonzero().reshape(-1).tolist() + [j], d))
        assert g == pytest.approx(f_R - f_plus, rel=1e-8)
        # the Schur-complement form of docs/design.md, "Solver": C = H_JJ − H_JR H_RR⁻¹ H_RJ, g = G_J − H_JR W_R
        J, Ri = torch.tensor(_group_rows([j], d)), torch.tensor(R)
        C = H[J][:, J] - H[J][:, Ri] @ torch.linalg.solve(H[Ri][:, Ri], H[Ri][:, J])
        gJ = G[J] - H[J][:, Ri] @ W_R[Ri]
        assert g == pytest.approx(0.5 * float(torch.trace(gJ.T @ torch.linalg.solve(C, gJ))), rel=1e-8)
    rho = state.deltas(mask.nonzero().reshape(-1), add=False)
    for j, r in zip(mask.nonzero().reshape(-1).tolist(), rho.tolist()):
        _, f_minus = _optimum(H, G, _group_rows([g for g in mask.nonzero().reshape(-1).tolist() if g != j], d))
        assert r == pytest.approx(f_minus - f_R, rel=1e-8)
    # a swap (drop D, re-add the t best) is scored exactly without sweeping: brute force agrees
    kept_list = mask.nonzero().reshape(-1).tolist()
    for drop, t in (([2], 1), ([0, 3], 2)):
        add, change = state.swap(torch.tensor(drop), pruned, t, state.pruned_side(pruned))
        rest = [g for g in kept_list if g not in drop]
        _, f_rest = _optimum(H, G, _group_rows(rest, d))
        gains = {j: f_rest - _optimum(H, G, _group_rows(rest + [j], d))[1] for j in pruned.tolist()}
        assert sorted(add.tolist()) == sorted(sorted(gains, key=gains.get)[-t:])
        _, f_swapped = _optimum(H, G, _group_rows(rest + add.tolist(), d))
        assert change == pytest.approx(f_swapped - f_R, rel=1e-8)
    # sweeping two groups in lands on the re-solved optimum
    both = torch.tensor([1, 4])
    state.sweep(layer.rows(both), add=True)
    R2 = torch.tensor(_group_rows([0, 1, 2, 3, 4], d))
    W2, _ = _optimum(H, G, R2.tolist())
    assert torch.allclose(state.T[R2, p:], W2[R2], atol=1e-8)
    # and a reverse sweep is its exact inverse
    state.sweep(layer.rows(both), add=False)
    assert torch.allclose(state.T, Swept(layer, mask).T, atol=1e-8)


def test_nested_prefix_losses_equal_refits():
    XtX, W, layer = _layer(p=18, d=3, seed=4)
    order = torch.randperm(layer.n, generator=torch.Generator().manual_seed(0))
    levels = list(range(layer.n + 1))
    losses = nested_refit_losses(layer, order, levels)
    for k, loss in zip(levels, losses.tolist()):
        mask = torch.zeros(layer.n, dtype=torch.bool)
        mask[order[:k]] = True
        assert loss == pytest.approx(refit_support(layer, mask)[1], rel=1e-9, abs=1e-9)


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", [1, 2])
def test_every_method_returns_a_consistent_solution(method, d):
    XtX, W = correlated_layer(16, 6, seed=5, samples=10, dead=3)  # singular Gram + dead inputs
    s = 3
    sol = prune_layer(XtX, W, group_size=d, width=s, method=method)
    n = 16 // d
    assert sol.mask.dtype == torch.bool and sol.mask.shape == (n,) and int(sol.mask.sum()) == s
    assert sol.weight.shape == (16, 6) and sol.weight.dtype == torch.float64
    gone = group_rows((~sol.mask).nonzero(), d)
    assert sol.weight[gone].abs().max() == 0
    W0 = W.clone()
    W0[torch.diagonal(XtX) == 0] = 0
    assert sol.loss >= 0
    assert sol.loss == pytest.approx(objective_increase(damped(XtX), sol.weight, W0), rel=1e-8)
    if method != "mp":  # every other method returns the exact re-fit on its support
        assert torch.allclose(sol.weight, refit_support(prepare(XtX, W, d, 0.01), sol.mask)[0], atol=1e-8)


def test_exact_agrees_with_exhaustive_enumeration():
    for seed in range(4):
        XtX, W = correlated_layer(12, 4, seed=10 + seed)
        H = damped(XtX)
        for s in (2, 3):
            best = min(
                itertools.combinations(range(6), s),
                key=lambda c: _optimum(H, H @ W, _group_rows(c, 2))[1],
            )
            sol = prune_layer(XtX, W, group_size=2, width=s, method="exact")
            assert sorted(sol.mask.nonzero().reshape(-1).tolist()) == list(best)


def test_greedy_is_one_at_a_time_obs():
    """Greedy equals naive backward elimination that re-solves every candidate removal."""
    XtX, W = correlated_layer(10, 3, seed=20)
    H = damped(XtX)
    G = H @ W
    kept = list(range(10))
    while len(kept) > 3:
        kept.remove(min(kept, key=lambda j: _optimum(H, G, [g for g in kept if g != j])[1]))
    sol = prune_layer(XtX, W, group_size=1, width=3, method="greedy")
    assert sol.mask.nonzero().reshape(-1).tolist() == kept


def test_dead_inputs_go_first():
    XtX, W = correlated_layer(20, 4, seed=21)
    XtX[:, 4:8] = 0
    XtX[4:8, :] = 0  # group 1 (rows 4..7, d = 4) never fires; row 12 (group 3) alone is dead too
    XtX[:, 12] = 0
    XtX[12, :] = 0
    for method in ("osscar", "osscar-fast", "greedy", "exact"):
        sol = prune_layer(XtX, W, group_size=4, width=4, method=method)
        assert sol.mask.tolist() == [True, False, True, True, True]
        assert sol.loss == pytest.approx(0.0, abs=1e-9)
        assert sol.weight[12].abs().max() == 0  # a dead row in a kept group carries nothing


@pytest.mark.parametrize("method", METHODS)
def test_grouped_and_scalar_paths_agree_on_a_kronecker_problem(method):
    """H ⊗ I₂ with interleaved columns is, group for group, the d=1 problem with the columns side by side."""
    XtX, W = correlated_layer(8, 6, seed=22)
    W_even, W_odd = W[:, :3], W[:, 3:]
    XtX2 = torch.kron(XtX, torch.eye(2, dtype=XtX.dtype))
    W2 = torch.stack([W_even, W_odd], dim=1).reshape(16, 3)  # row 2j: W_even[j], row 2j+1: W_odd[j]
    one = prune_layer(XtX, W, group_size=1, width=3, method=method)
    two = prune_layer(XtX2, W2, group_size=2, width=3, method=method)
    assert torch.equal(one.mask, two.mask)
    assert two.loss == pytest.approx(one.loss, rel=1e-9)
    assert torch.allclose(two.weight.reshape(8, 2, 3)[:, 0], one.weight[:, :3], atol=1e-9)
    assert torch.allclose(two.weight.reshape(8, 2, 3)[:, 1], one.weight[:, 3:], atol=1e-9)


def test_local_search_never_returns_a_worse_support():
    for seed in range(6):
        XtX, W = correlated_layer(30, 5, seed=30 + seed)
        layer = prepare(XtX, W, 1, 0.01)
        g = torch.Generator().manual_seed(seed)
        for s in (5, 12, 25):
            start = torch.zeros(30, dtype=torch.bool)
            start[torch.randperm(30, generator=g)[:s]] = True  # a poor random start
            _, before = refit_support(layer, start)
            found = local_search(layer, start, before)
            _, after = refit_support(layer, found)
            assert int(found.sum()) == s
            assert after <= before
            if s < 25:
                assert after < before  # from a random support the search does find something
        fast = prune_layer(XtX, W, 1, 10, "osscar-fast").loss
        assert prune_layer(XtX, W, 1, 10, "osscar").loss <= fast


def test_conv_channel_pruning_equals_removing_input_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel_size=3, padding=1, stride=2, bias=True).double()
    mix = torch.randn(6, 6, dtype=torch.float64)
    x = torch.einsum("nchw,cd->ndhw", torch.randn(8, 6, 9, 9, dtype=torch.float64), mix)  # correlated channels
    cols = F.unfold(x, kernel_size=3, padding=1, stride=2)  # (N, C·9, L), channel-major rows
    X = cols.permute(1, 0, 2).reshape(6 * 9, -1)
    XtX = X @ X.T
    W = conv.weight.detach().flatten(1).T
    sol = prune_layer(XtX, W, group_size=9, width=3, method="osscar")
    mask = sol.mask
    pruned = nn.Conv2d(6, 5, kernel_size=3, padding=1, stride=2).double()
    small = nn.Conv2d(3, 5, kernel_size=3, padding=1, stride=2).double()
    new_weight = sol.weight.T.reshape(5, 6, 3, 3)
    with torch.no_grad():
        pruned.weight.copy_(new_weight)
        pruned.bias.copy_(conv.bias)
        small.weight.copy_(new_weight[:, mask])
        small.bias.copy_(conv.bias)
    assert new_weight[:, ~mask].abs().max() == 0
    assert torch.allclose(pruned(x), small(x[:, mask]), atol=1e-12)
    # the loss is the output reconstruction error plus the ridge term, measured on the real conv
    lam = 0.01 * float(torch.diagonal(XtX).mean())
    with torch.no_grad():
        err = 0.5 * float(((small(x[:, mask]) - conv(x)) ** 2).sum()) + 0.5 * lam * float(((sol.weight - W) ** 2).sum())
    assert sol.loss == pytest.approx(err, rel=1e-9)
    # and it is the best 3-channel conv: no other support re-fits better
    assert sol.loss == pytest.approx(prune_layer(XtX, W, group_size=9, width=3, method="exact").loss, rel=1e-9)


# ----------------------------------------------------------------------------- error curves


@pytest.mark.parametrize("method", ["osscar", "osscar-fast", "greedy", "mp", "mp+"])
def test_error_curve_is_nested_and_exact(method):
    XtX, W = correlated_layer(40, 6, seed=40, dead=4)
    levels = [40, 1, 0, 33, 20, 10, 5, 38, 36]
    curve = error_curve(XtX, W, group_size=1, levels=levels, method=method, weights=True)
    assert curve.levels == tuple(sorted(set(levels)))
    assert curve.masks.shape == (len(levels), 40)
    assert curve.masks.sum(dim=1).tolist() == list(curve.levels)
    assert all(bool((curve.masks[i] <= curve.masks[i + 1]).all()) for i in range(len(levels) - 1))
    layer = prepare(XtX, W, 1, 0.01)
    H, W0 = layer.H, layer.W0
    for i, mask in enumerate(curve.masks):
        weight = curve.weights[i]
        assert curve.losses[i] >= 0
        assert float(curve.losses[i]) == pytest.approx(objective_increase(H, weight, W0), rel=1e-8, abs=1e-9)
        if method != "mp":
            refit, loss = refit_support(layer, mask)
            assert torch.allclose(weight, refit, atol=1e-8)
            assert float(curve.losses[i]) == pytest.approx(loss, rel=1e-8, abs=1e-9)
    if method != "mp":
        assert bool((curve.losses[:-1] >= curve.losses[1:] - 1e-9).all())  # fewer kept, more loss
    assert curve.loss_at(36) == float(curve.losses[curve.levels.index(36)])
    assert curve.losses[-1] == 0  # 40 kept: dense
    if method in ("osscar-fast", "greedy"):  # dead inputs are the first to go, at no cost
        assert float(curve.losses[curve.levels.index(36)]) == pytest.approx(0.0, abs=1e-9)


def test_error_curve_grouped_passes_each_level_like_a_single_run():
    XtX, W = correlated_layer(36, 5, seed=41)
    curve = error_curve(XtX, W, group_size=3, levels=[2, 5, 8], method="greedy")
    for k in (2, 5, 8):  # greedy is one removal per step, so a curve level is the single run
        sol = prune_layer(XtX, W, group_size=3, width=k, method="greedy")
        assert torch.equal(curve.masks[curve.levels.index(k)], sol.mask)
        assert curve.loss_at(k) == pytest.approx(sol.loss, rel=1e-9)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_specific_errors():
    XtX, W = correlated_layer(8, 3, seed=50)
    cases = [
        (lambda: prune_layer(XtX[:, :7], W, 1, 2), "square"),
        (lambda: prune_layer(XtX, W[:7], 1, 2), "input-major"),
        (lambda: prune_layer(XtX, W, 3, 2), "do not split"),
        (lambda: prune_layer(XtX, W, 0, 2), "group_size"),
        (lambda: prune_layer(XtX, W, 1, 9), "out of range"),
        (lambda: prune_layer(XtX, W, 1, -1), "out of range"),
        (lambda: prune_layer(XtX, W, 1, 2.0), "must be an int"),
        (lambda: prune_layer(XtX, W, 1, True), "must be an int"),
        (lambda: prune_layer(XtX, W, 1, 2, method="obs"), "not one of"),
        (lambda: prune_layer(XtX, W, 1, 2, damp=-1.0), "damp"),
        (lambda: prune_layer(XtX, W, 1, 2, damp=float("nan")), "damp"),
        (lambda: prune_layer(XtX.clone().fill_diagonal_(float("nan")), W, 1, 2), "NaN"),
        (lambda: prune_layer(XtX, W.clone().fill_(float("inf")), 1, 2), "NaN or inf"),
        (lambda: prune_layer(XtX + torch.triu(torch.ones(8, 8, dtype=XtX.dtype), 1) * 50, W, 1, 2), "symmetric"),
        (lambda: prune_layer(-XtX, W, 1, 2), "negative diagonal"),
        (lambda: error_curve(XtX, W, 1, []), "levels is empty"),
        (lambda: error_curve(XtX, W, 1, [3], method="exact"), "error_curve method"),
        (lambda: error_curve(XtX, W, 1, [9]), "out of range"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            call()
    big_x, big_w = correlated_layer(40, 2, seed=51)
    with pytest.raises(ValueError, match=r"C\(40, 20\)"):
        prune_layer(big_x, big_w, 1, 20, method="exact")
    with pytest.raises(TypeError, match="torch tensors"):
        prune_layer(XtX.numpy(), W, 1, 2)
    singular = XtX.clone()
    singular[3] = 0
    singular[:, 3] = 0  # a dead input with no damping is singular
    assert prune_layer(singular, W, 1, 4, damp=0.01).loss >= 0
    with pytest.raises(ValueError, match="damp > 0"):
        prune_layer(singular, W, 1, 4, damp=0.0)


def test_edge_counts():
    XtX, W = correlated_layer(6, 2, seed=52)
    H = damped(XtX)
    for method in METHODS:
        full = prune_layer(XtX, W, 2, 3, method)
        assert full.mask.all() and full.loss == pytest.approx(0.0, abs=1e-9)
        assert torch.allclose(full.weight, W)
        empty = prune_layer(XtX, W, 2, 0, method)
        assert not empty.mask.any() and empty.weight.abs().max() == 0
        assert empty.loss == pytest.approx(0.5 * float(torch.trace(W.T @ H @ W)), rel=1e-10)
    zero = prune_layer(torch.zeros(4, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), 1, 2)
    assert zero.loss == 0 and zero.weight.abs().max() == 0  # every input dead


# ----------------------------------------------------------------------------- quality


def test_quality_against_the_exact_optimum():
    """200 random correlated instances with n ≤ 16 (d ∈ {1, 2, 4}, widths 15–75% of n)."""
    g = torch.Generator().manual_seed(123)
    ratios = {"osscar": [], "greedy": [], "mp+": []}
    worse_than_greedy = 0
    for i in range(200):
        n = int(torch.randint(6, 17, (1,), generator=g))
        d = [1, 2, 4][i % 3]
        s = max(1, min(n - 1, round(n * (0.15 + 0.6 * float(torch.rand(1, generator=g))))))
        XtX, W = correlated_layer(n * d, int(torch.randint(2, 9, (1,), generator=g)), seed=1000 + i, samples=int(n * d * 1.5))
        best = prune_layer(XtX, W, d, s, "exact").loss
        loss = {m: prune_layer(XtX, W, d, s, m).loss for m in ratios}
        assert loss["osscar"] >= best * (1 - 1e-9)
        for m in ratios:
            ratios[m].append(loss[m] / best)
        worse_than_greedy += loss["osscar"] > loss["greedy"] * 1.005
    assert statistics.median(ratios["osscar"]) <= 1.005
    assert worse_than_greedy == 0
    mean = {m: statistics.fmean(r) for m, r in ratios.items()}
    assert mean["mp+"] > 1.05 * mean["osscar"] and mean["mp+"] > 1.05 * mean["greedy"]
    assert mean["osscar"] <= mean["greedy"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    XtX, W = correlated_layer(64, 8, seed=60, dead=2)
    for method in ("osscar", "greedy", "mp+"):
        cpu = prune_layer(XtX, W, 4, 6, method)
        gpu = prune_layer(XtX.cuda(), W.cuda(), 4, 6, method)
        assert torch.equal(gpu.mask.cpu(), cpu.mask)
        assert gpu.loss == pytest.approx(cpu.loss, rel=1e-9)
