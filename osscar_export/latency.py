"""Latency: robust timing of a compiled model and the per-group latency table (DESIGN.md §6).

``measure`` times one ``Runnable``: warm-up, several repeats of several iterations, the minimum
of the repeat medians (interference only ever slows a run down, so the fastest typical repeat is
the best estimate of the undisturbed time). It detects interference two ways: the repeat medians
disagree, or a fixed calibration loop timed before and after has drifted (the machine changed
speed meanwhile). Either re-measures, a bounded number of times, and the result says if it never
became clean.

Two clocks. ``wall`` (default) is the latency a user sees. ``thread`` is the CPU time of the
calling thread: on a shared machine, preemption stretches long calls far more than short ones
(a 12 ms model measured 25 ms wall while its 1 ms regions were barely touched), which biases a
table of short regions against a long end-to-end run; thread CPU time does not count time spent
descheduled. It is only meaningful for single-threaded CPU targets, whose work runs on the
calling thread (``Target.runs_on_calling_thread``).

A ``LatencyTable`` holds, for one target and one model, the time of each group's region at each
kept width, plus the dense time and the base time of everything not prunable. End-to-end time is
modelled additively, ``T = base + scale * sum_g t_g(k_g)`` (SPDY/ZipLM use scale 1), and the
table is measured, never modelled from FLOPs: latency is not monotonic in width.

Why a scale: a region timed alone runs with its weights hot in cache; inside the whole model the
other layers evict them, so every region is slower in context, and pruning shrinks the working
set as well. With scale 1 the prediction missed by a near-constant 1-1.5 ms on a 12 ms model
(MAPE 18%, up to 55% at the smallest widths). ``measure_latency`` therefore measures a few
allocations end to end (``LatencyTable.calibration_plan``) and fits ``base`` and ``scale`` to them
by least squares on the relative error (``fit_calibration``); the regions still decide the shape
of the curve between them. The allocator stays a knapsack: ``scale > 0`` and ``base`` only
convert the budget.

Why more than two points: through the dense model and the fastest allocation alone, the line
was exact at both ends but on EfficientNet-Lite0 over-predicted the allocator's mid-range
allocations by up to 16%. Regions do not add up exactly in context (onnxruntime runs a
convolution net in a blocked channel layout while every width is a multiple of 4 and converts
layouts around the other widths, which a region timed alone sees differently), and the fastest
allocation, with its odd widths, is unlike what the allocator picks. So the mid points are
allocations the allocator itself makes (``LatencyTable.calibration_plan``); on the same
measurements they cut the worst error from 16% to 12% (a line fitted to the allocator's own ten
allocations still misses one by 9%: the rest is not a calibration error). Every point is timed
in interleaved rounds, keeping each one's fastest, because on a shared machine one end-to-end
timing of the same model moved by up to 15% from one minute to the next.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from osscar_export.atomic import write_text
from osscar_export.errors import LatencyTableError, PlanError
from osscar_export.plan import StructureGroup, StructurePlan
from osscar_export.targets import Runnable, Target

SCHEMA = "osscar-export/latency-table"
SCHEMA_VERSION = 2  # 2: calibration points replace fastest_ms; version 1 still loads
CALIBRATION_FRACTIONS = (0.25, 0.5, 0.75)  # mid points, between each group's fastest and full time
CALIBRATION_ROUNDS = 2  # interleaved timing rounds of the calibration points
CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}


# --------------------------------------------------------------------------------------------
# measuring one runnable


@dataclass(frozen=True)
class MeasureSettings:
    """How a latency is measured; stored with every table so numbers can be reproduced."""

    warmup: int = 5
    repeats: int = 5
    iters: int = 20
    max_spread: float = 0.10  # repeat medians may differ by this fraction of the fastest
    max_drift: float = 0.10  # the calibration loop may change speed by this fraction
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
    drift: float  # relative change of the calibration loop, before vs after
    attempts: int
    noisy: bool  # no attempt passed the spread and drift checks


def _calibration_ms(clock: Callable[[], int], loops: int = 3) -> float:
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
    before = _calibration_ms(clock)
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
    after = _calibration_ms(clock)
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


# --------------------------------------------------------------------------------------------
# width grid


def width_grid(group: StructureGroup, *, align: int = 8, max_levels: int = 32) -> list[int]:
    """Kept widths (structure counts) at which a group is measured.

    Channels and neurons: multiples of ``align`` (runtimes vectorise over 8/16 lanes), thinned to
    at most about ``max_levels`` levels. Heads and KV groups are whole already: every count,
    thinned the same way when there are many. Always includes 1 and the full width.
    """
    n = group.count
    base = align if group.kind in ("channel", "neuron") else 1
    step = base * max(1, math.ceil(n / (base * max_levels)))
    return sorted({1, n, *range(step, n, step)})


# --------------------------------------------------------------------------------------------
# the table


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def graph_signature(program: torch.export.ExportedProgram) -> str:
    """A hash of what a latency depends on: op sequence, tensor shapes/dtypes of every node and
    parameter. Equal for the 30 identical MLPs of one LM; different after any shape change."""
    ops = []
    for node in program.graph.nodes:
        val = node.meta.get("val")
        shape = [str(tuple(val.shape)), str(val.dtype)] if isinstance(val, torch.Tensor) else None  # str: SymInts
        ops.append([node.op, str(node.target) if node.op == "call_function" else "", shape])
    params = sorted(
        (list(t.shape), str(t.dtype)) for t in list(program.state_dict.values()) + list(program.constants.values())
        if isinstance(t, torch.Tensor)
    )
    return _digest({"ops": ops, "params": params})[:24]


def table_key(fingerprint: Mapping[str, Any], settings: Mapping[str, Any], model_signature: str) -> str:
    """Cache key of a table: device fingerprint + target settings + model graph signature."""
    return _digest({"fingerprint": fingerprint, "target": settings, "model": model_signature})[:20]


def table_path(directory: str | Path, target: Target, model_signature: str) -> Path:
    """Where the table for this target and model lives under ``directory``."""
    return Path(directory) / f"{target.name}-{table_key(target.fingerprint(), target.settings(), model_signature)}.json"


@dataclass(frozen=True)
class CalibrationPoint:
    """One allocation timed end to end; groups not in ``widths`` stay at full width."""

    label: str  # "dense", "fastest", "mid-25", ...
    widths: dict[str, int]
    ms: float


def fit_calibration(points: Sequence[tuple[float, float]], *, min_spread: float = 0.05) -> tuple[float, float]:
    """``(base, scale)`` of ``T = base + scale * S`` from ``(S, T)`` pairs (region sum, measured ms).

    Least squares on the relative error, ``sum_i ((base + scale S_i - T_i) / T_i)^2``: a budget
    and the reported error are relative, and plain least squares lets the long dense run outvote
    the fastest point, which it then missed by 8%. When the region sums span less than
    ``min_spread`` of the largest (nothing prunable saves time) or the fit is not increasing,
    the slope is not determined: ``scale = 1`` and ``base`` is the relative-error fit of the offset.
    """
    if not points:
        raise ValueError("no calibration points to fit")
    if any(not (math.isfinite(s) and math.isfinite(t) and t > 0) for s, t in points):
        raise ValueError(f"calibration points must be finite with positive times, got {list(points)}")
    w = [1 / t**2 for _, t in points]
    sw = sum(w)
    ss = sum(wi * s for wi, (s, _) in zip(w, points))
    st = sum(wi * t for wi, (_, t) in zip(w, points))
    sums = [s for s, _ in points]
    if max(sums) - min(sums) > min_spread * max(abs(v) for v in sums):
        sss = sum(wi * s * s for wi, (s, _) in zip(w, points))
        sst = sum(wi * s * t for wi, (s, t) in zip(w, points))
        scale = (sw * sst - ss * st) / (sw * sss - ss * ss)
        if math.isfinite(scale) and scale > 0:
            return (st - scale * ss) / sw, scale
    return (st - ss) / sw, 1.0


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _calibration_point(raw: Any, bad: Callable[[str], LatencyTableError]) -> CalibrationPoint:
    """A stored calibration point, type-checked (whether its widths exist is the table's check)."""
    if not (isinstance(raw, dict) and set(raw) == {"label", "widths", "ms"}):
        raise bad(f"calibration point {raw!r} is not an object with label, widths and ms")
    label, widths, ms = raw["label"], raw["widths"], raw["ms"]
    if not isinstance(label, str) or not label:
        raise bad(f"calibration label {label!r} is not a non-empty string")
    if not isinstance(widths, dict) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in widths.values()):
        raise bad(f"calibration point {label!r} has widths that are not positive integers")
    if not _is_number(ms) or ms <= 0:
        raise bad(f"calibration point {label!r} has ms = {ms!r}, not a finite positive number")
    return CalibrationPoint(label, dict(widths), float(ms))


