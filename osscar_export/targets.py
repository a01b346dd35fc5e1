"""Target runtimes: one small adapter per runtime, all with the same interface.

A ``Target`` names a runtime and every setting that changes a latency (threads, dtype and the
model's input shapes), so its ``settings()`` can key a latency table. ``compile`` turns a module
(or an ONNX file, for the ONNX runtimes) into a ``Runnable``; ``fingerprint`` describes the
machine and software the numbers are valid for. Runtimes that are absent, or that would silently
run somewhere else (onnxruntime-gpu falls back to CPU without a word), raise
``TargetUnavailableError`` instead of producing numbers for the wrong device.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np
import torch

from osscar_export.errors import TargetUnavailableError
from osscar_export.export import as_module, export_onnx_unchecked, export_tensorrt

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Compilable = torch.nn.Module | torch.export.ExportedProgram | str | os.PathLike


class Runnable(Protocol):
    """One compiled model: ``prepare`` converts inputs once, ``__call__`` runs one inference.

    Splitting the two keeps input conversion (torch → numpy, host → device) out of the timings.
    """

    def prepare(self, inputs: Sequence[torch.Tensor]) -> tuple: ...

    def __call__(self, *prepared: Any) -> Any: ...


def _cpu_model_name() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_fingerprint() -> dict[str, Any]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "cpu": _cpu_model_name(),
        "machine": platform.machine(),
        "cores": cores,
        "torch": torch.__version__,
    }


def _cast(model: torch.nn.Module, inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.nn.Module, tuple]:
    """A copy of the model and its floating-point inputs in ``dtype`` (integer inputs such as
    token ids stay); the caller's model is never converted in place."""
    if dtype == torch.float32:
        return model, tuple(inputs)
    cast_inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    return copy.deepcopy(model).to(dtype), cast_inputs


def _onnx_file(model: Compilable, inputs: Sequence[torch.Tensor], dtype: torch.dtype, folder: Path) -> tuple[Path, tuple]:
    """An ONNX file of ``model`` in ``dtype`` and the inputs cast to match: the file itself, or an
    export into ``folder``. A float32 ExportedProgram is exported without capturing it again."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model), tuple(inputs)
    if isinstance(model, torch.export.ExportedProgram) and dtype == torch.float32:
        exported, cast_inputs = model, tuple(inputs)
    else:
        exported, cast_inputs = _cast(as_module(model), inputs, dtype)
    return export_onnx_unchecked(exported, cast_inputs, folder / "model.onnx"), cast_inputs


@dataclass(frozen=True)
class Target:
    """A runtime with every setting that affects latency. Subclasses implement ``compile``."""

    name: ClassVar[str] = "target"
    # The job times the artifact a target runs: the exported model.onnx (onnxruntime, TensorRT),
    # or the pruned torch module (torch), which has no ONNX file to run.
    runs_onnx: ClassVar[bool] = True
    threads: int = 1
    dtype: str = "float32"
    input_shapes: tuple[tuple[int, ...], ...] = ()  # the model's inputs (batch, sequence / image size)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"target {self.name}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.threads < 1:
            raise ValueError(f"target {self.name}: threads must be >= 1, got {self.threads}")

    def for_inputs(self, inputs: Sequence[torch.Tensor]) -> "Target":
        """This target with ``input_shapes`` taken from the model's example inputs."""
        return replace(self, input_shapes=tuple(tuple(t.shape) for t in inputs))

    def settings(self) -> dict[str, Any]:
        """Everything about the target that changes a measured latency (part of a table's key)."""
        return {
            "name": self.name,
            "threads": self.threads,
            "dtype": self.dtype,
            "input_shapes": [list(s) for s in self.input_shapes],
        }

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def fingerprint(self) -> dict[str, Any]:
        """The machine and software a latency measured on this target is valid for."""
        raise NotImplementedError

    def runs_on_calling_thread(self) -> bool:
        """True when all work runs on the caller's thread (single-threaded CPU): only then does
        the thread CPU-time clock measure it."""
        return False

    def compile(self, model: Compilable, example_inputs: Sequence[torch.Tensor]) -> Runnable:
        raise NotImplementedError

    def artifact(self, model: Compilable, example_inputs: Sequence[torch.Tensor], folder: Path) -> Compilable:
        """What ``compile`` takes, made once: a target that runs ONNX gets the file, written into
        ``folder``, so a model can be compiled again later without exporting it again; others
        get the model itself."""
        return _onnx_file(model, example_inputs, self.torch_dtype, folder)[0] if self.runs_onnx else model


