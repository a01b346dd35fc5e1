"""The latency table: measured region times of one model on one target, and the end-to-end fit.

For every group the table holds the time of its region at each kept width (groups with equal
signatures, identical layers, share one curve). End-to-end time is modelled additively,
``T = base + scale * sum_g t_g(k_g)``; ``base`` and ``scale`` are fitted to a few allocations
timed end to end (the fit points), because a region timed alone is not the region in context.
The table is measured, never modelled from FLOPs: latency is not monotonic in width.
See docs/design.md, section Latency.

Tables are cached as JSON named by ``table_key`` (device fingerprint, target settings, model
graph signature and the code version, ``osscar_export.cache``); a table is used whole or not at all.
They are looked up wherever the tool runs (``lookup_dirs``): the ``--tables`` folder when given, the
user's cache of measured tables, and the tables shipped with osscar-export (``shipped_dirs``). The
region times of a table being built are kept in a partial file beside it (``save_partial``), so an
interrupted build resumes.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from osscar_export.atomic import write_text
from osscar_export import cache
from osscar_export.cache import digest, key
from osscar_export.errors import LatencyTableError
from osscar_export.targets import Target

SCHEMA = "osscar-export/latency-table"
# 3: fit points under "fit_points", keyed by osscar_export.cache.key; 2: the same points under
# "calibration"; 1: fastest_ms instead of the points. All three load.
SCHEMA_VERSION = 3
PARTIAL_SCHEMA = "osscar-export/latency-table-partial"


def shipped_dirs() -> list[Path]:
    """The folders of the tables shipped with osscar-export that exist here: the repository's
    top-level ``latency_tables/`` in a source checkout or editable install, the copy a wheel
    installs as the data package ``osscar_export.latency_tables`` (pyproject.toml)."""
    package = Path(__file__).resolve().parents[1]
    return [d for d in (package.parent / "latency_tables", package / "latency_tables") if d.is_dir()]


def lookup_dirs(tables: str | Path | None = None) -> list[Path]:
    """Where tables are looked up, in order, independent of the working directory: ``tables``
    (``--tables``) when given, the user cache (``cache.tables_dir()``), then ``shipped_dirs()``.
    A measured table is saved to the first (see ``measure_latency``)."""
    dirs = ([Path(tables).resolve()] if tables is not None else []) + [cache.tables_dir().resolve(), *shipped_dirs()]
    return list(dict.fromkeys(dirs))


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
    return digest({"ops": ops, "params": params})[:24]


def _key_content(fingerprint: Mapping[str, Any], settings: Mapping[str, Any], model_signature: str) -> dict[str, Any]:
    return {"fingerprint": fingerprint, "target": settings, "model": model_signature}


def table_key(fingerprint: Mapping[str, Any], settings: Mapping[str, Any], model_signature: str) -> str:
    """Cache key of a table: device fingerprint + target settings + model graph signature + code version."""
    return key("latency-table", _key_content(fingerprint, settings, model_signature))


def _schema2_key(fingerprint: Mapping[str, Any], settings: Mapping[str, Any], model_signature: str) -> str:
    """The key schema 1 and 2 files store: the same content, without the code version."""
    return digest(_key_content(fingerprint, settings, model_signature))[:20]


def table_path(directory: str | Path, target: Target, model_signature: str) -> Path:
    """Where the table for this target and model lives under ``directory``."""
    return Path(directory) / f"{target.name}-{table_key(target.fingerprint(), target.settings(), model_signature)}.json"


def partial_path(path: Path) -> Path:
    """The partial file of the table at ``path``: the region times of a build not finished yet."""
    return path.with_suffix(".partial.json")


@dataclass(frozen=True)
class FitPoint:
    """One allocation timed end to end; groups not in ``widths`` stay at full width."""

    label: str  # "dense", "fastest", "mid-25", ...
    widths: dict[str, int]
    ms: float


def fit_line(points: Sequence[tuple[float, float]], *, min_spread: float = 0.05) -> tuple[float, float]:
    """``(base, scale)`` of ``T = base + scale * S`` from ``(S, T)`` pairs (region sum, measured ms).

    Least squares on the relative error, ``sum_i ((base + scale S_i - T_i) / T_i)^2``: a budget
    and the reported error are relative, and plain least squares lets the long dense run outvote
    the short fastest one. When the region sums span less than ``min_spread`` of the largest
    (nothing prunable saves time) or the fit is not increasing, the slope is not determined:
    ``scale = 1`` and ``base`` is the relative-error fit of the offset.
    """
    if not points:
        raise ValueError("no points to fit")
    if any(not (math.isfinite(s) and math.isfinite(t) and t > 0) for s, t in points):
        raise ValueError(f"fit points must be finite with positive times, got {list(points)}")
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


def _times(raw: dict[str, Any], bad: Callable[[str], Exception]) -> dict[str, dict[int, float]]:
    """Stored region times (signature → width → ms), type-checked."""
    times: dict[str, dict[int, float]] = {}
    for sig, curve in raw.items():
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
    return times


def _json_times(times: Mapping[str, Mapping[int, float]]) -> dict[str, dict[str, float]]:
    return {sig: {str(w): ms for w, ms in sorted(c.items())} for sig, c in times.items()}


def _fit_point(raw: Any, bad: Callable[[str], LatencyTableError]) -> FitPoint:
    """A stored fit point, type-checked (whether its widths exist is the table's check)."""
    if not (isinstance(raw, dict) and set(raw) == {"label", "widths", "ms"}):
        raise bad(f"fit point {raw!r} is not an object with label, widths and ms")
    label, widths, ms = raw["label"], raw["widths"], raw["ms"]
    if not isinstance(label, str) or not label:
        raise bad(f"fit point label {label!r} is not a non-empty string")
    if not isinstance(widths, dict) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in widths.values()):
        raise bad(f"fit point {label!r} has widths that are not positive integers")
    if not _is_number(ms) or ms <= 0:
        raise bad(f"fit point {label!r} has ms = {ms!r}, not a finite positive number")
    return FitPoint(label, dict(widths), float(ms))


