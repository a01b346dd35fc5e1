"""Fixtures shared by the job tests (test_cli, test_job, test_report, test_publish, test_torch_target)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A module:factory spec, a .pt calibration file (4 batches of 32) and cache / table folders
    shared by every module that runs the job on the tiny model, so the latency table is measured
    once (its re-use is itself tested)."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(1)
    mix = torch.randn(64, 64) / 8  # correlated inputs, not white noise
    calib = root / "calib.pt"
    torch.save([(torch.randn(32, 64) @ mix,) for _ in range(4)], calib)
    return {"spec": "models_zoo:tiny_mlp", "calib": str(calib), "tables": str(root / "tables"),
            "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def tiny(tiny_files: dict[str, str]) -> dict[str, str]:
    """``tiny_files`` with the model importable and the cache set, for one module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).parent))
        mp.setenv("OSSCAR_CACHE", tiny_files["cache"])
        yield tiny_files
