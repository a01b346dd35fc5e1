"""A pruned causal LM as a Hugging Face folder that ``AutoModelForCausalLM`` loads back.

Pruning gives every decoder layer its own MLP width and query / key-value head counts, and the
re-fit adds biases the architecture never had (``o_proj.bias``, ``down_proj.bias``). The stock
Llama / Qwen2 / Mistral classes of transformers build every layer from the global
``intermediate_size`` / ``num_attention_heads`` / ``num_key_value_heads`` and fix biases per
architecture. transformers' own ``per_layer_config`` does not help: these classes still read the
global fields, which a heterogeneous config refuses (``AmbiguousGlobalPerLayerAttributeError``,
transformers 5.23), and it has no way to put a bias on one projection only. So the folder ships a
small modeling file (``hf_modeling.py``, copied as ``modeling_osscar.py``) that builds the stock
model and resizes each layer from ``config.osscar_layers``; it is loaded with
``trust_remote_code=True``. config.json keeps the dense model's fields (so ``model_type`` and
the global sizes are the original ones) and adds::

    "osscar_layers": [{"intermediate_size": 40, "num_attention_heads": 4,
                       "num_key_value_heads": 1, "bias": ["o_proj", "down_proj"]}, ...],
    "auto_map": {"AutoConfig": "modeling_osscar.OsscarLlamaConfig",
                 "AutoModelForCausalLM": "modeling_osscar.OsscarLlamaForCausalLM"}

``bias`` lists every projection of the layer that has one (Qwen2's native q/k/v biases too).
Sizes and biases are read off the pruned tensors, never off the plan, so the folder describes
exactly the weights it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from osscar_export import hf_modeling
from osscar_export.atomic import atomic_dir
from osscar_export.errors import PlanError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_MODULE = "modeling_osscar"
MODELING_FILE = f"{_MODULE}.py"
# model_type → name stem of the config and model classes in hf_modeling.
_ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def supported(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a causal LM this module can write (what ``--formats`` offers ``hf`` for)."""
    return getattr(getattr(model, "config", None), "model_type", None) in _ARCHITECTURES


def _architecture(lm: PreTrainedModel) -> str:
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise PlanError(
            f"cannot write a pruned Hugging Face folder for model_type {model_type!r} "
            f"({type(lm).__name__}): only {', '.join(sorted(_ARCHITECTURES))} are supported"
        )
    return _ARCHITECTURES[model_type]


def _stripped(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors keyed as in the HF model, on the CPU, each owning its whole storage
    (safetensors refuses views into a shared or larger storage)."""
    foreign = [k for k in state_dict if not k.startswith(prefix)]
    if foreign:
        raise PlanError(f"state dict keys {foreign[:3]} do not start with the prefix {prefix!r}")
    out = {}
    for key, t in state_dict.items():
        t = t.detach().cpu()
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes
        out[key[len(prefix):]] = t if whole else t.clone(memory_format=torch.contiguous_format)
    return out


def _untie(weights: dict[str, torch.Tensor], tied: bool) -> None:
    """Keep one copy of tied embeddings (``tie_word_embeddings`` re-ties them on load): the
    captured program may hold them under both names or under either one."""
    if not tied:
        return
    head = weights.pop(_HEAD, None)
    if head is None:
        return
    embed = weights.setdefault(_EMBED, head)
    if embed is not head and not torch.equal(embed, head):
        raise PlanError(f"the config ties {_HEAD} to {_EMBED}, but the state dict holds different tensors")


def _tensor(weights: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in weights:
        raise PlanError(f"the pruned state dict has no {key!r}")
    return weights[key]


def _heads(rows: int, head_dim: int, key: str) -> int:
    if rows % head_dim or rows == 0:
        raise PlanError(f"{key} has {rows} rows, not a positive multiple of head_dim {head_dim}")
    return rows // head_dim


def _layer_spec(weights: Mapping[str, torch.Tensor], i: int, head_dim: int) -> dict[str, Any]:
    """The sizes and biases of decoder layer ``i`` as the pruned tensors give them."""
    attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    heads = _heads(_tensor(weights, attn + "q_proj.weight").shape[0], head_dim, attn + "q_proj.weight")
    kv_heads = _heads(_tensor(weights, attn + "k_proj.weight").shape[0], head_dim, attn + "k_proj.weight")
    if heads % kv_heads:
        raise PlanError(f"layer {i} keeps {heads} query heads, not a multiple of its {kv_heads} key-value heads")
    projections = [attn + p for p in hf_modeling.ATTENTION] + [mlp + p for p in hf_modeling.MLP]
    return {
        "intermediate_size": _tensor(weights, mlp + "gate_proj.weight").shape[0],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "bias": [p.rsplit(".", 1)[1] for p in projections if p + ".bias" in weights],
    }


def _check(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], tied: bool) -> None:
    """Every tensor the folder's model expects, of its shape, and nothing else: a folder that
    would load with missing or re-initialised weights is never written."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == _HEAD)}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing or unexpected:
        raise PlanError(
            f"the pruned state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    wrong = [f"{k} {have[k]} (expected {want[k]})" for k in sorted(want) if want[k] != have[k]]
    if wrong:
        raise PlanError(f"pruned tensors of unexpected shapes: {', '.join(wrong[:3])}")


def save_hf_folder(
    lm: PreTrainedModel, state_dict: Mapping[str, torch.Tensor], folder: Path, tokenizer: Any = None,
    prefix: str = "lm.",
) -> Path:
    """Write the pruned ``state_dict`` (keyed like the captured program: ``prefix`` + HF key) as a
    folder that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads;
    ``lm`` is the dense model, for its config. Written beside ``folder`` and renamed into place,
    so ``folder`` is either the complete new folder or untouched."""
    stem = _architecture(lm)
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    weights = _stripped(state_dict, prefix)
    _untie(weights, tied)
    head_dim = lm.model.layers[0].self_attn.head_dim
    layers = [_layer_spec(weights, i, head_dim) for i in range(lm.config.num_hidden_layers)]
    config_class = getattr(hf_modeling, f"Osscar{stem}Config")
    model_class = getattr(hf_modeling, f"Osscar{stem}ForCausalLM")
    config = config_class(**{**lm.config.to_dict(), "osscar_layers": layers})
    config.architectures = [model_class.__name__]
    config.auto_map = {
        "AutoConfig": f"{_MODULE}.{config_class.__name__}",
        "AutoModelForCausalLM": f"{_MODULE}.{model_class.__name__}",
    }
    config.dtype = _tensor(weights, _EMBED).dtype  # the stored weights' dtype, which "auto" loads in
    with torch.device("meta"):
        _check(model_class(config), weights, tied)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(Path(hf_modeling.__file__).read_text())
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder
