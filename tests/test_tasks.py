"""The task records: each task's end-to-end loss agrees with its quality metric, defaults resolve."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from osscar_export import evaluate
from osscar_export.errors import CalibrationDataError
from osscar_export.models import LoadedModel
from osscar_export.tasks import TASKS


def test_end_to_end_loss_matches_the_quality_metrics():
    torch.manual_seed(0)
    ids = torch.randint(0, 17, (2, 9))
    lm = nn.Sequential(nn.Embedding(17, 8), nn.Linear(8, 17))
    causal = TASKS["causal-lm"]
    assert causal.reference_outputs(lm, [(ids,)]) == [None]  # next-token NLL needs no reference
    assert causal.end_to_end_loss(lm, [(ids,)], [None]) == pytest.approx(math.log(evaluate.perplexity(lm, [(ids,)])), rel=1e-6)
    x = torch.randn(5, 8)
    clf, other = nn.Linear(8, 4), nn.Linear(8, 4)
    classifier, encoder = TASKS["image-classification"], TASKS["encoder"]
    dense_out = classifier.reference_outputs(clf, [(x,)])
    assert classifier.end_to_end_loss(clf, [(x,)], dense_out) == pytest.approx(0.0, abs=1e-7)
    kl = evaluate.classification_metrics(other, clf, [(x,)])["kl_dense_to_model"]
    assert classifier.end_to_end_loss(other, [(x,)], dense_out) == pytest.approx(kl, rel=1e-5)
    assert encoder.end_to_end_loss(clf, [(x,)], dense_out) == pytest.approx(0.0, abs=1e-12)
    assert encoder.end_to_end_loss(other, [(x,)], dense_out) > 0.1


def test_default_calibration_follows_the_task_and_the_inputs():
    model, inputs = nn.Linear(6, 3), (torch.zeros(4, 6),)
    assert TASKS["causal-lm"].calibration_source(LoadedModel(model, inputs, "lm", "causal-lm")) == "bbc-news"
    photos = LoadedModel(model, inputs, "conv", "generic", preprocess=lambda image: torch.zeros(3, 8, 8))
    assert TASKS["generic"].calibration_source(photos) == "natural-calib"
    with pytest.raises(CalibrationDataError, match="no default calibration data"):
        TASKS["generic"].calibration_source(LoadedModel(model, inputs, "mlp", "generic"))
    assert TASKS["generic"].quality(LoadedModel(model, inputs, "mlp", "generic"), model, model, 4) == {}
