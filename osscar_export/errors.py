"""Errors users see: each says what went wrong and what to do about it."""

from __future__ import annotations


class OsscarError(Exception):
    """Base class of every error osscar-export raises on purpose."""


class CaptureError(OsscarError):
    """The model could not be captured with torch.export (untraceable code, bad example inputs)."""


class ModelSpecError(OsscarError):
    """A model spec (name, folder, module:factory) could not be resolved."""


class PlanError(OsscarError):
    """Keep masks, group names or re-fitted weights do not fit the structure plan."""


class CalibrationDataError(OsscarError):
    """Calibration data is empty, too short, mis-shaped, of the wrong dtype or not finite."""


class ParityError(OsscarError):
    """An exported artifact does not compute what the pruned PyTorch model computes."""


class LatencyTableError(OsscarError):
    """A latency table is corrupt, or was measured for another device or target."""


class InfeasibleBudgetError(OsscarError):
    """No allocation meets the latency budget; ``min_latency_ms`` is the smallest achievable."""

    def __init__(self, message: str, min_latency_ms: float):
        super().__init__(message)
        self.min_latency_ms = min_latency_ms


class TargetUnavailableError(OsscarError):
    """The requested runtime (TensorRT, CUDA) is not installed or has no device here."""
