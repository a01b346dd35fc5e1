"""Capture a model as a ``torch.export.ExportedProgram`` (non-strict), the graph every pass reads.

Non-strict export traces through Python (transformers models, torchvision models) with fake
tensors, so the structure analysis sees real ATen ops (``aten.linear``, ``aten.conv2d``,
``aten.scaled_dot_product_attention``) and parameter FQNs. The model is captured in eval mode
(dropout off, BatchNorm running statistics) and its own train/eval flags are restored after.
``Capture`` is the same step as a pass (see docs/design.md, "Passes").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from osscar_export.errors import CaptureError
from osscar_export.passes.base import Pass, PassResult, PruneState


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
        return torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types; name the model and cause
        detail = " ".join(str(exc).split())[:600]
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} ({type(exc).__name__}: {detail}). "
            f"Make the forward traceable (no data-dependent Python control flow, tensor inputs and "
            f"outputs only), fix dynamic_shapes, or pass an ExportedProgram."
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
