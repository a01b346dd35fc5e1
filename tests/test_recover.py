"""Recovery (recover.py): distilling a pruned model against the dense one lowers the distillation
loss, keeps shapes, and never ships a model it made worse."""

from __future__ import annotations

import pytest
import torch

import models_zoo
from osscar_export import find_structures, prune
from osscar_export.recover import distill_loss, recover, trainable
from osscar_export.tasks import TASKS, first_output


@pytest.fixture(scope="module")
def pruned():
    model, args = models_zoo.llama_gqa()
    with torch.no_grad():  # peaked logits: a random model's are near uniform, so pruning would cost ~nothing
        model.lm_head.weight.mul_(4)
    gen = torch.Generator().manual_seed(0)
    calibration, batches = ([(torch.randint(0, models_zoo.VOCAB, args[0].shape, generator=gen),) for _ in range(n)]
                            for n in (4, 6))
    plan = find_structures(model, args)
    result = prune(model, calibration, keep_fraction=0.5, plan=plan, progress=False)
    return model, args, batches, result  # batches the prune never saw: it fits its own tokens too well


def kl(model, dense, batches) -> float:
    task = TASKS["causal-lm"]
    with torch.no_grad():
        return sum(float(distill_loss(task, first_output(model(*b)), first_output(dense(*b)))) for b in batches)


@pytest.mark.parametrize("trained", ["all", "norms-biases"])
def test_recovery_lowers_the_distillation_loss(pruned, trained):
    model, args, batches, result = pruned
    before = kl(result.model, model, batches)
    program, done = recover(result.program, args, model, batches, batches, TASKS["causal-lm"], minutes=0.05,
                            trained=trained, log=lambda _: None)
    assert done.steps >= 3 and done.trained == trained
    assert done.kept and done.loss_after < done.loss_before
    small = program.module()
    assert kl(small, model, batches) < before
    shapes = {k: tuple(v.shape) for k, v in result.program.state_dict.items()}
    assert {k: tuple(v.shape) for k, v in program.state_dict.items()} == shapes  # weights change, shapes do not
    assert kl(result.model, model, batches) == pytest.approx(before)  # the one-shot model is left as it was


def test_recovery_that_does_not_help_keeps_the_one_shot_model(pruned):
    model, args, batches, result = pruned
    # a dense "pruned" model is the teacher already: nothing to lower, so nothing is kept
    program, done = recover(model_program := torch.export.export(model, args, strict=False), args, model, batches,
                            batches, TASKS["causal-lm"], minutes=0.02, log=lambda _: None)
    assert not done.kept and program is model_program


def test_trainable_selects_parameters():
    model, _ = models_zoo.llama_gqa()
    ones = trainable(model, "norms-biases")
    assert ones and all(p.dim() == 1 for p in ones)
    assert len(trainable(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="trained must be"):
        trainable(model, "lora")
