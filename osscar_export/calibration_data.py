"""Calibration batches from a ``--calib`` spec, validated against the model's example inputs.

A spec names a built-in corpus or photo set (``data``), a tensor file, an image folder or a text
file or folder; evaluation-only sets are refused. ``calibration_split`` further holds samples of
the calibration source out of the Gram matrices for the job's allocation search: whole photos
(SKIMAGE_SCORE, every HELD_OUT_EVERY-th file of a folder), later text windows or sentences, the
last batches of a tensor file.
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from osscar_export import data
from osscar_export.errors import CalibrationDataError
from osscar_export.models import LoadedModel, package_dir

Batch = tuple[torch.Tensor, ...]

EVAL_ONLY = ("natural-heldout", "imagenet-labelled")
# Calibration photos the job holds out of the Grams to score allocations on (a colour object, a
# medical image, a grey scene), and for an image folder every HELD_OUT_EVERY-th file.
SKIMAGE_SCORE = ("coffee.png", "retina.jpg", "camera.png")
HELD_OUT_EVERY = 4


def validate_batches(batches: Sequence[Batch], example_inputs: Batch, what: str) -> list[Batch]:
    """Check that each batch fits the example inputs: same arity, dtype, and shape except the
    batch dim, the example batch size (the model is captured for it), finite values. Returns the
    batches as a list."""
    if not batches:
        raise CalibrationDataError(f"{what}: no calibration batches")
    for b, inputs in enumerate(batches):
        if len(inputs) != len(example_inputs):
            raise CalibrationDataError(
                f"{what}: batch {b} has {len(inputs)} inputs, the model takes {len(example_inputs)}"
            )
        sizes = set()
        for i, (x, ref) in enumerate(zip(inputs, example_inputs)):
            where = f"{what}: batch {b} input {i}"
            if not isinstance(x, torch.Tensor):
                raise CalibrationDataError(f"{where} is a {type(x).__name__}, not a tensor")
            if x.dtype != ref.dtype:
                raise CalibrationDataError(
                    f"{where} has dtype {x.dtype}, the model expects {ref.dtype}"
                )
            if x.dim() != ref.dim() or x.shape[1:] != ref.shape[1:]:
                raise CalibrationDataError(
                    f"{where} has shape {tuple(x.shape)}, the model expects "
                    f"(batch, {', '.join(map(str, ref.shape[1:]))})"
                )
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise CalibrationDataError(f"{where} contains NaN or inf")
            sizes.add(x.shape[0])
        if len(sizes) != 1 or 0 in sizes:
            raise CalibrationDataError(f"{what}: batch {b} has batch sizes {sorted(sizes)}")
        if sizes != {len(example_inputs[0])}:  # the model is captured for this batch size only
            raise CalibrationDataError(
                f"{what}: batch {b} has {sizes.pop()} samples, the model takes batches of "
                f"{len(example_inputs[0])} (--batch)"
            )
    return list(batches)


_TENSOR_FILE_CONTENT = (
    "A calibration .pt/.pth file must be written by torch.save and hold a tensor (samples × input "
    "dims), a list of tensors or a list of tuples of tensors (one batch each); other pickled "
    "objects are refused because loading them could run code"
)


def _load_failure(path: Path, err: Exception) -> str:
    """Why torch.load failed, in words: torch's own text is empty for an empty file and, for a
    non-tensor pickle, advises ``weights_only=False``, which would run the file's code."""
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        return "it is not a torch.save file of tensors (it holds other Python objects, or is not a torch file at all)"
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _whole_batches(rows: torch.Tensor, batch: int, path: Path) -> torch.Tensor:
    """`rows` cut to whole batches: the model is captured for a fixed batch size, so a short last
    batch would fail deep inside the search. Dropping the remainder is announced, never silent."""
    if rows.dim() == 0 or len(rows) < batch:
        raise CalibrationDataError(
            f"{path} holds {len(rows) if rows.dim() else 0} samples, fewer than one batch of {batch} "
            f"(the model's batch size); save at least {batch} rows"
        )
    kept = len(rows) - len(rows) % batch
    if kept < len(rows):
        warnings.warn(
            f"{path}: {len(rows)} samples are not a multiple of the batch size {batch}; using the "
            f"first {kept} and dropping the last {len(rows) - kept}",
            stacklevel=2,
        )
    return rows[:kept]


