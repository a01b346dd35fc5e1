"""Timing one compiled model robustly on a machine that other work may share.

The estimate is the minimum of the repeat medians: interference only ever slows a run down, so
the fastest typical repeat is closest to the undisturbed time. The effort scales with the model:
each attempt spends about ``timed_s`` seconds on timed runs (at least ``min_iters`` per repeat),
so a 1 s forward is not run 100 times while a 1 ms region still gets ``iters`` runs per repeat. Interference is detected (repeat
medians that disagree, or a fixed reference loop that changed speed between before and after)
and re-measured a bounded number of times; the result says when it never became clean.

Two clocks: ``wall`` is the latency a user sees; ``thread`` is the CPU time of the calling
thread, which does not count time spent descheduled, so preemption does not stretch long runs
more than short ones. It only measures targets whose work runs on the calling thread
(``Target.runs_on_calling_thread``). See docs/design.md, section Latency.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from osscar_export.errors import OsscarError
from osscar_export.targets import Runnable, Target

CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}


@dataclass(frozen=True)
class MeasureSettings:
    """How a latency is measured; stored with every table so numbers can be reproduced."""

    warmup: int = 5  # at most; warm-up stops once it has taken a quarter of timed_s
    repeats: int = 5
    iters: int = 20  # runs per repeat at most
    min_iters: int = 2  # runs per repeat at least (up to iters), however slow a run is
    timed_s: float = 2.0  # timed work per attempt, which sets the runs per repeat between the two
    max_spread: float = 0.10  # repeat medians may differ by this fraction of the fastest
    max_drift: float = 0.10  # the reference loop may change speed by this fraction
    max_attempts: int = 3
    clock: str = "wall"  # "wall" or "thread" (CPU time of the calling thread)

    def __post_init__(self) -> None:
        if (self.warmup < 0 or self.repeats < 1 or self.iters < 1 or self.max_attempts < 1
                or self.min_iters < 1 or not self.timed_s > 0):
            raise ValueError(f"bad measurement settings: {self}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {self.clock!r}")


@dataclass(frozen=True)
class Timing:
    """One latency: ``ms`` is the minimum of the repeat medians of the accepted attempt."""

    ms: float
    repeat_ms: tuple[float, ...]  # the median of each repeat
    spread: float  # (max - min) / min of the repeat medians
    drift: float  # relative change of the reference loop, before vs after
    attempts: int
    noisy: bool  # no attempt passed the spread and drift checks
    runs: int = 0  # timed runs of the accepted attempt: the figure rests on these


def _reference_ms(clock: Callable[[], int], loops: int = 3) -> float:
    """A fixed single-threaded CPU workload; its time drifting reveals a machine changing speed."""
    best = math.inf
    for _ in range(loops):
        t0 = clock()
        acc = 0
        for i in range(100_000):
            acc += i * i
        best = min(best, (clock() - t0) / 1e6)
    return best


def _attempt(runnable: Runnable, prepared: tuple, s: MeasureSettings) -> Timing:
    clock = CLOCKS[s.clock]
    before = _reference_ms(clock)
    run_ms, spent = math.inf, 0.0
    for k in range(s.warmup):
        if k and spent >= s.timed_s / 4:
            break
        t0 = clock()
        runnable(*prepared)
        run_ms = (clock() - t0) / 1e6
        spent += run_ms / 1e3
    iters = _iters(s, run_ms)
    medians = []
    for _ in range(s.repeats):
        samples = []
        for _ in range(iters):
            t0 = clock()
            runnable(*prepared)
            samples.append((clock() - t0) / 1e6)
        medians.append(statistics.median(samples))
    after = _reference_ms(clock)
    fastest = min(medians)
    spread = (max(medians) - fastest) / fastest if fastest > 0 else 0.0
    drift = abs(after - before) / min(after, before)
    noisy = spread > s.max_spread or drift > s.max_drift
    return Timing(fastest, tuple(medians), spread, drift, 1, noisy, s.repeats * iters)


def _iters(s: MeasureSettings, run_ms: float) -> int:
    """Runs per repeat so that the repeats take about ``timed_s`` at ``run_ms`` per run (the last
    warm-up run; ``iters`` without warm-up)."""
    if not 0 < run_ms < math.inf:
        return s.iters
    return min(s.iters, max(s.min_iters, int(s.timed_s * 1e3 / (s.repeats * run_ms))))


def measure(
    runnable: Runnable,
    inputs: Sequence[torch.Tensor],
    settings: MeasureSettings = MeasureSettings(),
) -> Timing:
    """Latency of ``runnable`` on ``inputs`` in milliseconds; re-measured while interference shows.

    Returns the first clean attempt; when none is clean, the fastest attempt with ``noisy=True``.
    Threads are the runnable's business (a target compiles with its own thread count).
    """
    prepared = runnable.prepare(inputs)
    tries: list[Timing] = []
    for attempt in range(1, settings.max_attempts + 1):
        t = _attempt(runnable, prepared, settings)
        if not t.noisy:
            return dataclasses.replace(t, attempts=attempt)
        tries.append(t)
    return dataclasses.replace(min(tries, key=lambda t: t.ms), attempts=len(tries))


def measure_settings(clock: str, target: Target) -> MeasureSettings:
    """``auto`` picks the thread CPU-time clock where it measures everything (single-threaded CPU
    targets): on a shared machine wall time swings with the other tenants' load, and a table
    measured while the load changed has steps between adjacent widths, while thread time stays
    steady (measured in docs/results.md). Elsewhere it is wall time."""
    if clock == "auto":
        clock = "thread" if target.runs_on_calling_thread() else "wall"
    if clock not in CLOCKS:
        raise OsscarError(f"clock must be auto, {' or '.join(sorted(CLOCKS))}; got {clock!r}")
    if clock == "thread" and not target.runs_on_calling_thread():
        raise OsscarError(f"--clock thread only measures single-threaded CPU targets, not {target.name} with {target.threads} thread(s)")
    return MeasureSettings(clock=clock)