# --------------------------------------------------------------------------------------------
# onnxruntime


_ORT_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


class OrtRunnable:
    """An onnxruntime session fed positionally; inputs become numpy of the model's input types
    once, in ``prepare`` (a float16 model gets float16 arrays from float32 example tensors)."""

    def __init__(self, session: Any):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.input_types = [_ORT_NUMPY.get(i.type) for i in session.get_inputs()]

    def prepare(self, inputs: Sequence[torch.Tensor]) -> tuple:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"the ONNX model takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}"
            )
        feed = {}
        for name, typ, t in zip(self.input_names, self.input_types, inputs):
            array = t.detach().cpu().numpy()
            feed[name] = array.astype(typ, copy=False) if typ is not None else array
        return (feed,)

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feed)


@dataclass(frozen=True)
class _OrtTarget(Target):
    """Shared onnxruntime adapter; subclasses name the execution providers they require."""

    providers: ClassVar[tuple[str, ...]] = ("CPUExecutionProvider",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype == "bfloat16":
            raise ValueError(f"target {self.name}: dtype bfloat16 is not supported; use float32 or float16")

    def _session(self, onnx_path: str | os.PathLike) -> Any:
        import onnxruntime as ort

        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise TargetUnavailableError(
                f"target {self.name}: onnxruntime {ort.__version__} has no {', '.join(missing)} "
                f"(available: {', '.join(ort.get_available_providers())}); install the matching "
                "onnxruntime build or choose --target ort-cpu"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=list(self.providers))
        in_use = session.get_providers()
        if in_use[0] != self.providers[0]:
            # onnxruntime-gpu falls back to CPU silently when CUDA / TensorRT cannot start.
            raise TargetUnavailableError(
                f"target {self.name}: onnxruntime asked for {self.providers[0]} but runs on "
                f"{in_use[0]} (providers in use: {in_use}); no usable device for this provider"
            )
        return session

    @functools.cached_property
    def _providers_in_use(self) -> list[str]:
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        # IR 8 / opset 17: old enough for every onnxruntime this project supports
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            onnx.save(probe, str(path))
            return list(self._session(path).get_providers())

    def fingerprint(self) -> dict[str, Any]:
        import onnxruntime as ort

        fp = _host_fingerprint()
        fp.update(onnxruntime=ort.__version__, providers=self._providers_in_use)
        if self.providers[0] != "CPUExecutionProvider" and torch.cuda.is_available():
            fp["gpu"] = torch.cuda.get_device_name(0)
        return fp

    def compile(self, model: Compilable, example_inputs: Sequence[torch.Tensor]) -> OrtRunnable:
        """An onnxruntime session; a torch module is exported to ONNX in a temporary folder first."""
        if isinstance(model, (str, os.PathLike)):
            return OrtRunnable(self._session(model))
        with tempfile.TemporaryDirectory(prefix="osscar-latency-") as tmp:
            path, _ = _onnx_file(model, example_inputs, self.torch_dtype, Path(tmp))
            return OrtRunnable(self._session(path))


@dataclass(frozen=True)
class OrtCpuTarget(_OrtTarget):
    name: ClassVar[str] = "ort-cpu"
    providers: ClassVar[tuple[str, ...]] = ("CPUExecutionProvider",)

    def runs_on_calling_thread(self) -> bool:
        return self.threads == 1  # one intra-op thread: onnxruntime creates no pool


@dataclass(frozen=True)
class OrtCudaTarget(_OrtTarget):
    name: ClassVar[str] = "ort-cuda"
    providers: ClassVar[tuple[str, ...]] = ("CUDAExecutionProvider", "CPUExecutionProvider")


# --------------------------------------------------------------------------------------------
# TensorRT (native engine built from the ONNX file)


class TrtRunnable:
    """A TensorRT execution context bound to CUDA tensors; ``__call__`` runs and synchronises."""

    def __init__(self, engine: Any):
        import tensorrt as trt

        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def prepare(self, inputs: Sequence[torch.Tensor]) -> tuple:
        import tensorrt as trt

        if len(inputs) != len(self.inputs):
            raise ValueError(f"the TensorRT engine takes {len(self.inputs)} inputs {self.inputs}, got {len(inputs)}")
        bound = []
        for name, t in zip(self.inputs, inputs):
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            t = t.detach().to("cuda", dtype).contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            bound.append(t)
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            out = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            bound.append(out)
        return (bound,)

    def __call__(self, bound: list[torch.Tensor]) -> list[torch.Tensor]:
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return bound[len(self.inputs):]


@dataclass(frozen=True)
class TensorRTTarget(Target):
    name: ClassVar[str] = "tensorrt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype == "bfloat16":
            raise ValueError("target tensorrt: dtype bfloat16 is not supported; use float32 or float16")

    def _trt(self) -> Any:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise TargetUnavailableError(
                "target tensorrt: the `tensorrt` Python package is not installed (it needs an NVIDIA "
                "GPU and `pip install tensorrt`); choose --target ort-cpu or torch"
            ) from e
        if not torch.cuda.is_available():
            raise TargetUnavailableError("target tensorrt: TensorRT is installed but no CUDA device is visible")
        return trt

    def fingerprint(self) -> dict[str, Any]:
        trt = self._trt()
        fp = _host_fingerprint()
        fp.update(tensorrt=trt.__version__, gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
        return fp

    def compile(self, model: Compilable, example_inputs: Sequence[torch.Tensor]) -> TrtRunnable:
        """An engine built (and parity-checked) by ``export_tensorrt`` from ONNX; a torch module is
        exported to ONNX first."""
        trt = self._trt()
        with tempfile.TemporaryDirectory(prefix="osscar-trt-") as tmp:
            onnx_path, inputs = _onnx_file(model, example_inputs, self.torch_dtype, Path(tmp))
            engine_path = Path(tmp) / "model.engine"
            export_tensorrt(onnx_path, engine_path, inputs, fp16=self.dtype == "float16")
            engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(engine_path.read_bytes())
        return TrtRunnable(engine)


# --------------------------------------------------------------------------------------------
# eager torch


class TorchRunnable:
    """Eager PyTorch under ``inference_mode`` with the target's thread count; CUDA is synchronised."""

    def __init__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype, threads: int):
        self.module = module
        self.device = device
        self.dtype = dtype
        self.threads = threads

    def prepare(self, inputs: Sequence[torch.Tensor]) -> tuple:
        """Inputs on the device, floating ones in the target dtype."""
        return tuple(
            t.detach().to(self.device, self.dtype if t.is_floating_point() else t.dtype) for t in inputs
        )

    def __call__(self, *inputs: torch.Tensor) -> Any:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = self.module(*inputs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return out
        finally:
            torch.set_num_threads(previous)


@dataclass(frozen=True)
class TorchTarget(Target):
    name: ClassVar[str] = "torch"
    runs_onnx: ClassVar[bool] = False
    device: str = "cpu"

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "device": self.device}

    def runs_on_calling_thread(self) -> bool:
        return self.threads == 1 and torch.device(self.device).type == "cpu"

    def _device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TargetUnavailableError(f"target torch: device {self.device!r} requested but CUDA is not available")
        return device

    def fingerprint(self) -> dict[str, Any]:
        device = self._device()
        fp = _host_fingerprint()
        fp["device"] = str(device)
        if device.type == "cuda":
            fp.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        return fp

    def compile(self, model: Compilable, example_inputs: Sequence[torch.Tensor]) -> TorchRunnable:
        if isinstance(model, (str, os.PathLike)):
            raise TypeError("target torch runs torch modules, not ONNX files; use --target ort-cpu for ONNX")
        device = self._device()
        module, _ = _cast(as_module(model), example_inputs, self.torch_dtype)
        if device.type != "cpu":
            module = copy.deepcopy(module).to(device)  # the caller's model stays where it is
        return TorchRunnable(module, device, self.torch_dtype, self.threads)


TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (OrtCpuTarget, OrtCudaTarget, TensorRTTarget, TorchTarget)
}


def get_target(name: str = "ort-cpu", **settings: Any) -> Target:
    """The target called ``name`` (``ort-cpu``, ``ort-cuda``, ``tensorrt``, ``torch``) with ``settings``."""
    try:
        cls = TARGETS[name]
    except KeyError:
        raise TargetUnavailableError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None
    return cls(**settings)
