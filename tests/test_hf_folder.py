"""Pruned causal LMs written as Hugging Face folders load back offline, with the pruned shapes,
and compute what an independently built reference (the dense model with the pruned structures
masked to zero and the re-fit biases added) computes."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import dynamic_module_utils

from osscar_export.errors import PlanError
from osscar_export.hf_folder import MODELING_FILE, save_hf_folder
from osscar_export.models import CausalLMLogits

COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=128,
              max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
GQA = dict(num_attention_heads=4, num_key_value_heads=2)
# name: (config class, its arguments, whether the captured state dict lists tied embeddings once)
CASES = {
    "llama-tied": (transformers.LlamaConfig, dict(GQA, num_attention_heads=8, tie_word_embeddings=True), False),
    "llama-untied": (transformers.LlamaConfig, dict(GQA, tie_word_embeddings=False), False),
    "qwen2": (transformers.Qwen2Config, dict(GQA, tie_word_embeddings=True), True),
    "mistral": (transformers.MistralConfig, dict(GQA, head_dim=8), False),  # head_dim ≠ hidden / heads
}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory):
    """No hub, and the remote-code copies transformers makes go to a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        mp.setattr(sys, "path", list(sys.path))
        yield


def _dense(name: str) -> transformers.PreTrainedModel:
    config_class, kwargs, _ = CASES[name]
    torch.manual_seed(0)
    config = config_class(**COMMON, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _plan(lm: transformers.PreTrainedModel) -> list[tuple[torch.Tensor, list[int], list[int]]]:
    """Per layer: kept neurons, kept KV groups, kept query heads. Layer 0 keeps 40 of 96 neurons
    and drops KV group 1 with its query heads; layer 1 keeps every neuron and group but drops the
    second query head of each group (so its query-to-KV ratio is not the model's)."""
    c = lm.config
    rep = c.num_attention_heads // c.num_key_value_heads
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randperm(96, generator=gen)[:40].sort().values, [0], list(range(rep))),
        (torch.arange(96), [0, 1], [g * rep + j for g in range(2) for j in range(rep) if j != 1]),
    ]


