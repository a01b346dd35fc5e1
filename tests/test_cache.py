"""The on-disk caches: the same inputs hit, a bumped code version or changed weights miss, a
corrupt file is replaced."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
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


# --------------------------------------------------------------------------------------------
# a corrupt cache file is reported by name, replaced, and never changes the result


def zero_grams(path: Path) -> None:
    """All-zero Grams that keep the file's (now stale) digest."""
    saved = torch.load(path, weights_only=True)
    saved["xtx"] = {k: torch.zeros_like(v) for k, v in saved["xtx"].items()}
    torch.save(saved, path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not a cache file\xff" * 50)


def other_model_grams(path: Path) -> None:
    """Grams of a wider MLP, with a valid digest: only the shape check can refuse them."""
    wide = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 4)).eval()
    elsewhere = path.parent / "elsewhere"
    cache.grams(find_structures(wide, batches()[0]), batches(), elsewhere, quiet)
    path.write_bytes(next(elsewhere.glob("grams-*.pt")).read_bytes())


def assert_replaced(path: Path, corrupt: bytes, load) -> None:
    """``load()`` warns naming ``path`` and leaves a clean file there that loads silently."""
    with pytest.warns(UserWarning, match=f"cache file {re.escape(str(path))} is unusable"):
        load()
    assert path.exists() and path.read_bytes() != corrupt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load()


@pytest.mark.parametrize("corrupt", [zero_grams, truncate, garble, other_model_grams])
def test_a_corrupt_gram_file_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corrupt):
    plan, data = find_structures(mlp(), batches()[0]), batches()
    clean = cache.grams(plan, data, tmp_path / "clean", quiet)
    cache.grams(plan, data, tmp_path, quiet)
    path = next(tmp_path.glob("grams-*.pt"))
    corrupt(path)
    calls = counting(monkeypatch, cache, "calibrate")
    results = []
    assert_replaced(path, path.read_bytes(), lambda: results.append(cache.grams(plan, data, tmp_path, quiet)))
    assert len(calls) == 1  # recomputed once, then re-used
    for got in results:
        assert got.xtx.keys() == clean.xtx.keys() and all(torch.equal(got.xtx[k], clean.xtx[k]) for k in clean.xtx)
        assert got.rows == clean.rows and got.blocked == clean.blocked


def zero_losses(path: Path) -> None:
    """All-zero losses that keep the file's (now stale) digest."""
    with np.load(path) as z:
        arrays = {name: z[name] for name in z.files}
    arrays["losses"] = np.zeros_like(arrays["losses"])
    np.savez(path, **arrays)


def wider_masks(path: Path) -> None:
    """Masks one structure too wide, stored with a valid digest by the cache itself."""
    with np.load(path) as z:
        widths, losses, masks = z["widths"], z["losses"], z["masks"]
    wide = np.concatenate([masks, masks[:, :1]], axis=1)
    path.unlink()
    cache.save_curve(path, (widths, losses, wide))
    assert cache.load_curve(path, {"widths": widths.shape, "losses": losses.shape, "masks": wide.shape})[2].shape == wide.shape


@pytest.mark.parametrize("corrupt", [zero_losses, truncate, garble, wider_masks])
def test_a_corrupt_curve_file_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corrupt):
    plan, data = find_structures(mlp(), batches()[0]), batches()
    grams = cache.grams(plan, data, tmp_path, quiet)
    clean = error_curves(plan, grams, LEVELS, cache_dir=tmp_path / "clean", progress=False)
    error_curves(plan, grams, LEVELS, cache_dir=tmp_path / "curves", progress=False)
    path = next((tmp_path / "curves").glob("*.npz"))
    corrupt(path)
    calls = counting(monkeypatch, solver, "error_curve")
    results = []
    load = lambda: results.append(error_curves(plan, grams, LEVELS, cache_dir=tmp_path / "curves", progress=False))  # noqa: E731
    assert_replaced(path, path.read_bytes(), load)
    assert len(calls) == 1  # only the corrupt group, once
    for got in results:
        assert got.keys() == clean.keys()
        for name, (widths, losses) in clean.items():
            assert np.array_equal(got[name][0], widths) and np.array_equal(got[name][1], losses)
