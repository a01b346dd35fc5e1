"""``--keep-fraction``: pruning to fixed fractions instead of a latency budget, with no latency
table, search or timing, and clear errors for fractions that make no sense."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from osscar_export import pipeline
from osscar_export.cli import EXIT_ERROR, EXIT_OK, main
from osscar_export.errors import OsscarError
from osscar_export.job import JobConfig, parse_keep_fraction
from osscar_export.passes.structures import find_structures
from osscar_export.report import FIXED_REPORT_SCHEMA
from tests.models_zoo import llama_gqa
from tests.test_cli import _error


def _args(tiny: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [tiny["spec"], "--calib", tiny["calib"], "--n-calib", "4", "--out", str(out), *extra]


@pytest.mark.parametrize(("text", "pairs"), [
    ("0.5", (("*", 0.5),)),
    ("1", (("*", 1.0),)),
    ("neuron=0.5, kv_group=0.67", (("neuron", 0.5), ("kv_group", 0.67))),
])
def test_parsing(text: str, pairs: tuple) -> None:
    assert parse_keep_fraction(text) == pairs
    JobConfig(model="m", keep_fraction=pairs)  # valid


@pytest.mark.parametrize(("text", "message"), [
    ("1.5", "a kept fraction must be above 0 and at most 1"),
    ("0", "a kept fraction must be above 0 and at most 1"),
    ("nan", "a kept fraction must be above 0 and at most 1"),
    ("neuron=-0.1", "--keep-fraction neuron=-0.1: a kept fraction must be above 0"),
    ("half", "the fraction 'half' is not a number"),
    ("neurons=0.5", "unknown kind 'neurons'; the kinds are channel, neuron, head, kv_group"),
    ("neuron=0.5,neuron=0.6", "'neuron' is given twice"),
    ("neuron=0.5,0.6", "'0.6' is not KIND=FRACTION"),
    ("*=0.5,neuron=0.6", "unknown kind '*'"),
])
def test_bad_fractions_are_refused(text: str, message: str) -> None:
    with pytest.raises(OsscarError, match="--keep-fraction") as e:
        JobConfig(model="m", keep_fraction=parse_keep_fraction(text))
    assert message in str(e.value)


def test_a_fraction_and_a_budget_are_refused_together() -> None:
    with pytest.raises(OsscarError, match="give it or --latency-ms / --speedup, not both"):
        JobConfig(model="m", speedup=(1.5,), keep_fraction=(("*", 0.5),))


def test_widths_follow_each_kind_and_leave_the_others_whole() -> None:
    model, inputs = llama_gqa(layers=1, intermediate=128)
    plan = find_structures(model, inputs)
    kinds = {g.name: (g.kind, g.count) for g in plan.groups}
    assert sorted(k for k, _ in kinds.values()) == ["kv_group", "neuron"]
    only_neurons = pipeline._fixed_widths(JobConfig(model="m", keep_fraction=(("neuron", 0.3),)), plan)
    for name, (kind, count) in kinds.items():
        assert only_neurons[name] == (38 if kind == "neuron" else count)  # round(0.3 * 128); KV groups stay whole
    every = pipeline._fixed_widths(JobConfig(model="m", keep_fraction=(("*", 0.67),)), plan)
    assert {kinds[n][0]: w for n, w in every.items()} == {"neuron": 86, "kv_group": 2}
    with pytest.raises(OsscarError, match=r"--keep-fraction: keep_fraction names \['channel'\], which are neither"):
        pipeline._fixed_widths(JobConfig(model="m", keep_fraction=(("channel", 0.5),)), plan)


def test_the_job_times_nothing_and_reports_the_fractions(tiny: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def no_timing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a fixed-fraction job timed something")

    monkeypatch.setattr(pipeline, "measure_latency", no_timing)
    monkeypatch.setattr(pipeline, "measure", no_timing)
    monkeypatch.setattr(pipeline, "error_curves", no_timing)
    out = tmp_path / "out"
    assert main(_args(tiny, out, "--keep-fraction", "neuron=0.5")) == EXIT_OK
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt2", "report.json", "report.md"}
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, FIXED_REPORT_SCHEMA)
    assert report["keep_fraction"] == {"neuron": 0.5}
    assert {g["name"]: (g["kept"], g["allocated"], g["count"]) for g in report["groups"]} == {
        "fc1.neuron": (128, 128, 256), "fc2.neuron": (32, 32, 64), "fc3.neuron": (128, 128, 256)}
    assert set(report["parity"]) == {"onnx", "pt2"}
    assert "no latency budget, nothing timed" in (out / "report.md").read_text()


def test_no_budget_and_no_fraction_is_refused(tiny: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_args(tiny, tmp_path / "out")) == EXIT_ERROR
    assert "or fixed fractions: --keep-fraction F" in _error(capsys)
    assert main(_args(tiny, tmp_path / "out", "--keep-fraction", "2")) == EXIT_ERROR
    assert "--keep-fraction 2: a kept fraction must be above 0 and at most 1" in _error(capsys)
    assert not (tmp_path / "out").exists()
