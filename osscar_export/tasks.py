"""One record per task: what the job needs to know about a kind of model (docs/design.md, "Tasks").

A task (``LoadedModel.task``) decides the default calibration data and how much of it, how many
samples are held out of the Grams for the allocation search, the end-to-end loss that search and
the choice of prune mode minimise, and the quality metric of the report. Keeping them together
means a new task is one new record, not a branch in each of pipeline, search and report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from osscar_export import data, evaluate
from osscar_export.errors import CalibrationDataError
from osscar_export.models import LoadedModel

Batch = tuple[torch.Tensor, ...]
# (sum, count) of one batch's loss: the model's first output, the inputs, the dense model's first output
BatchLoss = Callable[[torch.Tensor, Batch, torch.Tensor | None], tuple[float, float]]
Quality = Callable[[LoadedModel, nn.Module, nn.Module, int], dict[str, float]]


@dataclass(frozen=True)
class Task:
    """The defaults and measures of one task."""

    name: str
    calibration: str | None  # default --calib; None: the photos for a model that takes images, else none
    n_calib: int  # default calibration samples (token windows, sentences, image crops)
    n_score: int  # samples held out of the Grams to score candidate allocations and prune modes on
    loss_name: str  # what ``batch_loss`` measures, for the report
    batch_loss: BatchLoss
    needs_reference: bool  # whether ``batch_loss`` compares with the dense model's output
    quality: Quality  # (loaded, model, dense, n_eval) → the report's metrics on held-out real data

    def calibration_source(self, loaded: LoadedModel) -> str:
        """The calibration source when the job names none."""
        if self.calibration is not None:
            return self.calibration
        if loaded.preprocess is not None:
            return "natural-calib"
        raise CalibrationDataError(
            f"no default calibration data for {loaded.name!r} (task {loaded.task}); "
            "pass a .pt file of example-input batches"
        )

    def reference_outputs(self, dense: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor | None]:
        """The dense model's outputs that ``end_to_end_loss`` compares with (None where unused)."""
        if not self.needs_reference:
            return [None] * len(batches)
        with torch.inference_mode():
            return [first_output(dense(*b)).float() for b in batches]

    def end_to_end_loss(self, model: nn.Module, batches: Sequence[Batch], dense_outputs: Sequence[torch.Tensor | None]) -> float:
        """How far the model is from good on ``batches`` (``batch_loss`` summed, per counted
        item): what the allocation search and the choice of prune mode minimise."""
        total = count = 0.0
        with torch.inference_mode():
            for inputs, dense in zip(batches, dense_outputs):
                loss, items = self.batch_loss(first_output(model(*inputs)).float(), inputs, dense)
                total += loss
                count += items
        return total / count


def first_output(out: object) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a mapping or a sequence of them)."""
    return out if isinstance(out, torch.Tensor) else next(iter(out.values() if isinstance(out, Mapping) else out))


def _next_token_nll(out: torch.Tensor, inputs: Batch, dense: torch.Tensor | None) -> tuple[float, float]:
    """What perplexity measures; needs no reference."""
    ids = inputs[0]
    return F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item(), ids[:, 1:].numel()


def _kl_from_dense(out: torch.Tensor, inputs: Batch, dense: torch.Tensor | None) -> tuple[float, float]:
    return F.kl_div(F.log_softmax(out, -1), F.log_softmax(dense, -1), log_target=True, reduction="sum").item(), out.shape[0]


def _relative_error(out: torch.Tensor, inputs: Batch, dense: torch.Tensor | None) -> tuple[float, float]:
    """For outputs without a likelihood (hidden states, anything generic)."""
    return float(((out - dense) ** 2).sum() / (dense**2).sum().clamp_min(1e-30)), 1


def _batch(loaded: LoadedModel) -> int:
    return loaded.example_inputs[0].shape[0]


def _perplexity(loaded: LoadedModel, model: nn.Module, dense: nn.Module, n_eval: int) -> dict[str, float]:
    seq = loaded.example_inputs[0].shape[1]
    windows = data.eval_text_windows("wiki-summaries", loaded.tokenizer, seq, n_eval, _batch(loaded))
    return {"perplexity": evaluate.perplexity(model, windows), "perplexity_dense": evaluate.perplexity(dense, windows)}


def _embedding_cosine(loaded: LoadedModel, model: nn.Module, dense: nn.Module, n_eval: int) -> dict[str, float]:
    seq = loaded.example_inputs[0].shape[1]
    texts = data.sentences("wiki-summaries", n_eval * _batch(loaded), seed=1, split="eval")
    batches = data.encode_sentences(loaded.tokenizer, texts, seq, _batch(loaded))
    return {"embedding_cosine": evaluate.embedding_similarity(model, dense, batches)}


def _classification(loaded: LoadedModel, model: nn.Module, dense: nn.Module, n_eval: int) -> dict[str, float]:
    if loaded.preprocess is None:
        return {}
    images = data.natural_images("heldout", loaded.preprocess, n_eval, seed=1, batch=_batch(loaded))
    return evaluate.classification_metrics(model, dense, images)


def _no_metric(loaded: LoadedModel, model: nn.Module, dense: nn.Module, n_eval: int) -> dict[str, float]:
    return {}


# Calibration samples: a 128-token window gives 128 rows per Gram, an image crop only 49 in
# EfficientNet-Lite0's last blocks (p = 1152 inputs): with 32 crops those layers over-fit badly,
# so images get more; sentences are short (few real tokens each), so they get as many.
# Held-out samples (search.py): each costs one forward per group probed and per candidate; a
# window holds 128 tokens, a crop or a sentence one item. A model of unknown kind gets the
# language-model counts.
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("causal-lm", calibration="bbc-news", n_calib=32, n_score=8, loss_name="next-token NLL",
         batch_loss=_next_token_nll, needs_reference=False, quality=_perplexity),
    Task("encoder", calibration="bbc-news", n_calib=256, n_score=64, loss_name="squared error relative to the dense output",
         batch_loss=_relative_error, needs_reference=True, quality=_embedding_cosine),
    Task("image-classification", calibration="natural-calib", n_calib=256, n_score=64, loss_name="KL(dense ‖ model)",
         batch_loss=_kl_from_dense, needs_reference=True, quality=_classification),
    Task("generic", calibration=None, n_calib=32, n_score=8, loss_name="squared error relative to the dense output",
         batch_loss=_relative_error, needs_reference=True, quality=_no_metric),
)}