@dataclass
class LatencyTable:
    """(group signature, kept width) → ms on one target, plus ``base_ms``, ``scale``, ``dense_ms``.

    ``groups`` maps each group name to its signature; groups with equal signatures (identical
    layers) share one measured curve in ``times``. ``calibration`` holds the allocations timed
    end to end that ``base_ms`` and ``scale`` were fitted to (empty when not calibrated).
    """

    fingerprint: dict[str, Any]
    target: dict[str, Any]  # Target.settings()
    model_signature: str
    measurement: dict[str, Any]  # MeasureSettings as a dict
    dense_ms: float
    base_ms: float
    groups: dict[str, str]  # group name → signature
    times: dict[str, dict[int, float]]  # signature → kept width → ms
    noisy: list[str] = field(default_factory=list)  # "signature@width" / "dense" measured with interference
    scale: float = 1.0
    calibration: list[CalibrationPoint] = field(default_factory=list)

    @property
    def key(self) -> str:
        return table_key(self.fingerprint, self.target, self.model_signature)

    def _curve(self, group: str) -> dict[int, float]:
        try:
            return self.times[self.groups[group]]
        except KeyError:
            raise LatencyTableError(
                f"latency table has no group {group!r} ({len(self.groups)} groups); it was measured for "
                "another plan: re-measure"
            ) from None

    def widths(self, group: str) -> list[int]:
        return sorted(self._curve(group))

    def full_width(self, group: str) -> int:
        return max(self._curve(group))

    def ms(self, group: str, width: int) -> float:
        curve = self._curve(group)
        if width not in curve:
            raise LatencyTableError(f"group {group!r} was not measured at width {width} (widths: {sorted(curve)})")
        return curve[width]

    def region_ms(self, widths: Mapping[str, int]) -> float:
        """``sum_g t_g(k_g)``, the regions' times as measured alone; groups not in ``widths`` stay full."""
        unknown = set(widths) - set(self.groups)
        if unknown:
            raise LatencyTableError(f"latency table has no group(s) {sorted(unknown)[:5]}: re-measure")
        return sum(self.ms(g, widths.get(g, self.full_width(g))) for g in self.groups)

    def predict(self, widths: Mapping[str, int]) -> float:
        """Predicted end-to-end ms: ``base + scale * sum_g t_g(k_g)``; groups not in ``widths`` stay full."""
        return self.base_ms + self.scale * self.region_ms(widths)

    def fastest_widths(self) -> dict[str, int]:
        """Every group at its fastest measured width (latency is not monotonic: not always 1)."""
        return {g: min(self._curve(g).items(), key=lambda kv: (kv[1], kv[0]))[0] for g in self.groups}

    @property
    def fastest_ms(self) -> float | None:
        """Measured end-to-end ms of the fastest allocation (None when it was not calibrated on)."""
        return next((p.ms for p in self.calibration if p.label == "fastest"), None)

    def calibration_plan(self) -> dict[str, dict[str, int]]:
        """The allocations to time end to end, label → widths of the groups not at full width.

        The dense model; the fastest allocation; and for each fraction f of
        ``CALIBRATION_FRACTIONS`` the allocator's own choice (``allocate``) at a region time
        ``f`` of the way from the fastest allocation to the dense model, for a loss that values
        every structure of a group alike (the fraction of the group removed): the allocations the
        table has to predict are the allocator's, and it favours widths that are cheap for their
        size, such as multiples of 4 on onnxruntime, which run faster in context than their region
        times say. Only the dense model when the fastest allocation saves under 5% of the regions'
        time (no slope to fit). Allocations equal to an earlier one are left out.
        """
        from osscar_export.allocate import allocate

        full = {g: self.full_width(g) for g in self.groups}
        fastest = self.fastest_widths()
        lo, hi = self.region_ms(fastest), self.region_ms({})
        if hi - lo <= 0.05 * hi:
            return {"dense": {}}
        regions = copy.copy(self)
        regions.base_ms, regions.scale = 0.0, 1.0  # budgets in region time
        loss = {g: (self.widths(g), [1 - k / full[g] for k in self.widths(g)]) for g in self.groups}
        candidates: list[tuple[str, dict[str, int]]] = [("dense", {}), ("fastest", fastest)]
        candidates += [(f"mid-{round(100 * f)}", allocate(loss, regions, lo + f * (hi - lo)).widths) for f in CALIBRATION_FRACTIONS]
        plan: dict[str, dict[str, int]] = {}
        for label, widths in candidates:
            pruned = {g: k for g, k in sorted(widths.items()) if k != full[g]}
            if pruned not in plan.values():
                plan[label] = pruned
        return plan

    def calibrate(self, points: Sequence[CalibrationPoint]) -> None:
        """Store the end-to-end points and fit ``base_ms`` / ``scale`` to them (``fit_calibration``)."""
        self.base_ms, self.scale = fit_calibration([(self.region_ms(p.widths), p.ms) for p in points])
        self.calibration = list(points)

    def stale_reason(self, fingerprint: Mapping[str, Any], settings: Mapping[str, Any], model_signature: str) -> str | None:
        """Why this table does not apply to the given device/target/model, or None when it does."""
        if dict(fingerprint) != self.fingerprint:
            changed = sorted(k for k in set(fingerprint) | set(self.fingerprint) if fingerprint.get(k) != self.fingerprint.get(k))
            return f"device/software fingerprint differs in {changed}"
        if dict(settings) != self.target:
            changed = sorted(k for k in set(settings) | set(self.target) if settings.get(k) != self.target.get(k))
            return f"target settings differ in {changed}"
        if model_signature != self.model_signature:
            return "the model graph differs"
        return None

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "key": self.key,
            "fingerprint": self.fingerprint,
            "target": self.target,
            "model_signature": self.model_signature,
            "measurement": self.measurement,
            "dense_ms": self.dense_ms,
            "base_ms": self.base_ms,
            "groups": self.groups,
            "times": {sig: {str(w): ms for w, ms in sorted(c.items())} for sig, c in self.times.items()},
            "noisy": self.noisy,
            "scale": self.scale,
            "calibration": [{"label": c.label, "widths": c.widths, "ms": c.ms} for c in self.calibration],
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a reader sees the old table or the new one."""
        write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True))
        return Path(path)

    @classmethod
    def from_json(cls, data: Any, source: str = "<json>") -> "LatencyTable":
        """Validate everything first; a table is used whole or not at all."""

        def bad(why: str) -> LatencyTableError:
            return LatencyTableError(f"latency table {source} is invalid: {why}; delete it to re-measure")

        if not isinstance(data, dict):
            raise bad("not a JSON object")
        if data.get("schema") != SCHEMA:
            raise bad(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
        version = data.get("version")
        if version not in (1, SCHEMA_VERSION) or isinstance(version, bool):
            raise bad(f"version is {version!r}, this osscar-export reads versions 1 and {SCHEMA_VERSION}")
        types = {
            "key": str, "fingerprint": dict, "target": dict, "model_signature": str, "measurement": dict,
            "dense_ms": (int, float), "base_ms": (int, float), "groups": dict, "times": dict, "noisy": list,
            "scale": (int, float),
            # version 1 kept the one end-to-end point besides the dense model as fastest_ms
            **({"calibration": list} if version == SCHEMA_VERSION else {"fastest_ms": (int, float, type(None))}),
        }
        for name, typ in types.items():
            if not isinstance(data.get(name), typ) or isinstance(data.get(name), bool):
                raise bad(f"field {name!r} is missing or not a {typ}")
        times: dict[str, dict[int, float]] = {}
        for sig, curve in data["times"].items():
            if not isinstance(curve, dict) or not curve:
                raise bad(f"times[{sig!r}] is not a non-empty object")
            parsed = {}
            for w, ms in curve.items():
                if not (isinstance(w, str) and w.isdigit() and int(w) >= 1):
                    raise bad(f"times[{sig!r}] has a width {w!r} that is not a positive integer")
                if not _is_number(ms) or ms < 0:
                    raise bad(f"times[{sig!r}][{w}] = {ms!r} is not a finite non-negative number")
                parsed[int(w)] = float(ms)
            times[sig] = parsed
        for name, sig in data["groups"].items():
            if sig not in times:
                raise bad(f"group {name!r} has signature {sig!r} with no measured times")
        if not all(math.isfinite(data[k]) for k in ("dense_ms", "base_ms", "scale")) or data["scale"] <= 0:
            raise bad("dense_ms / base_ms are not finite or scale is not a positive number")
        table = cls(
            fingerprint=data["fingerprint"], target=data["target"], model_signature=data["model_signature"],
            measurement=data["measurement"], dense_ms=float(data["dense_ms"]), base_ms=float(data["base_ms"]),
            groups=dict(data["groups"]), times=times, noisy=list(data["noisy"]), scale=float(data["scale"]),
        )
        if table.key != data["key"]:
            raise bad("its key does not match its fingerprint/target/model (edited by hand?)")
        if version == SCHEMA_VERSION:
            points = [_calibration_point(raw, bad) for raw in data["calibration"]]
        else:
            points = [CalibrationPoint("dense", {}, table.dense_ms)]
            if data["fastest_ms"] is not None:
                full = {g: table.full_width(g) for g in table.groups}
                fastest = {g: k for g, k in sorted(table.fastest_widths().items()) if k != full[g]}
                points.append(CalibrationPoint("fastest", fastest, float(data["fastest_ms"])))
        if points:
            labels = [p.label for p in points]
            if len(set(labels)) != len(labels):
                raise bad(f"calibration labels repeat: {labels}")
            dense = next((p for p in points if p.label == "dense"), None)
            if dense is None or dense.widths or dense.ms != table.dense_ms:
                raise bad("its calibration has no dense point at dense_ms")
            try:
                base, scale = fit_calibration([(table.region_ms(p.widths), p.ms) for p in points])
            except LatencyTableError as e:
                raise bad(f"a calibration point does not fit its groups/widths ({e})") from None
            tol = 1e-6 * max(1.0, table.dense_ms)
            if not (math.isclose(base, table.base_ms, rel_tol=1e-6, abs_tol=tol) and math.isclose(scale, table.scale, rel_tol=1e-6)):
                raise bad(f"base_ms/scale ({table.base_ms:.6g}, {table.scale:.6g}) are not the fit of its calibration points "
                          f"({base:.6g}, {scale:.6g}) (edited by hand?)")
            table.calibration = points
        return table

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        """Read and validate a table; any defect raises ``LatencyTableError``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LatencyTableError(f"latency table {path} cannot be read ({e}); delete it to re-measure") from e
        return cls.from_json(data, str(path))