@dataclass
class LatencyTable:
    """(group signature, kept width) → ms on one target, plus ``base_ms``, ``scale``, ``dense_ms``.

    ``groups`` maps each group name to its signature; groups with equal signatures (identical
    layers) share one measured curve in ``times``. ``fit_points`` holds the allocations timed
    end to end that ``base_ms`` and ``scale`` were fitted to (empty when not fitted).
    """

    fingerprint: dict[str, Any]
    target: dict[str, Any]  # Target.settings()
    model_signature: str
    measurement: dict[str, Any]  # MeasureSettings as a dict
    dense_ms: float
    base_ms: float
    groups: dict[str, str]  # group name → signature
    times: dict[str, dict[int, float]]  # signature → kept width → ms
    noisy: list[str] = field(default_factory=list)  # "signature@width" / fit point labels measured with interference
    scale: float = 1.0
    fit_points: list[FitPoint] = field(default_factory=list)

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
        """Measured end-to-end ms of the fastest allocation (None when it is not a fit point)."""
        return next((p.ms for p in self.fit_points if p.label == "fastest"), None)

    def fit(self, points: Sequence[FitPoint]) -> None:
        """Store the end-to-end points and fit ``base_ms`` / ``scale`` to them (``fit_line``)."""
        self.base_ms, self.scale = fit_line([(self.region_ms(p.widths), p.ms) for p in points])
        self.fit_points = list(points)

    def stale_reason(self, fingerprint: Mapping[str, Any], settings: Mapping[str, Any], model_signature: str,
                     measurement: Mapping[str, Any] | None = None) -> str | None:
        """Why this table does not apply to the given device/target/model (and ``measurement``
        settings, when given), naming each difference with both values; None when it does."""
        for what, here, there in (("the machine or software", fingerprint, self.fingerprint),
                                  ("the target settings", settings, self.target),
                                  ("the measurement settings", measurement, self.measurement)):
            if here is not None and dict(here) != dict(there):
                changed = sorted(k for k in set(here) | set(there) if here.get(k) != there.get(k))
                return f"{what} differ: " + "; ".join(f"{k} {there.get(k)!r} in the table, {here.get(k)!r} here" for k in changed)
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
            "times": _json_times(self.times),
            "noisy": self.noisy,
            "scale": self.scale,
            "fit_points": [{"label": p.label, "widths": p.widths, "ms": p.ms} for p in self.fit_points],
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
        if version not in (1, 2, SCHEMA_VERSION) or isinstance(version, bool):
            raise bad(f"version is {version!r}, this osscar-export reads versions 1 to {SCHEMA_VERSION}")
        # the end-to-end points: version 1 kept the one besides the dense model as fastest_ms
        points_field = {1: "fastest_ms", 2: "calibration", SCHEMA_VERSION: "fit_points"}[version]
        types = {
            "key": str, "fingerprint": dict, "target": dict, "model_signature": str, "measurement": dict,
            "dense_ms": (int, float), "base_ms": (int, float), "groups": dict, "times": dict, "noisy": list,
            "scale": (int, float), points_field: (int, float, type(None)) if version == 1 else list,
        }
        for name, typ in types.items():
            if not isinstance(data.get(name), typ) or isinstance(data.get(name), bool):
                raise bad(f"field {name!r} is missing or not a {typ}")
        times = _times(data["times"], bad)
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
        expected_key = table.key if version == SCHEMA_VERSION else _schema2_key(table.fingerprint, table.target, table.model_signature)
        if data["key"] != expected_key:
            raise bad("its key does not match its fingerprint/target/model (edited by hand, or keyed by another osscar-export?)")
        if version == 1:
            points = [FitPoint("dense", {}, table.dense_ms)]
            if data["fastest_ms"] is not None:
                full = {g: table.full_width(g) for g in table.groups}
                fastest = {g: k for g, k in sorted(table.fastest_widths().items()) if k != full[g]}
                points.append(FitPoint("fastest", fastest, float(data["fastest_ms"])))
        else:
            points = [_fit_point(raw, bad) for raw in data[points_field]]
        if points:
            labels = [p.label for p in points]
            if len(set(labels)) != len(labels):
                raise bad(f"fit point labels repeat: {labels}")
            dense = next((p for p in points if p.label == "dense"), None)
            if dense is None or dense.widths or dense.ms != table.dense_ms:
                raise bad("its fit points have no dense point at dense_ms")
            try:
                base, scale = fit_line([(table.region_ms(p.widths), p.ms) for p in points])
            except LatencyTableError as e:
                raise bad(f"a fit point does not fit its groups/widths ({e})") from None
            tol = 1e-6 * max(1.0, table.dense_ms)
            if not (math.isclose(base, table.base_ms, rel_tol=1e-6, abs_tol=tol) and math.isclose(scale, table.scale, rel_tol=1e-6)):
                raise bad(f"base_ms/scale ({table.base_ms:.6g}, {table.scale:.6g}) are not the fit of its points "
                          f"({base:.6g}, {scale:.6g}) (edited by hand?)")
            table.fit_points = points
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


