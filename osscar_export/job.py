"""The job's data: what a run is asked for, what it shares across budgets, what it produced.

Plain records, apart from the orchestration in ``pipeline`` that fills them and the ``report``
that writes them, so neither of those has to import the other (docs/design.md, "Pipeline").
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from osscar_export import cache
from osscar_export.allocate import Allocation
from osscar_export.calibration_data import calibration_split
from osscar_export.errors import OsscarError
from osscar_export.fanout import Engine
from osscar_export.latency.table import LatencyTable
from osscar_export.latency.timing import MeasureSettings
from osscar_export.memory import release_memory
from osscar_export.models import LoadedModel
from osscar_export.passes.base import Grams
from osscar_export.plan import GroupKind, StructurePlan
from osscar_export.prune import PruneResult
from osscar_export.search import Candidate, Scorer
from osscar_export.targets import Target
from osscar_export.tasks import TASKS, Task

# A model measured at most this fraction over its budget meets it. One rule (``meets_budget``)
# for the pipeline's rebuild loop, the report's "meets_budget" and the command's exit code: the
# latency table's prediction and a single timing are both this uncertain.
BUDGET_TOLERANCE = 0.02
# what a job can write: ONNX, a torch.export archive, a Hugging Face folder (causal LMs)
FORMATS = ("onnx", "pt2", "hf")


def meets_budget(measured_ms: float, budget_ms: float) -> bool:
    """Whether a measured latency meets its budget, within ``BUDGET_TOLERANCE``."""
    return measured_ms <= budget_ms * (1 + BUDGET_TOLERANCE)


def check_budget(value: float, flag: str) -> float:
    """``value`` if it is a usable budget for ``flag``: a finite number of milliseconds above 0,
    or a finite speedup above 1. A speedup of 1 or less asks for the dense model, which needs
    no pruning, so it is refused rather than quietly pruned (or quietly copied)."""
    low = 1.0 if flag == "--speedup" else 0.0
    if not (math.isfinite(value) and value > low):
        what = "a speedup must be a finite number above 1 (the dense model is the speedup 1)" if low else \
            "a latency budget must be a finite number of milliseconds above 0"
        raise OsscarError(f"{flag} {value:g}: {what}")
    return value


def parse_keep_fraction(text: str) -> tuple[tuple[str, float], ...]:
    """``--keep-fraction``: one fraction for every kind (``0.5``) or fractions per kind
    (``neuron=0.5,kv_group=0.67``; kinds not named stay whole), as ``(kind, fraction)`` pairs,
    ``"*"`` standing for every kind. Values are checked by ``JobConfig``."""
    def number(value: str, what: str) -> float:
        try:
            return float(value)
        except ValueError:
            raise OsscarError(f"--keep-fraction {text}: {what} {value!r} is not a number") from None

    text = text.strip()
    if "=" not in text:
        return (("*", number(text, "the fraction")),)
    pairs = []
    for item in text.split(","):
        kind, sep, value = item.partition("=")
        if not sep:
            raise OsscarError(f"--keep-fraction {text}: {item!r} is not KIND=FRACTION; give one number, or KIND=FRACTION,...")
        pairs.append((kind.strip(), number(value.strip(), f"the fraction of {kind.strip()}")))
    return tuple(pairs)


def check_keep_fraction(pairs: tuple[tuple[str, float], ...]) -> None:
    """Fractions in (0, 1] of known kinds, each kind once: a fraction above 1 or at 0 is no
    pruning or no layer, and a misspelt kind would silently keep that kind whole."""
    kinds = get_args(GroupKind)
    seen = set()
    for kind, f in pairs:
        if kind not in kinds and not (kind == "*" and len(pairs) == 1):
            raise OsscarError(f"--keep-fraction: unknown kind {kind!r}; the kinds are {', '.join(kinds)}")
        if kind in seen:
            raise OsscarError(f"--keep-fraction: {kind!r} is given twice")
        seen.add(kind)
        if not (math.isfinite(f) and 0 < f <= 1):
            raise OsscarError(f"--keep-fraction {'' if kind == '*' else kind + '='}{f:g}: a kept fraction must be above 0 "
                              "and at most 1")


class Stages:
    """Seconds spent per stage of a job (summed over budgets and attempts), and the process's peak
    resident memory when each stage last ended: the log's last line and the report's
    ``stage_seconds`` / ``stage_peak_rss_mb`` say where a job's time and memory went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.peak_rss_mb[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            release_memory()

    def summary(self) -> str:
        return ", ".join(f"{name} {s:.0f} s" for name, s in self.seconds.items()) + \
            f"; peak memory {max(self.peak_rss_mb.values(), default=0) / 1024:.1f} GiB"