def find_table(directory: str | Path, target: Target, model_signature: str) -> LatencyTable | None:
    """The stored table for this target and model, or None when there is none or it is stale.

    A corrupt file raises (``LatencyTableError``) rather than being silently re-measured over,
    so a broken cache is noticed.
    """
    path = table_path(directory, target, model_signature)
    if not path.exists():
        return None
    table = LatencyTable.load(path)
    if table.stale_reason(target.fingerprint(), target.settings(), model_signature) is not None:
        return None
    return table


# --------------------------------------------------------------------------------------------
# measuring a plan: one region per group signature, at every width on its grid


def keep_first(count: int, width: int) -> torch.Tensor:
    """A keep mask of ``width`` structures out of ``count``. Which ones does not change a latency."""
    if not 1 <= width <= count:
        raise PlanError(f"kept width {width} is outside 1..{count}")
    mask = torch.zeros(count, dtype=torch.bool)
    mask[:width] = True
    return mask


def _owning_paths(group: StructureGroup) -> list[str]:
    """Module paths from the smallest one holding every tensor the group touches up to the root."""
    fqns = [s.target for s in group.slices()] + [c.weight for c in group.consumers]
    common = os.path.commonprefix([f.split(".")[:-1] for f in fqns])
    return [".".join(common[:i]) for i in range(len(common), -1, -1)]


