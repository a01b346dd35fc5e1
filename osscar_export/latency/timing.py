"""Timing one compiled model robustly on a machine that other work may share.

The estimate is the minimum of the repeat medians: interference only ever slows a run down, so
the fastest typical repeat is closest to the undisturbed time. Interference is detected (repeat
medians that disagree, or a fixed reference loop that changed speed between before and after)
and re-measured a bounded number of times; the result says when it never became clean.

Two clocks: ``wall`` is the latency a user sees; ``thread`` is the CPU time of the calling
thread, which does not count time spent descheduled, so preemption does not stretch long runs
more than short ones. It only measures targets whose work runs on the calling thread
(``Target.runs_on_calling_thread``). See docs/design.md, section Latency.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from osscar_export.targets import Runnable

CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}


@dataclass(frozen=True)
class MeasureSettings:
    """How a latency is measured; stored with every table so numbers can be reproduced."""

    warmup: int = 5
    repeats: int = 5
    iters: int = 20
    max_spread: float = 0.10  # repeat medians may differ by this fraction of the fastest
    max_drift: float = 0.10  # the reference loop may change speed by this fraction
    max_attempts: int = 3
    clock: str = "wall"  # "wall" or "thread" (CPU time of the calling thread)

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or self.iters < 1 or self.max_attempts < 1:
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
    for _ in range(s.warmup):
        runnable(*prepared)
    medians = []
    for _ in range(s.repeats):
        samples = []
        for _ in range(s.iters):
            t0 = clock()
            runnable(*prepared)
            samples.append((clock() - t0) / 1e6)
        medians.append(statistics.median(samples))
    after = _reference_ms(clock)
    fastest = min(medians)
    spread = (max(medians) - fastest) / fastest if fastest > 0 else 0.0
    drift = abs(after - before) / min(after, before)
    noisy = spread > s.max_spread or drift > s.max_drift
    return Timing(fastest, tuple(medians), spread, drift, 1, noisy)


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
            return Timing(t.ms, t.repeat_ms, t.spread, t.drift, attempt, False)
        tries.append(t)
    best = min(tries, key=lambda t: t.ms)
    return Timing(best.ms, best.repeat_ms, best.spread, best.drift, len(tries), True)
