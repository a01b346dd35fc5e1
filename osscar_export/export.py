"""Exporters: ONNX (checked in onnxruntime), .pt2 (checked by loading it back), TensorRT.

Every exporter writes beside the destination, runs the written artifact on the example inputs,
compares it with the reference and only then moves it into place: an artifact at its final path
computes what the pruned model computes, and a failed check leaves no file behind (docs/design.md, "Export").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from osscar_export.atomic import atomic_path
from osscar_export.errors import ParityError, TargetUnavailableError

# Above this much weight data the ONNX keeps it in a side file: a protobuf may not exceed 2 GiB,
# and one serialized in memory costs the model's size twice over at once (a 1 GB model's export
# peaked 2 GB above the job's other memory).
_INLINE_WEIGHT_LIMIT = 512 << 20
_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class ExportReport:
    """What an exporter wrote and how close the artifact came to its reference.

    The check passed when, for every output, max|artifact − reference| ≤ atol + rtol·max|reference|.
    """

    path: Path
    runtime: str  # what ran the artifact, e.g. "onnxruntime/CPUExecutionProvider"
    max_abs_diff: float  # over every output of every checked input set
    max_abs_ref: float
    atol: float
    rtol: float
    seconds: float


def _tensor_leaves(tree) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _compare(
    got: Sequence[np.ndarray | torch.Tensor], want: Sequence[torch.Tensor], atol: float, rtol: float, what: str
) -> tuple[float, float]:
    """(max abs diff, max abs reference) over the outputs; ParityError when one is off."""
    if len(got) != len(want):
        raise ParityError(f"{what}: {len(got)} outputs, the reference has {len(want)}")
    diffs, refs = [0.0], [0.0]
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.as_tensor(g).detach().cpu().double()
        w = w.detach().cpu().double()
        if tuple(g.shape) != tuple(w.shape):
            raise ParityError(f"{what}: output {i} has shape {tuple(g.shape)}, the reference {tuple(w.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise ParityError(f"{what}: output {i} has non-finite values")
        diff = float((g - w).abs().max()) if w.numel() else 0.0
        ref = float(w.abs().max()) if w.numel() else 0.0
        allowed = atol + rtol * ref
        if not diff <= allowed:
            raise ParityError(
                f"{what}: output {i} differs from the reference by {diff:.3g} (max |ref| {ref:.3g}, "
                f"allowed {allowed:.3g} = atol {atol:g} + rtol {rtol:g}·max|ref|)"
            )
        diffs.append(diff)
        refs.append(ref)
    return max(diffs), max(refs)


def _reference(module: torch.nn.Module, inputs: Sequence[tuple]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [_tensor_leaves(module(*args)) for args in inputs]


Exportable = torch.nn.Module | torch.export.ExportedProgram


def _captured(model: Exportable, args: tuple, dynamic_shapes: Any) -> tuple[torch.export.ExportedProgram, torch.nn.Module]:
    """The program to export and the module it is checked against. A program (``materialize``'s
    capture) is taken as it is: capturing a model again costs seconds and gives the same graph."""
    if isinstance(model, torch.export.ExportedProgram):
        return model, model.module()
    return torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False), model


def _ort_session(path: Path, provider: str):
    import onnxruntime as ort

    if provider not in _ORT_PROVIDERS:
        raise TargetUnavailableError(
            f"unknown onnxruntime provider {provider!r}; choose one of {sorted(_ORT_PROVIDERS)}"
        )
    name = _ORT_PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise TargetUnavailableError(
            f"onnxruntime has no {name} here (available: {available}); install onnxruntime-gpu with a "
            "matching CUDA for provider 'cuda', or use provider='cpu'"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=[name])


def _run_ort(session, args: tuple) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    tensors = _tensor_leaves(args)
    if len(names) != len(tensors):
        raise ParityError(f"the ONNX model takes inputs {names}, the example has {len(tensors)} tensors")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
    return session.run(None, feed)


def as_module(model: torch.nn.Module | torch.export.ExportedProgram) -> torch.nn.Module:
    """A module in inference mode (``eval()`` is set in place: latency is an inference property).
    Modules from ``ExportedProgram.module()`` refuse ``eval()``: their train/eval behaviour was
    fixed when they were captured, so they are used as they are."""
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    try:
        return model.eval()
    except NotImplementedError:
        return model


def export_onnx_unchecked(model: torch.nn.Module | torch.export.ExportedProgram, inputs: Sequence[torch.Tensor], path: Path) -> Path:
    """Export to ONNX with the dynamo exporter, without a parity check.

    Latency measurement exports dozens of model variants; their numerics do not matter, only
    their cost, so the parity-checked exporter ``export_onnx`` is not needed here. An
    ExportedProgram is translated as it is (no second capture). The exporter's optimizer stays
    on: without it EfficientNet-Lite0 runs 2.7× slower in onnxruntime (its padding and shape
    arithmetic stay in the graph), so a latency measured without it would not be the shipped
    model's (docs/results.md, "Job speed").
    """
    if isinstance(model, torch.nn.Module):
        model = as_module(model)
    with warnings.catch_warnings():
        # modules from ExportedProgram.module() report training=True, but their behaviour was
        # fixed at capture; every other module was put in eval mode by as_module.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        torch.onnx.export(model, tuple(inputs), str(path), dynamo=True, verbose=False, external_data=False)
    return path


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def export_onnx(
    model: Exportable,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    extra_inputs: Sequence[tuple] = (),
    dynamic_shapes: Any = None,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    provider: str = "cpu",
    opset_version: int | None = None,
) -> ExportReport:
    """Export ``model`` with ``torch.onnx.export(dynamo=True)`` and check it in onnxruntime.

    ``model`` is a module, captured here, or an ExportedProgram, exported as it is (its own
    dynamic dims; ``dynamic_shapes`` is then unused). Shapes are those of ``example_inputs``
    unless ``dynamic_shapes`` (as for torch.export) frees some; ``extra_inputs`` are further argument tuples to check, of other sizes along the dynamic
    dims if there are any. Parity: for every output, max|ort − torch| ≤ atol + rtol·max|torch|.
    Models with more than 512 MiB of weights keep them in ``<name>.data`` beside the file; the side
    file's name is written into the model, so the pair is staged under its final names in a
    temporary folder and moved into place together (side file first).
    """
    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cases = [tuple(example_inputs), *map(tuple, extra_inputs)]
    program, module = _captured(model, cases[0], dynamic_shapes)
    want = _reference(module, cases)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = stage / path.name
        torch.onnx.export(
            program,
            cases[0],
            str(staged),
            dynamo=True,
            external_data=_weight_bytes(module) > _INLINE_WEIGHT_LIMIT,
            opset_version=opset_version,
            verbose=False,
        )
        session = _ort_session(staged, provider)
        runtime = f"onnxruntime/{session.get_providers()[0]}"
        results = [
            _compare(_run_ort(session, args), ref, atol, rtol, f"ONNX ({runtime}) on input set {k}")
            for k, (args, ref) in enumerate(zip(cases, want))
        ]
        diff, ref = max(r[0] for r in results), max(r[1] for r in results)
        del session
        for side in sorted(stage.iterdir(), key=lambda p: p == staged):
            os.replace(side, path.parent / side.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ExportReport(path, runtime, diff, ref, atol, rtol, time.perf_counter() - t0)


def save_program(
    model: Exportable,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    dynamic_shapes: Any = None,
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> ExportReport:
    """``torch.export.save`` of ``model`` (a module, captured here, or an ExportedProgram, saved
    as it is); the file is loaded back and run before it is kept."""
    t0 = time.perf_counter()
    args = tuple(example_inputs)
    program, module = _captured(model, args, dynamic_shapes)
    want = _reference(module, [args])[0]
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)
        loaded = torch.export.load(tmp).module()
        with torch.no_grad():
            got = _tensor_leaves(loaded(*args))
        diff, ref = _compare(got, want, atol, rtol, "reloaded .pt2")
    return ExportReport(Path(path), "torch.export.load", diff, ref, atol, rtol, time.perf_counter() - t0)


def export_hf(
    lm: torch.nn.Module,
    program: torch.export.ExportedProgram,
    example_inputs: tuple,
    folder: str | os.PathLike,
    tokenizer: Any = None,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportReport:
    """The pruned causal LM ``program`` as a Hugging Face folder (``hf_folder.save_hf_folder``;
    ``lm`` is the dense model it was captured from, as ``lm.``), loaded back with transformers and
    run on ``example_inputs`` (the input ids) against the program before it is kept."""
    from transformers import AutoModelForCausalLM

    from osscar_export.hf_folder import save_hf_folder

    t0 = time.perf_counter()
    args = tuple(example_inputs)
    want = _reference(program.module(), [args])[0]
    save_hf_folder(lm, program.state_dict, Path(folder), tokenizer)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            got = [loaded(input_ids=args[0], use_cache=False).logits]
        diff, ref = _compare(got, want, atol, rtol, "reloaded Hugging Face folder")
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)  # a folder that does not reproduce the model is not kept
        raise
    return ExportReport(Path(folder), "transformers.AutoModelForCausalLM", diff, ref, atol, rtol, time.perf_counter() - t0)


_TRT_TO_TORCH = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "INT8": torch.int8,
    "BOOL": torch.bool,
}


def export_tensorrt(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    example_inputs: tuple,
    *,
    fp16: bool = False,
    workspace_gib: float = 4.0,
    atol: float = 1e-4,
    rtol: float = 1e-2,
) -> ExportReport:
    """Build a TensorRT engine from an ONNX file; kept only if it matches onnxruntime (CPU).

    The reference is the ONNX file run in onnxruntime, which ``export_onnx`` already checked
    against torch. Static shapes, those of ``example_inputs``. fp16 engines need a looser rtol.
    """
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TargetUnavailableError(
            "TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU and driver); "
            "export ONNX instead"
        ) from err
    if not torch.cuda.is_available():
        raise TargetUnavailableError("TensorRT needs a CUDA device, and torch sees none here")
    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    args = tuple(example_inputs)
    want = [torch.from_numpy(a) for a in _run_ort(_ort_session(onnx_path, "cpu"), args)]

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ParityError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ParityError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")

    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    tensors = _tensor_leaves(args)
    if len(inputs) != len(tensors):
        raise ParityError(f"the engine takes {len(inputs)} inputs, the example has {len(tensors)} tensors")
    keep_alive = []
    for name, t in zip(inputs, tensors):
        dtype = _TRT_TO_TORCH[engine.get_tensor_dtype(name).name]
        buf = t.detach().to(device="cuda", dtype=dtype).contiguous()
        context.set_input_shape(name, tuple(buf.shape))
        context.set_tensor_address(name, buf.data_ptr())
        keep_alive.append(buf)
    got = []
    for name in outputs:
        dtype = _TRT_TO_TORCH[engine.get_tensor_dtype(name).name]
        buf = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, buf.data_ptr())
        got.append(buf)
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ParityError("TensorRT engine execution failed")
    stream.synchronize()
    diff, ref = _compare([g.float().cpu() for g in got], want, atol, rtol, "TensorRT engine")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return ExportReport(Path(engine_path), "tensorrt", diff, ref, atol, rtol, time.perf_counter() - t0)
