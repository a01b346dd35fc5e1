"""Bad inputs get a specific OsscarError (or, in the solver, a ValueError) that says what to do:
never a traceback, a message cut short, torch's noise, or a silent coercion (issue 13, items 8–9)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from osscar_export import solver
from osscar_export.calibration_data import tensor_file
from osscar_export.cli import main
from osscar_export.errors import CalibrationDataError, CaptureError, ModelSpecError, PlanError
from osscar_export.models import load_model
from osscar_export.passes.capture import capture
from osscar_export.passes.structures import find_structures
from osscar_export.prune import prune, resolve_widths


class DataDependent(nn.Module):
    """Branches on a tensor value: runs eagerly, cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(x) * 2


def data_dependent() -> tuple[nn.Module, tuple[torch.Tensor]]:
    return DataDependent().eval(), (torch.randn(4, 8),)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _one_line(text: str) -> str:
    """Rich wraps the CLI's message at the console width; compare it unwrapped."""
    return " ".join(text.split())


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path for throw-away factory modules (dropped from sys.modules after)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("issue13_")]:
        del sys.modules[name]


# 1 ------------------------------------------------------------------ module:factory specs


def test_factory_modules_that_fail_to_import_name_the_module_and_the_cause(modules: Path) -> None:
    (modules / "issue13_raises.py").write_text("raise RuntimeError('no GPU here')\ndef build(): pass\n")
    (modules / "issue13_syntax.py").write_text("def build(:\n    pass\n")
    cases = {
        "issue13_raises:build": "'issue13_raises:build': importing module 'issue13_raises' raised RuntimeError: no GPU here",
        "issue13_syntax:build": "'issue13_syntax:build': importing module 'issue13_syntax' raised SyntaxError: invalid syntax",
        ":build": "':build': the module name before ':' is empty; write 'module:factory'",
        "issue13_raises:": "'issue13_raises:': the factory name after ':' is empty",
    }
    for spec, message in cases.items():
        with pytest.raises(ModelSpecError, match=re.escape(message)):
            load_model(spec)


