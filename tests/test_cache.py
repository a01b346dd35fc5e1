"""The on-disk caches: the same inputs hit, a bumped code version or changed weights miss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from osscar_export import cache, solver
from osscar_export.passes.structures import find_structures
from osscar_export.prune import error_curves

LEVELS = [0.25, 0.5, 1.0]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def batches(seed: int = 1) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen),) for _ in range(2)]


def quiet(msg: str) -> None:
    pass


def counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Count the calls of ``module.name`` (still called through)."""
    calls: list[int] = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_grams_hit_for_the_same_inputs_and_miss_for_a_new_code_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    plan, data = find_structures(mlp(), batches()[0]), batches()
    calls = counting(monkeypatch, cache, "calibrate")
    first = cache.grams(plan, data, tmp_path, quiet)
    again = cache.grams(plan, data, tmp_path, quiet)
    assert len(calls) == 1 and len(list(tmp_path.glob("grams-*.pt"))) == 1
    assert again.xtx.keys() == first.xtx.keys() and all(torch.equal(again.xtx[k], first.xtx[k]) for k in first.xtx)
    assert again.rows == first.rows and again.blocked == first.blocked
    monkeypatch.setitem(cache.VERSIONS, "grams", cache.VERSIONS["grams"] + 1)
    cache.grams(plan, data, tmp_path, quiet)
    assert len(calls) == 2 and len(list(tmp_path.glob("grams-*.pt"))) == 2


def test_the_gram_key_follows_weights_and_data():
    plan, data = find_structures(mlp(), batches()[0]), batches()
    key = cache.gram_key(plan, data)
    assert cache.gram_key(find_structures(mlp(), batches()[0]), batches()) == key  # a rebuilt identical model
    assert cache.gram_key(find_structures(mlp(seed=1), batches()[0]), data) != key  # a retrained checkpoint
    assert cache.gram_key(plan, batches(seed=2)) != key


def test_error_curves_hit_for_the_same_inputs_and_miss_for_a_new_code_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    plan, data = find_structures(mlp(), batches()[0]), batches()
    grams = cache.grams(plan, data, tmp_path, quiet)
    calls = counting(monkeypatch, solver, "error_curve")
    first = error_curves(plan, grams, LEVELS, cache_dir=tmp_path / "curves", progress=False)
    files = sorted((tmp_path / "curves").glob("*.npz"))
    assert len(calls) == len(first) == len(files) > 0
    again = error_curves(plan, grams, LEVELS, cache_dir=tmp_path / "curves", progress=False)
    assert len(calls) == len(first)
    for name, (widths, losses) in first.items():
        assert again[name][0].tolist() == widths.tolist() and again[name][1].tolist() == losses.tolist()
    monkeypatch.setitem(cache.VERSIONS, "curves", cache.VERSIONS["curves"] + 1)
    error_curves(plan, grams, LEVELS, cache_dir=tmp_path / "curves", progress=False)
    assert len(calls) == 2 * len(first) and len(list((tmp_path / "curves").glob("*.npz"))) == 2 * len(files)


def test_keys_carry_the_kind_and_its_version(monkeypatch: pytest.MonkeyPatch):
    assert cache.key("grams", 1) != cache.key("curves", 1)
    before = cache.key("dequantised", "x")
    old_dir = cache.dequantised_dir("model")
    monkeypatch.setitem(cache.VERSIONS, "dequantised", cache.VERSIONS["dequantised"] + 1)
    assert cache.key("dequantised", "x") != before and cache.dequantised_dir("model") != old_dir
    with pytest.raises(KeyError, match="unknown cache kind"):
        cache.key("nothing", 1)


def test_run_folders_live_under_the_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path))
    run = cache.run_dir("model", 128, None, 0)
    assert run.is_dir() and run.parent == tmp_path / "runs"
    assert cache.run_dir("model", 128, None, 0) == run != cache.run_dir("model", 64, None, 0)