def _prune(
    lm: transformers.PreTrainedModel, plan, once: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(pruned state dict keyed like the captured program, re-fit biases by HF key): slices of the
    captured weights plus o_proj / down_proj biases the architecture does not have."""
    ids = torch.randint(0, 128, (1, 8))
    weights = dict(torch.export.export(CausalLMLogits(lm), (ids,), strict=False).state_dict)
    if once:
        del weights["lm.lm_head.weight"]
    head_dim = lm.model.layers[0].self_attn.head_dim
    gen = torch.Generator().manual_seed(2)
    biases = {}
    for i, (neurons, groups, heads) in enumerate(plan):
        a, m = f"lm.model.layers.{i}.self_attn.", f"lm.model.layers.{i}.mlp."
        q, kv = _rows(heads, head_dim), _rows(groups, head_dim)
        for key, rows in ((a + "q_proj", q), (a + "k_proj", kv), (a + "v_proj", kv)):
            weights[key + ".weight"] = weights[key + ".weight"][rows]
            if key + ".bias" in weights:
                weights[key + ".bias"] = weights[key + ".bias"][rows]
        weights[a + "o_proj.weight"] = weights[a + "o_proj.weight"][:, q]
        weights[m + "gate_proj.weight"] = weights[m + "gate_proj.weight"][neurons]
        weights[m + "up_proj.weight"] = weights[m + "up_proj.weight"][neurons]
        weights[m + "down_proj.weight"] = weights[m + "down_proj.weight"][:, neurons]
        for key in (a + "o_proj.bias", m + "down_proj.bias"):
            biases[key[3:]] = weights[key] = torch.randn(64, generator=gen) / 4
    return weights, biases


def _reference(lm: transformers.PreTrainedModel, plan, biases: dict[str, torch.Tensor]) -> nn.Module:
    """The dense model with removed neurons' down_proj columns and removed query heads' o_proj
    columns zeroed (what they and their KV groups add to the residual), plus the biases."""
    ref = copy.deepcopy(lm)
    head_dim = lm.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        for (neurons, _, heads), layer in zip(plan, ref.model.layers):
            gone = [h for h in range(lm.config.num_attention_heads) if h not in heads]
            layer.self_attn.o_proj.weight[:, _rows(gone, head_dim)] = 0
            keep = torch.zeros(96, dtype=torch.bool)
            keep[neurons] = True
            layer.mlp.down_proj.weight[:, ~keep] = 0
    for key, b in biases.items():
        module = ref.get_submodule(key.rsplit(".", 1)[0])
        module.bias = nn.Parameter(b.clone())
    return ref


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"t{i}": i + 1 for i in range(127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("name", list(CASES))
def test_folder_loads_and_matches_reference(name: str, tmp_path: Path) -> None:
    lm = _dense(name)
    plan = _plan(lm)
    pruned, biases = _prune(lm, plan, once=CASES[name][2])
    ref = _reference(lm, plan, biases)
    folder = save_hf_folder(lm, pruned, tmp_path / f"pruned-{name}", tokenizer=_tokenizer())

    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", MODELING_FILE,
                                                  "generation_config.json", "tokenizer.json"}
    layers = json.loads((folder / "config.json").read_text())["osscar_layers"]
    rep = lm.config.num_attention_heads // lm.config.num_key_value_heads
    bias = (["q_proj", "k_proj", "v_proj"] if name == "qwen2" else []) + ["o_proj", "down_proj"]
    assert layers == [
        {"intermediate_size": 40, "num_attention_heads": rep, "num_key_value_heads": 1, "bias": bias},
        {"intermediate_size": 96, "num_attention_heads": 2 * (rep - 1), "num_key_value_heads": 2, "bias": bias},
    ]

    # The tokenizer's own class: AutoTokenizer picks a model type's class (Qwen2Tokenizer) over it.
    assert transformers.PreTrainedTokenizerFast.from_pretrained(folder)("t3 t5")["input_ids"] == [4, 6]

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    expected = {c: ref.generate(ids, max_new_tokens=5, do_sample=False, use_cache=c) for c in (True, False)}
    assert expected[True].shape == (2, 17) and torch.equal(expected[True], expected[False])
    for attention in ("sdpa", "eager"):  # eager reads the per-layer num_key_value_groups
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, attn_implementation=attention
        ).eval()
        assert type(loaded).__name__.startswith("Osscar")
        shapes = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
        for key, t in pruned.items():
            assert shapes[key[3:]] == tuple(t.shape), key
        with torch.no_grad():
            assert (loaded(ids).logits - want).abs().max() < 1e-4
        for use_cache in (True, False):
            out = loaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=use_cache)
            assert torch.equal(out, expected[use_cache]), (attention, use_cache)


def test_unsupported_architecture(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    lm = transformers.GPT2LMHeadModel(config)
    weights = {"lm." + k: v for k, v in lm.state_dict().items()}
    with pytest.raises(PlanError, match="model_type 'gpt2'.*llama, mistral, qwen2"):
        save_hf_folder(lm, weights, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_state_dict_leaves_folder_untouched(tmp_path: Path) -> None:
    lm = _dense("llama-untied")
    weights = {"lm." + k: v for k, v in lm.state_dict().items()}
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old").write_text("kept")
    weights["lm.model.layers.1.mlp.up_proj.weight"] = weights["lm.model.layers.1.mlp.up_proj.weight"][:50]
    with pytest.raises(PlanError, match=r"layers\.1\.mlp\.up_proj\.weight \(50, 64\) \(expected \(96, 64\)\)"):
        save_hf_folder(lm, weights, folder)
    weights.pop("lm.model.layers.1.mlp.up_proj.weight")
    with pytest.raises(PlanError, match="missing"):
        save_hf_folder(lm, weights, folder)
    assert [p.name for p in folder.iterdir()] == ["old"]
