"""The main job end to end on a tiny model: every artifact written, bad output folders refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from osscar_export.cli import main


class TinyMLP(nn.Module):
    """Two MLP blocks: two neuron groups whose width changes the latency."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)
        self.fc3 = nn.Linear(64, 256)
        self.fc4 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc4(torch.relu(self.fc3(self.fc2(torch.relu(self.fc1(x))))))


def tiny_mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TinyMLP().eval(), (torch.randn(32, 64),)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A module:factory spec, a .pt calibration file and cache / table folders shared by the
    module's tests, so the latency table is measured once (its re-use is itself tested)."""
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).parent))
        mp.setenv("OSSCAR_CACHE", str(root / "cache"))
        torch.manual_seed(1)
        mix = torch.randn(64, 64) / 8  # correlated inputs, not white noise
        calib = root / "calib.pt"
        torch.save([(torch.randn(32, 64) @ mix,) for _ in range(4)], calib)
        yield {"spec": f"{__name__.rsplit('.', 1)[-1]}:tiny_mlp", "calib": str(calib), "tables": str(root / "tables")}


def _args(tiny: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [tiny["spec"], "--calib", tiny["calib"], "--n-calib", "4", "--levels", "4", "--tables", tiny["tables"], "--out", str(out), *extra]


def test_job_writes_every_artifact(tiny: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "job"
    assert main(_args(tiny, out, "--speedup", "1.3")) == 0
    for name in ("model.onnx", "model.pt2", "report.json", "report.md", "tradeoff.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    for key in ("budget_ms", "dense_ms", "predicted_ms", "measured_ms", "groups", "versions", "target"):
        assert key in report
    assert report["budget_ms"] == pytest.approx(report["dense_ms"] / 1.3)
    assert report["predicted_ms"] <= report["budget_ms"] + 1e-9
    search = report["allocation_search"]
    chosen = [c for c in search if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["held_out_loss"] == min(c["held_out_loss"] for c in search)
    assert report["attempts"] and report["attempts"][-1]["measured_ms"] == pytest.approx(report["measured_ms"])
    losses = report["mode_losses"]  # the default mode prunes both ways and keeps the lower held-out loss
    assert set(losses) == {"sequential", "dense"} and losses[report["mode"]] == min(losses.values())
    assert report["calibration"]["samples"] == 4
    kept = {g["name"]: g["kept"] for g in report["groups"]}
    assert sum(kept.values()) < sum(g["count"] for g in report["groups"]), "a 1.3x budget must prune something"
    small = torch.export.load(out / "model.pt2").module()
    assert small(torch.randn(32, 64)).shape == (32, 10)
    # A second run re-uses the latency table and the cached Gram matrices / curves.
    tables = list(Path(tiny["tables"]).glob("*.json"))
    assert len(tables) == 1
    cached = sorted(Path(os.environ["OSSCAR_CACHE"]).rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in [tables[0], *cached]]
    assert main(_args(tiny, tmp_path / "job2", "--latency-ms", str(report["budget_ms"]))) == 0
    assert [p.stat().st_mtime_ns for p in [tables[0], *cached]] == stamps
    assert sorted(Path(os.environ["OSSCAR_CACHE"]).rglob("*")) == cached


def test_family_of_budgets(tiny: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "family"
    assert main(_args(tiny, out, "--speedup", "1.2", "1.6")) == 0
    summary = json.loads((out / "report.json").read_text())
    assert set(summary["models"]) == {"1.2x", "1.6x"}
    for label in ("1.2x", "1.6x"):
        assert (out / label / "model.onnx").exists() and (out / label / "report.json").exists()
    models = summary["models"]
    assert models["1.6x"]["budget_ms"] < models["1.2x"]["budget_ms"]
    # each within its own budget (a model measured over it may have been rebuilt for a tighter one)
    assert all(m["predicted_ms"] <= m["budget_ms"] + 1e-9 for m in models.values())


def test_refuses_existing_output_and_bad_budgets(tiny: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_args(tiny, out, "--speedup", "1.3")) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    assert main(_args(tiny, file_out, "--speedup", "1.3")) == 2
    assert main(_args(tiny, tmp_path / "new", "--latency-ms", "-1")) == 2
    assert main(_args(tiny, tmp_path / "new")) == 2  # no budget at all
    assert not (tmp_path / "new").exists()


def test_infeasible_budget_names_the_minimum(tiny: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "never"
    assert main(_args(tiny, out, "--latency-ms", "0.000001")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "fastest configuration the table allows takes" in err
    assert not out.exists()


def test_inspect_lists_groups(tiny: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", tiny["spec"]]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "3 groups" in text and all(f"fc{i}.weight" in text for i in (2, 3, 4))



def test_clock_choice_follows_the_target() -> None:
    """Thread CPU time only where all work runs on the calling thread; a wrong choice is refused."""
    from osscar_export.errors import OsscarError
    from osscar_export.pipeline import measure_settings
    from osscar_export.targets import get_target

    one, four = get_target("ort-cpu", threads=1), get_target("ort-cpu", threads=4)
    assert measure_settings("auto", one).clock == "thread"
    assert measure_settings("auto", four).clock == "wall"
    assert measure_settings("wall", one).clock == "wall"
    with pytest.raises(OsscarError, match="single-threaded"):
        measure_settings("thread", four)
    with pytest.raises(OsscarError, match="clock must be"):
        measure_settings("cpu", one)


def test_atomic_writes_get_the_usual_permissions(tmp_path: Path) -> None:
    """Temp files and folders are private (0600/0700); what replaces the target must not be."""
    from osscar_export.atomic import atomic_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "out") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
