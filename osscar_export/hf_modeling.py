"""Modeling code shipped in every pruned Hugging Face folder (``hf_folder`` copies this file there
as ``modeling_osscar.py``; load the folder with ``trust_remote_code=True``).

Pruning leaves each decoder layer with its own MLP width, query / key-value head counts and
biases, while the stock Llama / Qwen2 / Mistral classes build every layer from the global config.
So each class here builds the stock model, then swaps every layer's projections for Linear
modules of the sizes in ``config.osscar_layers`` and sets the one attribute the stock attention
reads per layer (``num_key_value_groups``; head counts are read off the projections' shapes).
Attention, RoPE, caches and generation stay the installed transformers code.

This file runs inside the folder, without osscar-export installed: it imports only torch and
transformers.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    # Same device and dtype as the stock module: from_pretrained builds the model on "meta".
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_layers(model: nn.Module, layers: list[dict]) -> None:
    """Give each decoder layer of a stock ``*ForCausalLM`` the sizes and biases listed in ``layers``
    (one dict per layer: intermediate_size, num_attention_heads, num_key_value_heads, bias)."""
    hidden = model.config.hidden_size
    decoder = model.model.layers
    if len(layers) != len(decoder):
        raise ValueError(f"osscar_layers lists {len(layers)} layers, the model has {len(decoder)}")
    for layer, spec in zip(decoder, layers):
        attn, mlp, bias = layer.self_attn, layer.mlp, set(spec["bias"])
        heads, kv_heads, inter = spec["num_attention_heads"], spec["num_key_value_heads"], spec["intermediate_size"]
        q, kv = heads * attn.head_dim, kv_heads * attn.head_dim
        sizes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
                 "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
        for name, (fan_in, fan_out) in sizes.items():
            owner = attn if name in ATTENTION else mlp
            setattr(owner, name, _linear(getattr(owner, name), fan_in, fan_out, name in bias))
        attn.num_key_value_groups = heads // kv_heads  # query heads per KV head, for repeat_kv / GQA
        mlp.intermediate_size = inter


class OsscarLlamaConfig(LlamaConfig):
    """A Llama config with ``osscar_layers``: its own class, so that registering the model class for
    it never redirects plain Llama configs to this code."""


class OsscarQwen2Config(Qwen2Config):
    """A Qwen2 config with ``osscar_layers`` (see OsscarLlamaConfig)."""


class OsscarMistralConfig(MistralConfig):
    """A Mistral config with ``osscar_layers`` (see OsscarLlamaConfig)."""


class OsscarLlamaForCausalLM(LlamaForCausalLM):
    config_class = OsscarLlamaConfig

    def __init__(self, config: OsscarLlamaConfig):
        super().__init__(config)
        resize_layers(self, config.osscar_layers)


class OsscarQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = OsscarQwen2Config

    def __init__(self, config: OsscarQwen2Config):
        super().__init__(config)
        resize_layers(self, config.osscar_layers)


class OsscarMistralForCausalLM(MistralForCausalLM):
    config_class = OsscarMistralConfig

    def __init__(self, config: OsscarMistralConfig):
        super().__init__(config)
        resize_layers(self, config.osscar_layers)
