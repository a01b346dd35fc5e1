"""Giving freed memory back to the operating system between large steps."""

from __future__ import annotations

import ctypes
import gc
import platform


def release_memory() -> None:
    """Collect garbage and hand the freed heap back to the operating system. glibc keeps freed
    memory for re-use, and after a large model's ONNX exports and onnxruntime sessions that was
    gigabytes, which the next step's peak stacked on (docs/results.md, "A large-vocabulary
    stand-in")."""
    gc.collect()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
