"""Capture a model as a ``torch.export.ExportedProgram`` (non-strict), the graph every pass reads.

Non-strict export traces through Python (transformers models, torchvision models) with fake
tensors, so the structure analysis sees real ATen ops (``aten.linear``, ``aten.conv2d``,
``aten.scaled_dot_product_attention``) and parameter FQNs. The model is captured in eval mode
(dropout off, BatchNorm running statistics) and its own train/eval flags are restored after.
``Capture`` is the same step as a pass (see docs/design.md, "Passes").
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from osscar_export.errors import CaptureError
from osscar_export.passes.base import Pass, PassResult, PruneState


_TORCH_ADVICE = ("For more information", "For extended logs", "If you suspect", "For more debugging help",
                 "For C++ stack trace", "The error above occurred when calling torch.export")


def _essence(exc: BaseException) -> str:
    """The cause of a long torch error on one line: its first line and its last line that is not
    generic torch advice (often the user code that raised, with its location), never cut mid-way."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_TORCH_ADVICE)] or lines
    if len(lines) <= 2:
        return f"{type(exc).__name__}: {' '.join(lines)}"
    last = f"{lines[-2]}: {lines[-1]}" if lines[-2].startswith('File "') else lines[-1]
    return f"{type(exc).__name__}: {lines[0]} … {last}"


@contextlib.contextmanager
def _stderr_only_on_success() -> Iterator[None]:
    """Hold what torch writes to stderr while exporting and pass it on only if export succeeds: on
    a failure torch prints the partial graph (twice) and logs the error, so the user would read it
    all before our message. With TORCH_LOGS set (debugging torch) everything goes through."""
    if os.environ.get("TORCH_LOGS"):
        yield
        return
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())


def _describe(inputs: tuple[Any, ...]) -> str:
    """Shape and dtype of each input, so a mismatch with the model is visible in the error."""
    return ", ".join(
        f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor) else type(x).__name__
        for x in inputs
    )


def capture(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    dynamic_shapes: Any = None,
) -> torch.export.ExportedProgram:
    """Export ``model`` on ``example_inputs``; raise ``CaptureError`` saying why it failed."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise CaptureError(
            f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}"
        )
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        with _stderr_only_on_success():
            return torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types; name the model and cause
        model_name = type(model).__name__
        try:  # a forward that fails outside export too: the inputs, not the tracing, are wrong
            with torch.no_grad():
                model(*example_inputs)
        except Exception as eager:  # user code: any failure means the inputs do not fit
            raise CaptureError(
                f"the example inputs do not fit {model_name}: its forward fails on them even without "
                f"torch.export ({_essence(eager)}). Inputs given: {_describe(example_inputs)}; pass "
                f"example inputs with the shapes and dtypes the model takes."
            ) from exc
        raise CaptureError(
            f"torch.export could not capture {model_name} ({_essence(exc)}). The forward runs on the "
            f"example inputs, so it is not traceable: remove data-dependent Python control flow, "
            f"take and return tensors only, fix dynamic_shapes, or pass an ExportedProgram."
        ) from exc
    finally:
        for name, m in model.named_modules():
            m.training = modes.get(name, m.training)


class Capture(Pass):
    """model + example_inputs -> program. Only reads the model (its train/eval flags come back)."""

    name = "capture"
    requires = ("model",)
    ensures = ("program",)

    def __init__(self, dynamic_shapes: Any = None):
        self.dynamic_shapes = dynamic_shapes

    def run(self, state: PruneState) -> PassResult:
        program = capture(state.model, state.example_inputs, self.dynamic_shapes)
        return PassResult(state.replace(program=program), changed=False)