def tensor_file(path: str | Path, example_inputs: Batch) -> list[Batch]:
    """Batches from a .pt file: a tensor (split into batches of the example batch size, a partial
    last batch dropped with a warning), a list of tensors (one batch each, single-input models) or
    a list of tuples (one batch each)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol note would precede our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            saved = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CalibrationDataError(
            f"cannot load calibration tensors from {path}: {_load_failure(path, err)}. {_TENSOR_FILE_CONTENT}"
        ) from err
    if isinstance(saved, torch.Tensor):
        batch = example_inputs[0].shape[0]
        batches = [(chunk,) for chunk in torch.split(_whole_batches(saved, batch, path), batch)]
    elif isinstance(saved, (list, tuple)):
        batches = [tuple(x) if isinstance(x, (list, tuple)) else (x,) for x in saved]
    else:
        raise CalibrationDataError(
            f"{path} holds a {type(saved).__name__}; expected a tensor, a list of tensors "
            "or a list of tuples"
        )
    return validate_batches(batches, example_inputs, str(path))


def _text_calibration(source: str | Path, loaded: LoadedModel, n: int, seed: int) -> list[Batch]:
    if loaded.tokenizer is None:
        raise CalibrationDataError(f"{loaded.name!r} has no tokenizer, so text cannot feed it")
    batch, seq_len = loaded.example_inputs[0].shape
    if loaded.task == "causal-lm":
        return data.text_windows(source, loaded.tokenizer, seq_len, n, seed, batch)
    if loaded.task == "encoder":
        return data.encode_sentences(loaded.tokenizer, data.sentences(source, n, seed), seq_len, batch)
    raise CalibrationDataError(f"text calibration needs a causal-lm or encoder, not {loaded.task}")


def _needs_images(loaded: LoadedModel, spec: str) -> Callable[[Any], torch.Tensor]:
    if loaded.preprocess is None:
        raise CalibrationDataError(f"{spec!r} is image data but {loaded.name!r} takes no images")
    return loaded.preprocess


def load_calibration(spec: str | Path, loaded: LoadedModel, n: int, seed: int = 0) -> list[Batch]:
    """Calibration batches for `loaded` from a spec: a built-in corpus or photo set, a .pt/.pth
    file, an image folder, or a text file/folder (``Task.calibration_source`` names the default).

    `n` counts samples (windows, sentences, crops), rounded up to whole batches of the
    example-input batch size. The result is validated against the example inputs.
    """
    batch = loaded.example_inputs[0].shape[0]
    n = math.ceil(n / batch) * batch
    path = Path(spec)
    if spec in EVAL_ONLY:
        raise CalibrationDataError(f"{spec!r} is held out for evaluation; never calibrate on it")
    if spec == "natural-calib":
        result = data.natural_images("calib", _needs_images(loaded, spec), n, seed, batch)
    elif data.is_text_corpus(spec):
        result = _text_calibration(spec, loaded, n, seed)
    elif path.suffix in (".pt", ".pth"):
        result = tensor_file(path, loaded.example_inputs)
    elif path.is_dir() and loaded.preprocess is not None:
        result = data.image_folder(path, loaded.preprocess, n, seed, True, batch)
    elif path.exists() and loaded.tokenizer is not None:
        result = _text_calibration(path, loaded, n, seed)
    else:
        raise CalibrationDataError(
            f"calibration spec {str(spec)!r} is none of: {', '.join(data.TEXT_CORPORA)} (or a mix such as "
            f"bbc-news+wiki-summaries), natural-calib, "
            f"a .pt/.pth file, an image folder (vision models) or a text file/folder (text models)"
        )
    return validate_batches(result, loaded.example_inputs, str(spec))


def calibration_split(
    spec: str | Path, loaded: LoadedModel, n: int, n_held: int, seed: int = 0
) -> tuple[list[Batch], list[Batch]]:
    """Calibration batches (`n` samples) and up to `n_held` held-out samples of the same source
    that share no item with them.

    Photos are held out whole: a crop of a calibration photo shares its content, and a re-fit
    over-fitted to the calibration photos looks harmless on it (measured in docs/results.md).
    Text holds out the windows or sentences drawn after the first `n`; a source that yields
    fewer samples than asked (a tensor file holds what it holds) gives up at most a quarter of
    its batches, and none when it has fewer than four.
    """
    batch = loaded.example_inputs[0].shape[0]
    n, n_held = math.ceil(n / batch) * batch, math.ceil(n_held / batch) * batch
    photos = _photo_split(spec) if n_held and loaded.preprocess is not None else None
    if photos is not None:

        def crops(files: list[Path], k: int, crop_seed: int) -> list[Batch]:
            return validate_batches(data.image_batches(files, loaded.preprocess, k, crop_seed, True, batch), loaded.example_inputs, str(spec))

        return crops(photos[0], n, seed), crops(photos[1], n_held, seed + 1)
    batches = load_calibration(spec, loaded, n + n_held, seed)
    held_batches = n_held // batch
    if len(batches) < (n + n_held) // batch:
        held_batches = min(held_batches, len(batches) // 4)
    return batches[: len(batches) - held_batches], batches[len(batches) - held_batches :]


def _photo_split(spec: str | Path) -> tuple[list[Path], list[Path]] | None:
    """(calibration, held-out) photo files of an image source; None for other sources and for
    folders of fewer than HELD_OUT_EVERY files."""
    if spec == "natural-calib":
        root = package_dir("skimage") / "data"
        held = [root / f for f in SKIMAGE_SCORE]
        return [root / f for f in data.SKIMAGE_CALIB if f not in SKIMAGE_SCORE], held
    if data.is_text_corpus(spec) or spec in EVAL_ONLY or not Path(spec).is_dir():
        return None
    files = data.image_files(spec)
    held = files[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    return ([f for f in files if f not in held], held) if held else None
