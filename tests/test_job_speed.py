"""Job speed (docs/design.md, "Job speed"): measurement effort scales with the model, exported
models are captured once, and ``--dry-run`` does nothing expensive."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from osscar_export import export as export_module
from osscar_export.cli import main
from osscar_export.export import export_onnx, save_program
from osscar_export.latency import timing
from osscar_export.latency.timing import MeasureSettings, measure
from osscar_export.targets import _OrtTarget
from tests.test_cli import _args


class Busy:
    """A runnable that spins for ``ms`` milliseconds per call and counts its calls."""

    def __init__(self, ms: float):
        self.ms, self.calls = ms, 0

    def prepare(self, inputs):
        return ()

    def __call__(self):
        self.calls += 1
        end = time.perf_counter() + self.ms / 1e3
        while time.perf_counter() < end:
            pass


def test_timing_effort_scales_with_the_cost_of_a_run() -> None:
    s = MeasureSettings(warmup=3, repeats=3, iters=20, min_iters=2, timed_s=0.3, max_attempts=1)
    slow, fast = Busy(60.0), Busy(0.5)
    t_slow, t_fast = measure(slow, (), s), measure(fast, (), s)
    # 60 ms a run: 0.3 s buys under one run per repeat, so the minimum holds; warm-up stops after
    # a quarter of timed_s (two runs)
    assert t_slow.runs == 3 * 2 and slow.calls == 2 + 3 * 2
    # 0.5 ms a run: capped at iters
    assert t_fast.runs == 3 * 20 and fast.calls == 3 + 3 * 20
    assert t_slow.ms > 10 * t_fast.ms


def test_measurement_settings_refuse_nonsense() -> None:
    for bad in ({"min_iters": 0}, {"timed_s": 0.0}, {"timed_s": float("nan")}):
        with pytest.raises(ValueError):
            MeasureSettings(**bad)


def _no_capture(*args, **kwargs):
    raise AssertionError("the model was captured again")


def test_exporters_take_a_captured_program_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = (torch.randn(2, 8),)
    program = torch.export.export(model, x, strict=False)
    monkeypatch.setattr(torch.export, "export", _no_capture)
    onnx_report = export_onnx(program, x, tmp_path / "m.onnx")
    pt2_report = save_program(program, x, tmp_path / "m.pt2")
    assert onnx_report.max_abs_diff < 1e-5 and pt2_report.max_abs_diff < 1e-6
    assert (tmp_path / "m.onnx").stat().st_size > 0 and (tmp_path / "m.pt2").stat().st_size > 0
    assert export_module._captured(program, x, None)[0] is program


def test_dry_run_captures_once_and_times_nothing(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    captures = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: captures.append(1) or real_export(*a, **k))

    def forbidden(*args, **kwargs):
        raise AssertionError("--dry-run timed or compiled something")

    monkeypatch.setattr(timing, "_attempt", forbidden)
    monkeypatch.setattr(_OrtTarget, "compile", forbidden)
    monkeypatch.setattr(torch.onnx, "export", forbidden)
    out = tmp_path / "never"
    assert main(_args(tiny, out, "--speedup", "1.3", "--dry-run")) == 0
    assert len(captures) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    for stage in ("calibrate", "error curves", "latency table", "allocate", "export"):
        assert stage in err
    assert any(word in err for word in ("cached:", "stale:", "missing:"))


def test_fit_points_are_optimized_like_every_other_latency_export(tmp_path: Path) -> None:
    """A fit point sliced from the dense ONNX gets the exporter's optimizer, as the torch path's
    export does: without it a CNN's padding and shape arithmetic stay in the graph and
    EfficientNet-Lite0 timed 2.7× slower than the model the job ships."""
    from collections import Counter

    import onnx

    from osscar_export.export import export_onnx_unchecked
    from osscar_export.latency.build import _fit_artifacts
    from osscar_export.passes.materialize import materialize_program
    from osscar_export.passes.structures import find_structures
    from osscar_export.targets import get_target
    from osscar_export.widths import first_mask

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, padding="same")
            self.bn = torch.nn.BatchNorm2d(16)
            self.conv2 = torch.nn.Conv2d(16, 8, 3, padding="same")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(torch.relu(self.bn(self.conv1(x))))

    x = (torch.randn(1, 3, 16, 16),)
    plan = find_structures(Net().eval(), x)
    widths = {g.name: g.count // 2 for g in plan.groups}
    logs: list[str] = []
    [artifact] = _fit_artifacts(plan, get_target("ort-cpu").for_inputs(x), {"half": widths}, tmp_path, logs.append).values()
    assert not logs, logs  # sliced, not the torch fallback
    keep = {g: first_mask(plan.group(g).count, k) for g, k in widths.items()}
    torch_path = export_onnx_unchecked(materialize_program(plan.program.module(), plan, keep), x, tmp_path / "torch.onnx")
    ops = [Counter(n.op_type for n in onnx.load(str(p)).graph.node) for p in (artifact, torch_path)]
    assert ops[0] == ops[1] and "Pad" not in ops[0], ops
