"""Error curves and dense-mode solves fanned out as Ray tasks equal the serial ones; Ray stays optional."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
import torch

from osscar_export.errors import OsscarError
from osscar_export.fanout import Engine
from osscar_export.passes.calibrate import calibrate
from osscar_export.passes.structures import find_structures
from osscar_export.prune import error_curves, prune
from tests.models_zoo import llama_gqa

T = TypeVar("T")


def test_the_local_engine_maps_in_order_and_lazily() -> None:
    drawn = []

    def items():
        for i in range(5):
            drawn.append(i)
            yield i

    results = Engine().map(lambda x: x * x, items())
    assert drawn == []  # nothing is drawn before the first result is asked for
    assert next(results) == 0 and drawn == [0]
    assert list(results) == [1, 4, 9, 16]
    assert Engine().describe() == {"engine": "local", "workers": 1, "address": None}


def test_bad_engines_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OsscarError, match="--workers 0: give at least 1"):
        Engine(0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(OsscarError, match=r"needs Ray: pip install 'osscar-export\[ray\]'"):
        list(Engine(2).map(abs, [-1]))


def on_two_ray_workers(run: Callable[[Engine], T]) -> T:
    """``run`` on a local Ray instance with 2 workers; skipped, saying why, when Ray is not
    installed or cannot start here."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (the [ray] extra)")
    try:
        return run(Engine(2))
    except OsscarError as e:
        if "could not start Ray" in str(e):
            pytest.skip(f"Ray cannot start here: {e}")
        raise
    finally:
        ray.shutdown()


def test_two_ray_workers_give_the_serial_curves() -> None:
    model, inputs = llama_gqa(layers=2, intermediate=64)
    plan = find_structures(model, inputs)
    grams = calibrate(plan, [inputs] * 2)
    serial = error_curves(plan, grams, 4, progress=False)
    fanned = on_two_ray_workers(lambda engine: error_curves(plan, grams, 4, progress=False, engine=engine))
    assert list(fanned) == list(serial) == [g.name for g in plan.groups]
    for name, (widths, losses) in serial.items():
        assert np.array_equal(fanned[name][0], widths)
        np.testing.assert_allclose(fanned[name][1], losses, rtol=1e-4, atol=1e-12)


def test_dense_mode_solves_on_two_ray_workers_equal_the_serial_prune() -> None:
    model, inputs = llama_gqa(layers=2, intermediate=64)
    plan = find_structures(model, inputs)
    batches = [inputs] * 2
    serial = prune(None, batches, keep_fraction=0.5, mode="dense", plan=plan, progress=False)
    fanned = on_two_ray_workers(lambda engine: prune(None, batches, keep_fraction=0.5, mode="dense", plan=plan,
                                                     progress=False, engine=engine))
    assert all(torch.equal(fanned.masks[g], serial.masks[g]) for g in serial.masks)
    for fqn, w in serial.weights.items():
        torch.testing.assert_close(fanned.weights[fqn], w, rtol=1e-4, atol=1e-7)
