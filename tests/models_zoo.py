"""Small model builders shared by tests: each returns (model in eval mode, example_inputs tuple).

Torchvision models use 10 classes and small images; transformers models are built from small
configs (no hub access). The Llama builder keeps SmolLM2's attention shape (9 query heads over
3 KV heads, head_dim 64, so hidden 576) with fewer layers and a narrow MLP. Transformer models
are subclassed to return one tensor (logits, or BERT's last hidden state) without a KV cache, so
torch.export sees tensors only while parameter names stay those of the library
("model.layers.0.mlp.up_proj.weight").
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]
IMAGE = 64
SEQ = 8
VOCAB = 128


def _images(size: int = IMAGE, batch: int = 1) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens(batch: int = 1, seq: int = SEQ) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0)),)


def torchvision_model(name: str, image_size: int = IMAGE, **kwargs) -> Built:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10, **kwargs)
    return model.eval(), _images(image_size)


def resnet18() -> Built:
    return torchvision_model("resnet18")


def resnet50() -> Built:
    return torchvision_model("resnet50")


def mobilenet_v2() -> Built:
    return torchvision_model("mobilenet_v2")


def mobilenet_v3_small() -> Built:
    return torchvision_model("mobilenet_v3_small")


def efficientnet_b0() -> Built:
    return torchvision_model("efficientnet_b0")


def vit_b_16() -> Built:
    """torchvision's vit_b_16 (12 layers, 12 heads, hidden 768) at its native 224 resolution."""
    return torchvision_model("vit_b_16", image_size=224)


def vit_small(layers: int = 2) -> Built:
    """A ViT with vit_b_16's code path (nn.MultiheadAttention, fused in_proj) but small sizes."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=layers, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    return model.eval(), _images(32)


def _tensor_output(cls: type, field: str) -> type:
    """``cls`` with ``forward(input_ids) -> Tensor``: one output field, no cache."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if field == "logits" else {}
        return getattr(cls.forward(self, input_ids=input_ids, return_dict=True, **kwargs), field)

    return type(cls.__name__, (cls,), {"forward": forward})


def _hf(cls: type, cfg, field: str = "logits", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _tensor_output(cls, field)(cfg, **kwargs).eval()


def gpt2(layers: int = 2) -> Built:
    import transformers as T

    cfg = T.GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    return _hf(T.GPT2LMHeadModel, cfg), _tokens()


def opt(layers: int = 2) -> Built:
    import transformers as T

    cfg = T.OPTConfig(
        num_hidden_layers=layers, hidden_size=64, num_attention_heads=4, ffn_dim=128, vocab_size=VOCAB,
        max_position_embeddings=64, word_embed_proj_dim=64,
    )
    return _hf(T.OPTForCausalLM, cfg), _tokens()


def llama_gqa(layers: int = 2, intermediate: int = 128) -> Built:
    """SmolLM2-shaped attention: 9 query heads, 3 KV heads (n_rep 3), head_dim 64; tied embeddings."""
    import transformers as T

    cfg = T.LlamaConfig(
        num_hidden_layers=layers, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=intermediate, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return _hf(T.LlamaForCausalLM, cfg), _tokens()


def llama_mqa(layers: int = 2, intermediate: int = 128) -> Built:
    """Multi-query attention: 4 query heads sharing 1 KV head of 64 (the stand-in LLM's shape)."""
    import transformers as T

    cfg = T.LlamaConfig(
        num_hidden_layers=layers, hidden_size=256, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
        intermediate_size=intermediate, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return _hf(T.LlamaForCausalLM, cfg), _tokens()


def bert(layers: int = 2) -> Built:
    import transformers as T

    cfg = T.BertConfig(
        num_hidden_layers=layers, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return _hf(T.BertModel, cfg, field="last_hidden_state", add_pooling_layer=False), _tokens()


ZOO: dict[str, Callable[[], Built]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "efficientnet_b0": efficientnet_b0,
    "vit_small": vit_small,
    "gpt2": gpt2,
    "opt": opt,
    "llama_gqa": llama_gqa,
    "llama_mqa": llama_mqa,
    "bert": bert,
}


class TinyMLP(nn.Module):
    """Two MLP blocks: two neuron groups whose width changes the latency (the job tests' model)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)
        self.fc3 = nn.Linear(64, 256)
        self.fc4 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc4(torch.relu(self.fc3(self.fc2(torch.relu(self.fc1(x))))))


def tiny_mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TinyMLP().eval(), (torch.randn(32, 64),)
