"""report.json: strict JSON that follows its schema, for one model and for a family, with the
calibration counts actually used."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

from osscar_export.cli import EXIT_OK, main
from osscar_export.report import REPORT_SCHEMA, SUMMARY_SCHEMA, _dumps
from tests.test_cli import _args
from tests.test_job import FAST, _report, _time_as


def test_non_finite_numbers_become_null_and_never_invalid_json() -> None:
    text = _dumps({"quality": {"perplexity": math.inf, "perplexity_dense": 12.5}, "losses": [math.nan, 1.0]})
    assert json.loads(text) == {"quality": {"perplexity": None, "perplexity_dense": 12.5}, "losses": [None, 1.0]}
    assert "Infinity" not in text and "NaN" not in text


def test_the_schema_refuses_what_a_consumer_could_not_rely_on(tiny: dict[str, str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A family's summary and each model's report follow their schemas, and the schemas are
    strict enough to catch a missing field, a wrong type or an unknown key."""
    _time_as(monkeypatch, [0.9, 0.5])  # of the 1.2x budget: 1.4x is met too
    out = tmp_path / "family"
    assert main(_args(tiny, out, "--speedup", "1.2", "1.4", *FAST)) == EXIT_OK
    summary = json.loads((out / "report.json").read_text())
    jsonschema.validate(summary, SUMMARY_SCHEMA)
    assert summary["budgets_met"] and set(summary["models"]) == {"1.2x", "1.4x"}
    for label in summary["models"]:
        report = _report(out / label)  # strict JSON, REPORT_SCHEMA
        assert {k: report[k] for k in summary["models"][label]} == summary["models"][label]
        assert (report["calibration"]["samples"], report["calibration"]["held_out_samples"]) == (128, 0)
    broken = [
        {k: v for k, v in report.items() if k != "meets_budget"},
        {**report, "measured_ms": "0.1"},
        {**report, "budget_ms": 0},
        {**report, "calibration": {k: v for k, v in report["calibration"].items() if k != "held_out_samples"}},
        {**report, "quality": {"perplexity": "inf"}},
        {**report, "groups": [{**report["groups"][0], "kept": -1}]},
        {**report, "surprise": 1},
    ]
    for bad in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, REPORT_SCHEMA)