def test_cli_prints_a_factory_import_failure_once_and_exits_2(
    modules: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OSSCAR_CACHE", str(modules / "cache"))
    (modules / "issue13_cli.py").write_text("raise ValueError('bad [config] value')\n")
    args = ["--speedup", "2", "--out", str(modules / "out"), "--tables", str(modules / "tables")]
    assert main(["issue13_cli:build", *args]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "importing module 'issue13_cli' raised ValueError: bad [config] value" in err  # brackets kept


# 2 ------------------------------------------------------------------ partial batches


def test_a_tensor_file_with_a_partial_last_batch_drops_it_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "five.pt"
    torch.save(torch.randn(5, 8), path)
    with pytest.warns(UserWarning, match=re.escape(
        "five.pt: 5 samples are not a multiple of the batch size 2; using the first 4 and dropping the last 1"
    )):
        batches = tensor_file(path, (torch.zeros(2, 8),))
    assert [b[0].shape for b in batches] == [(2, 8)] * 2
    with pytest.raises(CalibrationDataError, match="holds 1 samples, fewer than one batch of 2"):
        torch.save(torch.randn(1, 8), path)
        tensor_file(path, (torch.zeros(2, 8),))
    torch.save([torch.randn(2, 8), torch.randn(1, 8)], path)  # a list of batches, the last short
    with pytest.raises(CalibrationDataError, match="batch 1 has 1 samples, the model takes batches of 2"):
        tensor_file(path, (torch.zeros(2, 8),))


# 3 ------------------------------------------------------------------ dtype through the API


def test_prune_names_a_calibration_batch_of_the_wrong_dtype() -> None:
    x = torch.randn(4, 8)
    message = "calibration batch 0 input 0 has dtype torch.float64, expected torch.float32 (the model's weights)"
    with pytest.raises(CalibrationDataError, match=re.escape(message)):
        prune(_mlp(), [x.double()], keep_fraction=0.5, progress=False)
    with pytest.raises(CalibrationDataError, match="calibration batch 1 input 0 has dtype torch.float64"):
        prune(_mlp(), [x, x.double()], keep_fraction=0.5, progress=False)


# 4 ------------------------------------------------------------------ shape vs traceability


def test_capture_tells_inputs_that_do_not_fit_from_an_untraceable_model() -> None:
    with pytest.raises(CaptureError, match=re.escape(
        "the example inputs do not fit Linear: its forward fails on them even without torch.export "
        "(RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x7 and 8x16)). Inputs given: (4, 7) float32"
    )) as info:
        capture(nn.Linear(8, 16), (torch.randn(4, 7),))
    assert "traceable" not in str(info.value)
    with pytest.raises(CaptureError, match="could not capture DataDependent .* so it is not traceable"):
        capture(*data_dependent())


# 5 ------------------------------------------------------------------ unreadable .pt files


def test_unreadable_tensor_files_say_what_the_file_must_contain(tmp_path: Path) -> None:
    example = (torch.zeros(2, 8),)
    must = "A calibration .pt/.pth file must be written by torch.save and hold a tensor (samples × input dims)"
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CalibrationDataError, match=re.escape(f"empty.pt: the file is empty. {must}")):
        tensor_file(tmp_path / "empty.pt", example)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file \x00\x01")
    with pytest.raises(CalibrationDataError, match=re.escape("garbage.pt: it is not a torch.save file of tensors")) as info:
        tensor_file(tmp_path / "garbage.pt", example)
    assert must in str(info.value) and "weights_only" not in str(info.value)


# 6 ------------------------------------------------------------------ capture errors, once and whole


def test_a_capture_error_is_printed_once_with_its_cause_and_location(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(CaptureError) as info:
        capture(*data_dependent())
    message = str(info.value)
    assert "Could not guard on data-dependent expression" in message  # the first line of torch's error
    assert re.search(r'File ".*test_errors.py", line \d+, in forward: if x.sum\(\) > 0:', message)  # its last
    assert message.endswith("or pass an ExportedProgram.")  # not cut
    assert "draft_export" not in message  # torch's generic advice is left out
    streams = capsys.readouterr()
    assert "def forward" not in streams.err + streams.out  # torch's partial graph is not printed (twice)


# 7 ------------------------------------------------------------------ all-zero calibration


def test_all_zero_calibration_data_warns() -> None:
    with pytest.warns(UserWarning, match=re.escape(
        "calibration data is all zeros (every floating-point input of every batch): the Gram matrices come out zero"
    )):
        prune(_mlp(), [torch.zeros(4, 8)] * 2, keep_fraction=0.5, progress=False)


# 8 ------------------------------------------------------------------ no silent coercion


def test_widths_and_fractions_are_not_coerced() -> None:
    plan = find_structures(_mlp(), (torch.randn(4, 8),))
    name = plan.groups[0].name
    with pytest.raises(PlanError, match=re.escape(f"widths[{name!r}] = 2.7 is a float; give an integer count")):
        resolve_widths(plan, None, {name: 2.7})
    with pytest.raises(PlanError, match=re.escape(f"widths[{name!r}] = True is a bool")):
        resolve_widths(plan, None, {name: True})
    assert resolve_widths(plan, None, {name: np.int64(3)})[name] == 3
    for fraction, kind in (("0.5", "str"), (True, "bool"), ({name: "0.5"}, "str")):
        with pytest.raises(PlanError, match=f"keep fraction .* for group {name!r} is a {kind}; give a number in"):
            resolve_widths(plan, fraction, None)
    assert resolve_widths(plan, np.float32(0.5), None)[name] == 8


# 9 ------------------------------------------------------------------ solver counts


def test_prune_layer_accepts_any_integral_count() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    XtX, W = X.T @ X, torch.randn(6, 3, generator=gen, dtype=torch.float64)
    plain = solver.prune_layer(XtX, W, 2, 2)
    numpy = solver.prune_layer(XtX, W, np.int64(2), np.int64(2))
    assert torch.equal(plain.mask, numpy.mask) and torch.equal(plain.weight, numpy.weight)
    for width in (2.0, True):
        with pytest.raises(ValueError, match="width must be an integer number of groups"):
            solver.prune_layer(XtX, W, 2, width)
    curve = solver.error_curve(XtX, W, 2, np.array([1, 2]))
    assert curve.levels == (1, 2) and all(type(k) is int for k in curve.levels)