@dataclass(frozen=True)
class JobConfig:
    """Everything one run of ``osscar-export MODEL`` depends on; budgets are checked on
    construction, so the Python API refuses what the command line refuses."""

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
    tables: Path | None = None  # read first and saved to; None: the user cache (latency.table.lookup_dirs)
    seed: int = 0
    clock: str = "auto"  # "wall", "thread", or "auto" (see pipeline.measure_settings)
    search: bool = True  # score candidate allocations end to end (search.py); False: the plain knapsack
    intercept: bool = False  # re-fit each consumer's bias too (passes/solve.py): off, it measured worse (docs/results.md)
    recover_minutes: float = 0.0  # distil the pruned model against the dense one this long (recover.py); 0: off
    recover_params: str = "all"  # what recovery trains: "all" or "norms-biases"
    device: str = "cpu"  # where recovery trains
    formats: tuple[str, ...] = ()  # of FORMATS; empty: every one that applies to the model (pipeline.output_formats)
    keep_fraction: tuple[tuple[str, float], ...] = ()  # (kind or "*", fraction): replaces a budget (parse_keep_fraction)
    workers: int = 1  # error curves and dense-mode solves on this many Ray workers (fanout.Engine); 1: in this process
    ray_address: str | None = None  # an existing Ray cluster to run them on instead

    @property
    def engine(self) -> Engine:
        """Where the error curves and the dense-mode layer problems are solved."""
        return Engine(self.workers, self.ray_address)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            raise OsscarError(f"--formats {','.join(unknown)}: not a format; choose among {', '.join(FORMATS)}")
        if not (math.isfinite(self.recover_minutes) and self.recover_minutes >= 0):
            raise OsscarError(f"--recover-minutes {self.recover_minutes:g}: give a finite number of minutes, 0 for none")
        for ms in self.latency_ms:
            check_budget(ms, "--latency-ms")
        for s in self.speedup:
            check_budget(s, "--speedup")
        check_keep_fraction(self.keep_fraction)
        Engine(self.workers, self.ray_address)  # refuses --workers below 1
        if self.keep_fraction and (self.latency_ms or self.speedup):
            raise OsscarError("--keep-fraction replaces a latency budget: give it or --latency-ms / --speedup, not both")


def samples(batches: list[tuple]) -> int:
    """Samples in ``batches`` (their first inputs' leading dims): what the report counts."""
    return sum(int(b[0].shape[0]) for b in batches)


@dataclass(frozen=True)
class CalibrationData:
    """The batches a job calibrates and scores on, and the run folder that caches what they give."""

    task: Task
    n_calib: int  # the samples asked for
    source: str
    calibration: list[tuple]
    held_out: list[tuple]  # none when neither the search nor --mode best scores
    work: Path  # cache.run_dir of this model and calibration


def calibration_data(cfg: JobConfig, loaded: LoadedModel) -> CalibrationData:
    """The job's calibration and held-out batches and its run folder: one rule for the job and
    ``--dry-run``, so the dry run looks for the caches the job will use."""
    task = TASKS[loaded.task]
    n_calib = cfg.n_calib or task.n_calib
    n_score = task.n_score if cfg.search or cfg.mode == "best" else 0
    source = task.calibration_source(loaded) if cfg.calib is None else cfg.calib
    calibration, held_out = calibration_split(source, loaded, n_calib, n_score, cfg.seed)
    work = cache.run_dir(cfg.model, cfg.seq_len, cfg.batch, cfg.image_size, cfg.calib, n_calib, cfg.seed)
    return CalibrationData(task, n_calib, str(source), calibration, held_out, work)


@dataclass
class Prepared:
    """What every budget of a job shares: the model, its plan, calibration, curves and table."""

    loaded: LoadedModel
    task: Task
    plan: StructurePlan
    calibration: list[tuple]  # about n_calib samples, in batches (a tensor file gives all it holds)
    n_calib: int  # the samples asked for
    held_out: list[tuple]  # further samples from the same source, never in the Grams: the search scores on them
    grams: Grams | None  # dense, of the calibration data; None once dropped for the exports (pipeline._release)
    curves: dict[str, Any] | None  # None with --keep-fraction, which needs neither curves nor a table
    curves_dir: Path  # the error curves' cache (with their supports)
    table: LatencyTable | None
    target: Target  # compiled for the model's example inputs
    settings: MeasureSettings  # how the table was and every model is timed
    stages: Stages = field(default_factory=Stages)
    scorer: Scorer | None = None  # built on first use, dropped before the exports (pipeline._release)
    reference: tuple[list[tuple], list[Any]] | None = None  # scored batches and dense outputs there (pipeline._reference)


@dataclass
class Attempt:
    """One model built for a budget. A budget may take several (each rebuilt for a tighter
    allocation) and the job keeps the fastest, so each has its own artifacts until then."""

    number: int  # 1 for the first model built for the budget
    allocation: Allocation | None  # None with --keep-fraction
    candidates: list[Candidate]
    result: PruneResult
    mode: str
    mode_losses: dict[str, float]
    folder: Path  # its model.onnx and model.pt2
    artifacts: dict[str, Any]  # the export reports (parity)
    measured_ms: float | None  # the lower of its timings (interference only ever slows a run down); None: not timed
    noisy: bool  # that timing never measured clean


@dataclass
class Outcome:
    """One pruned model of the family: its budget, allocation, measurements and quality; with
    ``--keep-fraction`` there is no budget, allocation or measurement (None)."""

    label: str
    budget_ms: float | None
    allocation: Allocation | None
    candidates: list[Candidate]  # allocations scored end to end by the search (empty without it)
    result: PruneResult
    mode: str  # the final prune's calibration mode
    mode_losses: dict[str, float]  # held-out end-to-end loss of each mode tried (empty when one was asked for)
    measured_ms: float | None
    noisy: bool
    quality: dict[str, float]
    artifacts: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)  # each model built: predicted / measured ms, kept or not
    recovery: dict[str, Any] | None = None  # what --recover-minutes did, with the one-shot model's quality

    @property
    def meets_budget(self) -> bool:
        """Whether the model meets its budget; one without a budget has nothing to miss."""
        if self.budget_ms is None:
            return True
        return meets_budget(self.measured_ms, self.budget_ms)