def table_status(dirs: Sequence[str | Path], target: Target, model_signature: str,
                 measurement: Mapping[str, Any]) -> tuple[Path | None, str]:
    """The stored table of this model that applies here (None when none does) and, in words, why:
    ``cached``, ``stale`` with what differs (another CPU, other software, other measurement
    settings), or ``missing``. The job logs it before measuring; ``--dry-run`` prints it."""
    stale = []
    for d in dirs:
        for path in sorted(Path(d).glob(f"{target.name}-*.json")):
            if path.name.endswith(".partial.json"):
                continue
            try:
                table = LatencyTable.load(path)
            except LatencyTableError as e:
                stale.append(f"{path} is unreadable ({e})")
                continue
            if table.model_signature != model_signature:
                continue
            why = table.stale_reason(target.fingerprint(), target.settings(), model_signature, measurement)
            if why is None:
                return path, f"cached: {path}"
            stale.append(f"{path}: {why}")
    if stale:
        return None, "stale: " + " | ".join(stale)
    return None, f"missing: no table of this model for {target.name} in {', '.join(map(str, dirs))}"


def save_partial(path: Path, key: str, measurement: Mapping[str, Any], times: Mapping[str, Mapping[int, float]],
                 noisy: Sequence[str]) -> None:
    """Write the region times measured so far for the table ``key`` (atomically, as tables are)."""
    data = {"schema": PARTIAL_SCHEMA, "key": key, "measurement": dict(measurement), "times": _json_times(times),
            "noisy": list(noisy)}
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


def load_partial(path: Path, key: str, measurement: Mapping[str, Any]) -> tuple[dict[str, dict[int, float]], list[str]] | None:
    """The region times and noisy entries a build of the table ``key`` with these ``measurement``
    settings left at ``path``; None when there is none or it was measured otherwise. An
    unreadable file only costs its timings: it is warned about and deleted, not raised."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and data.get("schema") == PARTIAL_SCHEMA and isinstance(data.get("noisy"), list)
                and isinstance(data.get("times"), dict)):
            raise ValueError("not a partial latency table")
        if data.get("key") != key or data.get("measurement") != dict(measurement):
            return None
        return _times(data["times"], ValueError), [str(n) for n in data["noisy"]]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        warnings.warn(f"partial latency table {path} is unusable ({e}): deleted, re-measuring its regions", stacklevel=2)
        path.unlink(missing_ok=True)
        return None
