"""``--target torch`` runs the whole job: the pruned torch module is timed, not ``model.onnx``.

The torch target runs torch modules only; the job used to hand it the exported ONNX file and
died with a TypeError after pruning and export (issue 13, item 10).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from osscar_export.cli import main
from osscar_export.targets import TARGETS
from tests.test_cli import _args


def test_job_on_the_torch_target_times_the_pruned_module(tiny: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "torch"
    # a budget far above the tiny model's latency: met whatever the machine's load, so exit 0
    code = main(_args(tiny, out, "--target", "torch", "--latency-ms", "1000", "--mode", "sequential", "--no-search"))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["name"] == "torch"
    assert report["meets_budget"] and 0 < report["measured_ms"] < 1000
    assert (out / "model.onnx").exists() and (out / "model.pt2").exists()


@pytest.mark.parametrize("name, onnx", [("ort-cpu", True), ("ort-cuda", True), ("tensorrt", True), ("torch", False)])
def test_each_target_says_whether_it_runs_the_onnx_file(name: str, onnx: bool) -> None:
    assert TARGETS[name].runs_onnx is onnx