@dataclass
class _Region:
    """A group's region, ready to materialize and time: a module, its recorded inputs, its plan.

    ``path`` is the owning submodule, or ``"<graph>"`` for a subgraph cut out of the program.
    """

    path: str
    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    plan: StructurePlan
    group: StructureGroup  # the group in ``plan`` (names relative to the region)


def _graph_key(graph: torch.fx.Graph) -> list:
    """Op sequence, wiring (nodes by position) and tensor shapes of a graph, for hashing."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    rows = []
    for node in graph.nodes:
        val = node.meta.get("val")
        shape = [str(tuple(val.shape)), str(val.dtype)] if isinstance(val, torch.Tensor) else None  # str: SymInts
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        target = "" if node.op in ("placeholder", "output") else str(node.target)  # names of values flowing in
        rows.append([node.op, target, str(args), shape])
    return rows


def _tensor_key(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> list:
    items = tensors.items() if isinstance(tensors, Mapping) else enumerate(tensors)
    return [[str(k), list(t.shape), str(t.dtype)] for k, t in items if isinstance(t, torch.Tensor)]


def _group_key(group: StructureGroup, rename: Callable[[str], str]) -> dict[str, Any]:
    """What of a group a region's latency depends on, with parameter names made region-relative."""
    return {
        "kind": group.kind, "count": group.count,
        "slices": sorted([rename(s.target), s.dim, s.unit, list(s.offsets)] for s in group.slices()),
        "consumers": sorted([rename(c.weight), c.input.dim, c.input.unit] for c in group.consumers),
    }


