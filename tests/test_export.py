"""Exporters: artifacts are parity-checked before they land, and a failed check leaves nothing."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import osscar_export.export as export
from osscar_export.errors import ParityError, TargetUnavailableError
from osscar_export.export import export_onnx, export_tensorrt, save_program


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class TokenNet(nn.Module):
    """Two inputs, one of them integer: exercises input order and dtypes in onnxruntime."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 7)

    def forward(self, ids, mask):
        h = self.emb(ids) * mask[..., None]
        return self.fc(h).sum(1)


def _net() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 3, 8, 8),)


def _ort(path, args):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]


def test_onnx_parity_and_extra_inputs(tmp_path) -> None:
    model, args = _net()
    extra = [(torch.randn(2, 3, 8, 8),), (torch.randn(2, 3, 8, 8) * 3,)]
    rep = export_onnx(model, args, tmp_path / "net.onnx", extra_inputs=extra)
    assert rep.runtime == "onnxruntime/CPUExecutionProvider"
    assert 0 <= rep.max_abs_diff <= rep.atol + rep.rtol * rep.max_abs_ref
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]
    with torch.no_grad():
        want = model(*extra[1])[0]
    np.testing.assert_allclose(_ort(rep.path, extra[1])[0], want.numpy(), rtol=1e-4, atol=1e-5)


def test_onnx_two_inputs_integer_ids(tmp_path) -> None:
    torch.manual_seed(0)
    model = TokenNet().eval()
    args = (torch.randint(0, 50, (2, 6)), torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3]))
    rep = export_onnx(model, args, tmp_path / "tok.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(_ort(rep.path, args), model(*args).numpy(), rtol=1e-4, atol=1e-5)


def test_onnx_dynamic_sequence(tmp_path) -> None:
    torch.manual_seed(0)
    model = TokenNet().eval()
    args = (torch.randint(0, 50, (2, 6)), torch.ones(2, 6))
    seq = torch.export.Dim("seq")
    longer = (torch.randint(0, 50, (2, 11)), torch.ones(2, 11))
    rep = export_onnx(model, args, tmp_path / "tok.onnx", dynamic_shapes=({1: seq}, {1: seq}), extra_inputs=[longer])
    with torch.no_grad():
        np.testing.assert_allclose(_ort(rep.path, longer), model(*longer).numpy(), rtol=1e-4, atol=1e-5)


def test_onnx_external_data_lands_beside_the_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(export, "_INLINE_WEIGHT_LIMIT", 0)
    model, args = _net()
    rep = export_onnx(model, args, tmp_path / "net.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.onnx.data"]
    with torch.no_grad():
        np.testing.assert_allclose(_ort(rep.path, args), model(*args).numpy(), rtol=1e-4, atol=1e-5)


def test_failed_onnx_parity_leaves_no_file(tmp_path, monkeypatch) -> None:
    model, args = _net()
    real_run = export._run_ort
    monkeypatch.setattr(export, "_run_ort", lambda s, a: [o + 0.5 for o in real_run(s, a)])
    with pytest.raises(ParityError, match="differs from the reference"):
        export_onnx(model, args, tmp_path / "net.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_onnx_parity_keeps_previous_artifact(tmp_path) -> None:
    model, args = _net()
    old = tmp_path / "net.onnx"
    old.write_bytes(b"previous artifact")
    with pytest.raises(ParityError):  # a negative tolerance no artifact can meet
        export_onnx(model, args, old, atol=-1.0, rtol=0.0)
    assert old.read_bytes() == b"previous artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]


def test_unavailable_provider(tmp_path) -> None:
    model, args = _net()
    with pytest.raises(TargetUnavailableError, match="unknown onnxruntime provider"):
        export_onnx(model, args, tmp_path / "a.onnx", provider="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(TargetUnavailableError, match="CUDAExecutionProvider"):
            export_onnx(model, args, tmp_path / "a.onnx", provider="cuda")
    assert list(tmp_path.iterdir()) == []


def test_save_program_round_trip(tmp_path) -> None:
    model, args = _net()
    rep = save_program(model, args, tmp_path / "net.pt2")
    assert rep.max_abs_diff <= 1e-6
    loaded = torch.export.load(rep.path).module()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt2"]


def test_failed_save_program_leaves_no_file(tmp_path, monkeypatch) -> None:
    model, args = _net()

    class Wrong(nn.Module):
        def forward(self, x):
            return torch.zeros(2, 5)

    monkeypatch.setattr(export.torch.export, "load", lambda p: torch.export.export(Wrong(), args, strict=False))
    with pytest.raises(ParityError, match="reloaded .pt2"):
        save_program(model, args, tmp_path / "net.pt2")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_unavailable_is_clear(tmp_path) -> None:
    model, args = _net()
    onnx = export_onnx(model, args, tmp_path / "net.onnx").path
    with pytest.raises(TargetUnavailableError, match="TensorRT is not installed"):
        export_tensorrt(onnx, tmp_path / "net.engine", args)
    assert not (tmp_path / "net.engine").exists()
