"""Quality metrics for a pruned model against held-out real data and against its dense original.

Every metric runs batch by batch under inference mode; `model` and `dense` are anything
callable on the input tuples (nn.Module, ExportedProgram.module(), an onnxruntime wrapper).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, ...]
Model = Callable[..., torch.Tensor]


@torch.inference_mode()
def perplexity(model: Model, windows: Sequence[Batch]) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of (input_ids,). Each window is
    scored on its own, so its first token is context only (no stride, no carried-over context)."""
    nll, count = 0.0, 0
    for (ids,) in windows:
        logits = model(ids).float()
        nll += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += ids[:, 1:].numel()
    if count == 0:
        raise ValueError("perplexity needs at least one window of two or more tokens")
    return math.exp(nll / count)


@torch.inference_mode()
def classification_metrics(
    model: Model,
    dense: Model,
    images: Sequence[Batch],
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Agreement of `model` with `dense` on the same images: top-1 agreement and mean
    KL(dense ‖ model) in nats; plus top-1 accuracy of both when `labels` (one per image,
    in batch order) are given."""
    preds, dense_preds, kl = [], [], 0.0
    for inputs in images:
        logp = F.log_softmax(model(*inputs).float(), dim=-1)
        dense_logp = F.log_softmax(dense(*inputs).float(), dim=-1)
        kl += F.kl_div(logp, dense_logp, log_target=True, reduction="sum").item()
        preds.append(logp.argmax(-1))
        dense_preds.append(dense_logp.argmax(-1))
    pred, dense_pred = torch.cat(preds), torch.cat(dense_preds)
    out = {
        "images": float(len(pred)),
        "top1_agreement": (pred == dense_pred).float().mean().item(),
        "kl_dense_to_model": kl / len(pred),
    }
    if labels is not None:
        if len(labels) != len(pred):
            raise ValueError(f"{len(labels)} labels for {len(pred)} images")
        out["top1"] = (pred == labels).float().mean().item()
        out["top1_dense"] = (dense_pred == labels).float().mean().item()
    return out


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over real tokens only (padding masked out), as sentence-transformers does."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


@torch.inference_mode()
def embedding_similarity(model: Model, dense: Model, batches: Sequence[Batch]) -> float:
    """Mean cosine similarity between the pruned and dense mean-pooled sentence embeddings of
    (input_ids, attention_mask) batches; 1.0 means the embeddings did not move."""
    total, count = 0.0, 0
    for ids, mask in batches:
        a = _mean_pool(model(ids, mask).float(), mask)
        b = _mean_pool(dense(ids, mask).float(), mask)
        total += F.cosine_similarity(a, b, dim=-1).sum().item()
        count += len(a)
    if count == 0:
        raise ValueError("embedding_similarity needs at least one batch")
    return total / count
