"""Recovery: a short distillation of the pruned model against the dense one (``--recover-minutes``).

One-shot pruning re-fits each layer to its own inputs; a few minutes of training against the
dense model's outputs then repairs what the layer-wise fit cannot see (docs/design.md,
"Recovery"). The dense model is the teacher, not the next token: plain fine-tuning of a one-shot
pruned model on a small corpus makes it worse. The loss is the task's (``distill_loss``): the KL
divergence of the logits for language models and classifiers, the squared error of the output
otherwise. It trains on the calibration batches for a wall-clock budget and keeps the result
only when it lowers that loss on the held-out batches, so recovery never ships a worse model.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from osscar_export.passes.materialize import dynamic_shapes
from osscar_export.tasks import Task, first_output

Batch = tuple[torch.Tensor, ...]
TRAINED = ("all", "norms-biases")  # which parameters train: every one, or the 1-D ones only
LEARNING_RATE = {"all": 2e-5, "norms-biases": 1e-3}


@dataclass(frozen=True)
class Recovery:
    """What a recovery did, for the report."""

    minutes: float  # spent training
    steps: int
    trained: str  # one of TRAINED
    loss_before: float  # the distillation loss on the held-out batches (``distill_loss``, per batch)
    loss_after: float
    kept: bool  # False: it did not lower the held-out loss, and the one-shot model stays


def distill_loss(task: Task, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The differentiable distance the student is trained down: KL(teacher ‖ student) of the
    logits, per position, where the task's outputs are logits; else the squared error relative
    to the teacher's."""
    if task.name in ("causal-lm", "image-classification"):
        s, t = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
        return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")
    return ((student - teacher) ** 2).sum() / (teacher**2).sum().clamp_min(1e-30)


def trainable(model: nn.Module, trained: str) -> list[nn.Parameter]:
    """The parameters that train; every other one is frozen."""
    if trained not in TRAINED:
        raise ValueError(f"trained must be one of {TRAINED}, got {trained!r}")
    chosen = []
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point() and (trained == "all" or p.dim() == 1))
        if p.requires_grad:
            chosen.append(p)
    return chosen


def recover(
    program: torch.export.ExportedProgram,
    example_inputs: tuple,
    dense: nn.Module,
    batches: Sequence[Batch],
    held_out: Sequence[Batch],
    task: Task,
    minutes: float,
    trained: str = "all",
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[torch.export.ExportedProgram, Recovery]:
    """Distil ``program``'s model towards ``dense`` on ``batches`` for ``minutes``; the program
    re-captured with ``example_inputs`` when that lowered the held-out loss, else ``program`` itself."""
    if minutes <= 0:
        raise ValueError(f"recovery minutes must be above 0, got {minutes}")
    student = copy.deepcopy(program.module()).to(device)
    teacher = dense if device == "cpu" else copy.deepcopy(dense).to(device)  # the job's dense model stays where it is
    held_out = [tuple(t.to(device) for t in b) for b in held_out]
    with torch.no_grad():
        reference = [first_output(teacher(*b)) for b in held_out]

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(float(distill_loss(task, first_output(student(*b)), r)) for b, r in zip(held_out, reference)) / len(held_out)

    before = held_out_loss()
    params = trainable(student, trained)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE[trained], weight_decay=0.0)
    start, steps, budget = time.perf_counter(), 0, 60.0 * minutes
    with tqdm(total=round(budget), desc=f"recover ({trained})", unit="s", leave=False) as bar:
        for batch in itertools.cycle(batches):
            inputs = tuple(t.to(device) for t in batch)
            with torch.no_grad():
                target = first_output(teacher(*inputs))
            loss = distill_loss(task, first_output(student(*inputs)), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update(min(round(elapsed), bar.total) - bar.n)
            if elapsed >= budget:
                break
    for p in student.parameters():
        p.requires_grad_(False)
    after = held_out_loss()
    report = Recovery((time.perf_counter() - start) / 60, steps, trained, before, after, after < before)
    log(f"recovery: {steps} steps in {report.minutes:.1f} min, held-out distillation loss {before:.4g} -> {after:.4g}"
        + ("" if report.kept else ": no better, keeping the one-shot model"))
    if not report.kept:
        return program, report
    args = tuple(example_inputs)
    recaptured = torch.export.export(student.cpu(), args, dynamic_shapes=dynamic_shapes(program, args), strict=False)
    return recaptured, report
