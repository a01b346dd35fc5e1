"""The job's data: what a run is asked for, what it shares across budgets, what it produced.

Plain records, apart from the orchestration in ``pipeline`` that fills them and the ``report``
that writes them, so neither of those has to import the other (docs/design.md, "Pipeline").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osscar_export.allocate import Allocation
from osscar_export.latency.table import LatencyTable
from osscar_export.latency.timing import MeasureSettings
from osscar_export.models import LoadedModel
from osscar_export.passes.base import Grams
from osscar_export.plan import StructurePlan
from osscar_export.prune import PruneResult
from osscar_export.search import Candidate, Scorer
from osscar_export.targets import Target
from osscar_export.tasks import Task


@dataclass(frozen=True)
class JobConfig:
    """Everything one run of ``osscar-export MODEL`` depends on."""

    model: str
    latency_ms: tuple[float, ...] = ()
    speedup: tuple[float, ...] = ()
    target: str = "ort-cpu"
    threads: int = 1
    calib: str | None = None  # calibration source; None: the task's default
    n_calib: int | None = None  # calibration samples; None: the task's default
    seq_len: int = 128
    batch: int = 1
    image_size: int | None = None
    method: str = "osscar"
    mode: str = "best"  # of the final prune: "sequential", "dense", or "best" (both; the lower held-out loss wins)
    levels: int = 16  # error-curve points per group
    n_eval: int = 16
    out: Path = Path("out")
    force: bool = False
    tables: Path = Path("latency_tables")
    seed: int = 0
    clock: str = "auto"  # "wall", "thread", or "auto" (see pipeline.measure_settings)
    search: bool = True  # score candidate allocations end to end (search.py); False: the plain knapsack


@dataclass
class Prepared:
    """What every budget of a job shares: the model, its plan, calibration, curves and table."""

    loaded: LoadedModel
    task: Task
    plan: StructurePlan
    calibration: list[tuple]  # n_calib samples, in batches
    n_calib: int
    held_out: list[tuple]  # further samples from the same source, never in the Grams: the search scores on them
    grams: Grams  # dense, of the calibration data
    curves: dict[str, Any]
    curves_dir: Path  # the error curves' cache (with their supports)
    table: LatencyTable
    target: Target  # compiled for the model's example inputs
    settings: MeasureSettings  # how the table was and every model is timed
    scorer: Scorer | None = None  # built on first use: it memoises solves across budgets


@dataclass
class Outcome:
    """One pruned model of the family: its budget, allocation, measurements and quality."""

    label: str
    budget_ms: float
    allocation: Allocation
    candidates: list[Candidate]  # allocations scored end to end by the search (empty without it)
    result: PruneResult
    mode: str  # the final prune's calibration mode
    mode_losses: dict[str, float]  # held-out end-to-end loss of each mode tried (empty when one was asked for)
    measured_ms: float
    noisy: bool
    quality: dict[str, float]
    artifacts: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, float]] = field(default_factory=list)  # predicted / measured ms of each model built