def _module_signature(module: torch.nn.Module, inputs: Sequence[torch.Tensor], group: StructureGroup, prefix: str) -> str:
    """Signature of a module region, computable before ``find_structures`` (identical layers:
    same code, shapes, relative parameter names and group tensors → same signature)."""
    graphs = [[name, _graph_key(m.graph)] for name, m in module.named_modules() if isinstance(getattr(m, "graph", None), torch.fx.Graph)]
    tensors = _tensor_key(dict(module.named_parameters())) + _tensor_key(dict(module.named_buffers()))
    return _digest({
        "module": graphs, "tensors": tensors, "inputs": _tensor_key(inputs),
        "group": _group_key(group, lambda f: f.removeprefix(prefix)),
    })[:24]


def _record_inputs(root: torch.nn.Module, paths: set[str], example_inputs: tuple) -> dict[str, list]:
    """Positional inputs of every call of the given submodules during one forward."""
    calls: dict[str, list] = {p: [] for p in paths}
    handles = []
    for path in paths:
        def hook(module, args, kwargs, path=path):
            calls[path].append((args, kwargs))

        handles.append(root.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            root(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _module_candidates(group: StructureGroup, root: torch.nn.Module, calls: Mapping[str, list]) -> tuple[list, list[str]]:
    """(path, module, inputs) of every proper submodule owning the group that was called once with
    plain tensors, smallest first; and why the others were skipped. The root is never one: timing
    the whole model per width is slow and noisy, the graph region replaces it."""
    found, skipped = [], []
    for path in _owning_paths(group)[:-1]:
        recorded = calls.get(path, [])
        if len(recorded) != 1:
            skipped.append(f"{path}: called {len(recorded)} times")
            continue
        args, kwargs = recorded[0]
        if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
            skipped.append(f"{path}: inputs are not plain tensors")
            continue
        found.append((path, root.get_submodule(path), tuple(args)))
    return found, skipped


def _match(sub_plan: StructurePlan, group: StructureGroup, fqn: Callable[[str], str]) -> StructureGroup | None:
    """The group of a region's plan that is ``group`` (same count and producer parameters)."""
    producers = {s.target for s in group.producers}
    for g in sub_plan.groups:
        if g.count == group.count and {fqn(s.target) for s in g.producers} == producers:
            return g
    return None


# --------------------------------------------------------------------------------------------
# graph regions: the group's nodes cut out of the program, for groups owned only by the root


def _hull(graph: torch.fx.Graph, region: set[str]) -> list[torch.fx.Node]:
    """The region's nodes plus every node on a path between two of them, in graph order."""
    nodes = list(graph.nodes)
    below: set[torch.fx.Node] = set()  # reachable from the region
    for n in nodes:
        if n.name in region or any(a in below for a in n.all_input_nodes):
            below.add(n)
    above: set[torch.fx.Node] = set()  # reaching the region
    for n in reversed(nodes):
        if n.name in region or any(u in above for u in n.users):
            above.add(n)
    return [n for n in nodes if n.op == "call_function" and (n.name in region or (n in below and n in above))]


@dataclass
class _Cut:
    """A group's subgraph before its inputs are known: nodes, external inputs, parameters, outputs."""

    nodes: list[torch.fx.Node]
    inputs: list[torch.fx.Node]  # activations flowing in (recorded from one run)
    params: list[torch.fx.Node]  # program placeholders of parameters/buffers/constants, first use order
    outputs: list[torch.fx.Node]  # region values used outside it


def _cut(program: torch.export.ExportedProgram, group: StructureGroup) -> _Cut:
    if not group.region:
        raise PlanError(f"group {group.name!r} has no region nodes: cannot cut its subgraph out of the program")
    nodes = _hull(program.graph, set(group.region))
    inside = set(nodes)
    lifted = {s.arg.name for s in program.graph_signature.input_specs if s.kind != torch.export.graph_signature.InputKind.USER_INPUT}
    inputs: dict[torch.fx.Node, None] = {}
    params: dict[torch.fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                (params if a.op == "placeholder" and a.name in lifted else inputs)[a] = None
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return _Cut(nodes, list(inputs), list(params), outputs)


def _record_values(program: torch.export.ExportedProgram, names: set[str], example_inputs: tuple) -> dict[str, Any]:
    """Values of the named nodes in one run of the program on its example inputs."""
    state = {**program.state_dict, **program.constants}
    user = iter(torch.utils._pytree.tree_leaves(example_inputs))
    args = [next(user) if s.kind == torch.export.graph_signature.InputKind.USER_INPUT else state[s.target] for s in program.graph_signature.input_specs]
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in names:
                values[n.name] = out
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(*args)
    return values


def _graph_module(program: torch.export.ExportedProgram, cut: _Cut, values: Mapping[str, Any]) -> tuple[torch.fx.GraphModule, tuple, dict[str, str]]:
    """The cut as a module: tensors flowing in are placeholders (other values are inlined),
    parameters are attributes named ``p0, p1, ...`` in first-use order (so identical cuts at
    different depths have identical modules). Returns the module, its inputs and name → FQN."""
    targets = {s.arg.name: s.target for s in program.graph_signature.input_specs if s.target is not None}
    state = {**program.state_dict, **program.constants}
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    inputs = []
    for n in cut.inputs:
        if isinstance(values[n.name], torch.Tensor):
            env[n] = graph.placeholder(n.name)
            env[n].meta = dict(n.meta)
            inputs.append(values[n.name])
        else:
            env[n] = values[n.name]
    fqn = {}
    for i, n in enumerate(cut.params):
        name, t = f"p{i}", state[targets[n.name]]
        fqn[name] = targets[n.name]
        if isinstance(t, torch.nn.Parameter):
            root.register_parameter(name, t)
        else:
            root.register_buffer(name, t)
        env[n] = graph.get_attr(name)
        env[n].meta = dict(n.meta)
    for n in cut.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    outs = [env[n] for n in cut.outputs]
    graph.output(outs[0] if len(outs) == 1 else tuple(outs))
    return torch.fx.GraphModule(root, graph), tuple(inputs), fqn


def _graph_signature_of(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], group: StructureGroup, fqn: Mapping[str, str]) -> str:
    name = {f: n for n, f in fqn.items()}
    return _digest({
        "graph": _graph_key(gm.graph), "tensors": _tensor_key(dict(gm.state_dict())), "inputs": _tensor_key(inputs),
        "group": _group_key(group, lambda f: name.get(f, f)),
    })[:24]


def measure_latency(
    plan: StructurePlan,
    target: Target,
    widths: Mapping[str, Sequence[int]] | None = None,
    *,
    settings: MeasureSettings = MeasureSettings(),
    cache_dir: str | Path | None = "latency_tables",
    log: Callable[[str], None] = lambda msg: None,
) -> LatencyTable:
    """The latency table of ``plan`` on ``target``; re-used from ``cache_dir`` when it matches
    (same device, target, model, measurement settings, and every requested width measured).

    Each group's region is the smallest proper submodule of the captured model that holds all its
    producers, followers and consumers (e.g. ``model.layers.0.mlp``), re-captured with the inputs
    it saw in one forward. When only the root owns the group (a stem spanning top-level modules)
    the region is instead the subgraph of the group's region nodes (plus the nodes between them),
    fed with the values recorded from one run of the program: timing the whole model per width
    would be slow and noisy. The region is materialized at each kept width (the other groups
    inside it stay whole), compiled by the target and timed. Its signature is computed before it
    is analysed, so groups with equal signatures (identical layers) are analysed and measured
    once. Then the allocations of ``LatencyTable.calibration_plan`` (the dense model, the
    fastest allocation, three allocator-made mid points) are timed end to end and ``base``/``scale``
    fitted to them (``fit_calibration``). ``base`` takes the rest of the model and absorbs
    per-call overhead, so it is not the time of the non-prunable ops alone. A stored table whose
    regions match but whose calibration is not its full plan (version 1 tables had two points)
    keeps its regions and is only re-calibrated.
    """
    from osscar_export.passes.materialize import materialize
    from osscar_export.passes.structures import find_structures

    target = target.for_inputs(plan.example_inputs)
    if settings.clock == "thread" and not target.runs_on_calling_thread():
        raise ValueError(
            f"clock 'thread' only measures single-threaded CPU targets; {target.settings()} is not one"
        )
    grid = {g.name: sorted({int(k) for k in widths[g.name]}) if widths and g.name in widths else width_grid(g) for g in plan.groups}
    for g in plan.groups:
        if not grid[g.name] or grid[g.name][0] < 1 or grid[g.name][-1] > g.count:
            raise PlanError(f"widths for {g.name!r} must lie in 1..{g.count}, got {grid[g.name]}")
        if g.count not in grid[g.name]:
            grid[g.name].append(g.count)  # full width anchors base_ms
    model_sig = graph_signature(plan.program)
    fingerprint = target.fingerprint()
    if cache_dir is not None:
        cached = find_table(cache_dir, target, model_sig)
        if (
            cached is not None
            and cached.measurement == asdict(settings)
            and set(cached.groups) == set(grid)
            and all(set(grid[g]) <= set(cached.widths(g)) for g in grid)
        ):
            path = table_path(cache_dir, target, model_sig)
            # labels, not widths: a change of the allocator alone should not re-time a table
            if [c.label for c in cached.calibration] == list(cached.calibration_plan()):
                log(f"latency table re-used: {path}")
                return cached
            log(f"latency table re-used: {path}; its end-to-end calibration has {len(cached.calibration)} of "
                f"{len(cached.calibration_plan())} points (an older osscar-export measured it): calibrating again")
            _calibrate(cached, plan, target, settings, log)
            cached.save(path)
            log(f"latency table saved: {path}")
            return cached

    # unflatten mutates the program it is given (graph and meta): work on a copy, the plan is read-only
    root = torch.export.unflatten(copy.deepcopy(plan.program))
    paths = {p for g in plan.groups for p in _owning_paths(g)} - {""}
    calls = _record_inputs(root, paths, tuple(plan.example_inputs))
    noisy: list[str] = []
    groups: dict[str, str] = {}
    times: dict[str, dict[int, float]] = {}

    def measured(group: StructureGroup, signature: str) -> bool:
        """Record the signature; True when every width of the group is already timed under it."""
        groups[group.name] = signature
        return set(grid[group.name]) <= set(times.get(signature, {}))

    def time_region(group: StructureGroup, region: _Region) -> None:
        curve = times.setdefault(groups[group.name], {})
        todo = [k for k in grid[group.name] if k not in curve]
        log(f"measuring {group.name} in {region.path or '<root>'} at {len(todo)} widths")
        for k in todo:
            # full width too goes through materialize: every width compiles from the same path
            module = materialize(region.module, region.plan, {region.group.name: keep_first(region.group.count, k)})
            timing = measure(target.compile(module, region.inputs), region.inputs, settings)
            curve[k] = timing.ms
            if timing.noisy:
                noisy.append(f"{groups[group.name]}@{k}")

    # the signature comes before find_structures: identical layers are analysed and timed once
    on_graph: list[StructureGroup] = []
    for g in plan.groups:
        candidates, skipped = _module_candidates(g, root, calls)
        for path, module, inputs in candidates:
            if measured(g, _module_signature(module, inputs, g, f"{path}.")):
                break
            sub_plan = find_structures(module, inputs)
            sub = _match(sub_plan, g, lambda t, path=path: f"{path}.{t}")
            if sub is not None:
                time_region(g, _Region(path, module, inputs, sub_plan, sub))
                break
            skipped.append(f"{path}: its plan has no group with the same producers")
        else:
            log(f"{g.name}: no module region ({'; '.join(skipped) or 'only the root owns it'}), cutting a subgraph")
            on_graph.append(g)
    # graph regions read the program only (no unflatten, no mutation): no copy needed
    cuts = {g.name: _cut(plan.program, g) for g in on_graph}
    values = _record_values(plan.program, {n.name for c in cuts.values() for n in c.inputs}, tuple(plan.example_inputs)) if cuts else {}
    for g in on_graph:
        gm, inputs, fqn = _graph_module(plan.program, cuts[g.name], values)
        if measured(g, _graph_signature_of(gm, inputs, g, fqn)):
            continue
        sub_plan = find_structures(gm, inputs)
        sub = _match(sub_plan, g, lambda t: fqn.get(t, t))
        if sub is None:
            raise PlanError(
                f"no region to measure group {g.name!r} in: its subgraph of {len(cuts[g.name].nodes)} nodes "
                f"has no group with the same producers ({[s.target for s in g.producers]})"
            )
        time_region(g, _Region("<graph>", gm, inputs, sub_plan, sub))
    table = LatencyTable(
        fingerprint=fingerprint, target=target.settings(), model_signature=model_sig,
        measurement=asdict(settings), dense_ms=math.nan, base_ms=math.nan, groups=groups, times=times, noisy=noisy,
    )
    _calibrate(table, plan, target, settings, log)
    if cache_dir is not None:
        path = table.save(table_path(cache_dir, target, model_sig))
        log(f"latency table saved: {path}")
    return table


def _calibrate(table: LatencyTable, plan: StructurePlan, target: Target, settings: MeasureSettings,
               log: Callable[[str], None]) -> None:
    """Time the table's calibration plan end to end and fit ``base``/``scale`` (module docstring).

    Each allocation is compiled once (keep-first masks: which structures are kept does not change
    a latency) and all are timed in ``CALIBRATION_ROUNDS`` interleaved rounds, keeping each one's
    fastest: load that comes and goes then slows every point alike instead of one of them.
    """
    from osscar_export.passes.materialize import materialize

    points = table.calibration_plan()
    log(f"measuring {len(points)} allocations end to end ({', '.join(points)}) to calibrate the table")
    runnables = {}
    for label, widths in points.items():
        keep = {g: keep_first(plan.group(g).count, k) for g, k in widths.items()}
        model = materialize(plan.program.module(), plan, keep) if keep else plan.program
        runnables[label] = target.compile(model, plan.example_inputs)
    best: dict[str, Timing] = {}
    for _ in range(CALIBRATION_ROUNDS):
        for label, runnable in runnables.items():
            timing = measure(runnable, plan.example_inputs, settings)
            if label not in best or timing.ms < best[label].ms:
                best[label] = timing
    table.noisy = [n for n in table.noisy if n not in points] + [label for label in points if best[label].noisy]
    table.dense_ms = best["dense"].ms
    table.calibrate([CalibrationPoint(label, widths, best[label].ms) for label, widths in points.items()])
    log("calibration: " + ", ".join(f"{label} {table.predict(w):.3g}/{best[label].ms:.3g} ms" for label, w in points.items())
        + f" (predicted/measured); base {table.base_ms:.3g} ms, scale {table.scale:.3g}")
