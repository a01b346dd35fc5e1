"""Building a latency table: time every region at every width, then fit the end-to-end line.

A region timed alone runs with its weights hot in cache and without the layout conversions of
the whole model, so region times do not add up to the end-to-end time. A few allocations are
therefore timed end to end and ``base``/``scale`` fitted to them (``fit_line``); the regions
still decide the shape of the curve between them. The mid points are allocations the allocator
itself makes (``fit_plan``): those are the ones the table has to predict. Every point is timed
in interleaved rounds, keeping each one's fastest, so load that comes and goes slows every point
alike. Region times are saved as they are measured (a partial file beside the table), so an
interrupted build resumes where it stopped. See docs/design.md, section Latency.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript
import torch
from tqdm.auto import tqdm

from osscar_export import cache
from osscar_export.allocate import allocate
from osscar_export.errors import PlanError
from osscar_export.latency.regions import Region, group_regions
from osscar_export.latency.table import (
    FitPoint,
    LatencyTable,
    find_table,
    graph_signature,
    load_partial,
    partial_path,
    save_partial,
    table_key,
    table_path,
    table_status,
)
from osscar_export.latency.timing import MeasureSettings, Timing, measure
from osscar_export.memory import release_memory
from osscar_export.onnx_slice import dense_onnx, slice_onnx
from osscar_export.passes.materialize import materialize_program
from osscar_export.plan import StructureGroup, StructurePlan
from osscar_export.targets import Compilable, Target
from osscar_export.widths import first_mask, width_grid

FIT_FRACTIONS = (0.25, 0.5, 0.75)  # mid points, between each group's fastest and full time
FIT_ROUNDS = 2  # interleaved timing rounds of the fit points
FALLBACK_LEVELS = 16  # widths per group when measure_latency is given none


def fit_plan(table: LatencyTable) -> dict[str, dict[str, int]]:
    """The allocations to time end to end, label → widths of the groups not at full width.

    The dense model; the fastest allocation; and for each fraction f of ``FIT_FRACTIONS`` the
    allocator's own choice (``allocate``) at a region time ``f`` of the way from the fastest
    allocation to the dense model, for a loss that values every structure of a group alike (the
    fraction of the group removed): the allocations the table has to predict are the
    allocator's, and it favours widths that are cheap for their size, such as multiples of 4 on
    onnxruntime, which run faster in context than their region times say. Only the dense model
    when the fastest allocation saves under 5% of the regions' time (no slope to fit).
    Allocations equal to an earlier one are left out.
    """
    full = {g: table.full_width(g) for g in table.groups}
    fastest = table.fastest_widths()
    lo, hi = table.region_ms(fastest), table.region_ms({})
    if hi - lo <= 0.05 * hi:
        return {"dense": {}}
    regions_only = copy.copy(table)
    regions_only.base_ms, regions_only.scale = 0.0, 1.0  # budgets in region time
    loss = {g: (table.widths(g), [1 - k / full[g] for k in table.widths(g)]) for g in table.groups}
    candidates: list[tuple[str, dict[str, int]]] = [("dense", {}), ("fastest", fastest)]
    candidates += [(f"mid-{round(100 * f)}", allocate(loss, regions_only, lo + f * (hi - lo)).widths) for f in FIT_FRACTIONS]
    plan: dict[str, dict[str, int]] = {}
    for label, widths in candidates:
        pruned = {g: k for g, k in sorted(widths.items()) if k != full[g]}
        if pruned not in plan.values():
            plan[label] = pruned
    return plan


class _Store:
    """Where one build writes: the first lookup folder, or the user cache once that folder turns
    out not to be writable (a measured table must not be lost to a read-only ``--tables``)."""

    def __init__(self, folder: Path, target: Target, model_sig: str, log: Callable[[str], None]):
        self.first = self.folder = folder
        self.target, self.model_sig, self.log = target, model_sig, log

    def path(self, folder: Path | None = None) -> Path:
        return table_path(folder or self.folder, self.target, self.model_sig)

    def write(self, write: Callable[[Path], object], partial: bool = False) -> Path:
        """``write(path)`` of the table (or its partial file) in the current folder."""
        path = partial_path(self.path()) if partial else self.path()
        try:
            write(path)
            return path
        except OSError as e:
            fallback = cache.tables_dir()
            if self.folder == fallback:
                raise
            self.log(f"cannot write latency tables to {self.folder} ({e.strerror or e}): "
                     f"saving them to the user cache {fallback} instead")
            self.folder = fallback
            return self.write(write, partial)

    def partials(self) -> list[Path]:
        """Where a partial file of this table may be: beside the first folder's, or the user cache's."""
        return [partial_path(self.path(f)) for f in dict.fromkeys([self.first, cache.tables_dir()])]


def measure_latency(
    plan: StructurePlan,
    target: Target,
    widths: Mapping[str, Sequence[int]] | None = None,
    *,
    settings: MeasureSettings = MeasureSettings(),
    cache_dir: str | Path | Sequence[str | Path] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> LatencyTable:
    """The latency table of ``plan`` on ``target``; re-used from the first of the ``cache_dir``
    folders that holds a matching one (same device, target, model, measurement settings, and
    every requested width measured). The job passes ``lookup_dirs(--tables)``; one folder is a
    list of one; None reads and saves nothing.

    A measured or re-fitted table is saved to the first folder, or to the user cache
    (``cache.tables_dir()``) when the first cannot be written, which is logged. So are the
    region times while they are measured (``save_partial``, after each one): a build that is
    interrupted resumes with the regions it had timed, and the partial file goes once the table
    is saved.

    Groups without ``widths`` are measured at ``width_grid(group, FALLBACK_LEVELS)``; every group
    also at its full width. Each group's region (``group_regions``) is materialized at each kept
    width (the other groups inside it stay whole), compiled by the target and timed; identical
    regions once. Then the allocations of ``fit_plan`` are timed end to end and ``base``/``scale`` fitted
    to them. ``base`` takes the rest of the model and absorbs per-call overhead, so it is not the
    time of the non-prunable ops alone. A stored table whose regions match but whose fit points
    are not its full plan (version 1 tables had two) keeps its regions and is only fitted again.
    """
    target = target.for_inputs(plan.example_inputs)
    if settings.clock == "thread" and not target.runs_on_calling_thread():
        raise ValueError(
            f"clock 'thread' only measures single-threaded CPU targets; {target.settings()} is not one"
        )
    grid = {
        g.name: sorted({int(k) for k in widths[g.name]}) if widths and g.name in widths else width_grid(g, FALLBACK_LEVELS)
        for g in plan.groups
    }
    for g in plan.groups:
        if not grid[g.name] or grid[g.name][0] < 1 or grid[g.name][-1] > g.count:
            raise PlanError(f"widths for {g.name!r} must lie in 1..{g.count}, got {grid[g.name]}")
        if g.count not in grid[g.name]:
            grid[g.name].append(g.count)  # full width anchors base_ms
    model_sig = graph_signature(plan.program)
    folders = [Path(cache_dir)] if isinstance(cache_dir, (str, Path)) else [Path(d) for d in cache_dir or ()]
    store = _Store(folders[0], target, model_sig, log) if folders else None
    for folder in folders:
        cached = find_table(folder, target, model_sig)
        if (
            cached is not None
            and cached.measurement == asdict(settings)
            and set(cached.groups) == set(grid)
            and all(set(grid[g]) <= set(cached.widths(g)) for g in grid)
        ):
            path = table_path(folder, target, model_sig)
            # labels, not widths: a change of the allocator alone should not re-time a table
            if [p.label for p in cached.fit_points] == list(fit_plan(cached)):
                log(f"latency table re-used: {path}")
                return cached
            log(f"latency table re-used: {path}; its end-to-end fit has {len(cached.fit_points)} of "
                f"{len(fit_plan(cached))} points (an older osscar-export measured it): fitting again")
            _fit(cached, plan, target, settings, log)
            log(f"latency table saved: {store.write(cached.save)}")
            return cached

    if folders:
        found, status = table_status(folders, target, model_sig, asdict(settings))
        log(f"measuring a latency table: {status}" + (" (its widths or groups are not the ones asked for)" if found else ""))
    key = table_key(target.fingerprint(), target.settings(), model_sig)
    groups: dict[str, str] = {}
    times: dict[str, dict[int, float]] = {}
    noisy: list[str] = []
    for path in store.partials() if store else ():
        resumed = load_partial(path, key, asdict(settings))
        if resumed is not None:
            times, noisy = resumed
            log(f"resuming the latency table from {path}: {sum(map(len, times.values()))} region timings kept")
            break

    def timed(group: StructureGroup, signature: str) -> bool:
        """Record the signature; True when every width of the group is already timed under it."""
        groups[group.name] = signature
        return set(grid[group.name]) <= set(times.get(signature, {}))

    # groups whose region is already timed (an identical one, or a resumed build) pass in no time
    with tqdm(total=len(plan.groups), desc="latency table: regions", unit="group", leave=False) as bar:
        for group, region in group_regions(plan, timed, log):
            curve = times.setdefault(groups[group.name], {})
            todo = [k for k in grid[group.name] if k not in curve]
            log(f"measuring {group.name} in {region.path or '<root>'} at {len(todo)} widths")
            for k in todo:
                timing = _time_region(region, k, target, settings)
                curve[k] = timing.ms
                if timing.noisy:
                    noisy.append(f"{groups[group.name]}@{k}")
                if store is not None:
                    store.write(lambda path: save_partial(path, key, asdict(settings), times, noisy), partial=True)
            bar.update(len(groups) - bar.n)
        bar.update(bar.total - bar.n)
    # a resumed build may hold widths an earlier grid asked for: keep exactly this grid's, as an
    # uninterrupted build would
    wanted: dict[str, set[int]] = {}
    for name, sig in groups.items():
        wanted.setdefault(sig, set()).update(grid[name])
    times = {sig: {k: ms for k, ms in times[sig].items() if k in ks} for sig, ks in wanted.items()}
    kept = {f"{sig}@{k}" for sig, curve in times.items() for k in curve}
    noisy = [n for n in noisy if n in kept]
    table = LatencyTable(
        fingerprint=target.fingerprint(), target=target.settings(), model_signature=model_sig,
        measurement=asdict(settings), dense_ms=math.nan, base_ms=math.nan, groups=groups, times=times, noisy=noisy,
    )
    _fit(table, plan, target, settings, log)
    if store is not None:
        log(f"latency table saved: {store.write(table.save)}")
        for path in store.partials():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    return table


def _time_region(region: Region, width: int, target: Target, settings: MeasureSettings) -> Timing:
    """The region with its group at ``width``; full width too goes through materialize, so every
    width compiles from the same path."""
    program = materialize_program(region.module, region.plan, {region.group.name: first_mask(region.group.count, width)})
    return measure(target.compile(program, region.inputs), region.inputs, settings)


def _fit_artifacts(plan: StructurePlan, target: Target, points: Mapping[str, Mapping[str, int]], folder: Path,
                   log: Callable[[str], None]) -> dict[str, Compilable]:
    """Each fit point's artifact, written under ``folder``. A float32 ONNX target gets the dense
    ONNX sliced (``onnx_slice``: a second for SmolLM2, where a capture and an export take 8)
    and optimized as the exporter optimizes (11 s for SmolLM2, 0.3 s for EfficientNet-Lite0),
    with the dense weights on disk, so only the tensors a slice cuts are ever in memory;
    when the slicer cannot map something of the plan, it says why and the points are
    materialized in torch and exported, as for every other target."""
    dense = None
    if target.runs_onnx and target.torch_dtype == torch.float32:
        try:
            dense = dense_onnx(plan)
            # its weights move to a file, read back only where a slice cuts them
            onnx.save(dense, folder / "dense.onnx", save_as_external_data=True, location="dense.onnx.data")
        except PlanError as e:
            log(f"fit points exported from torch: {e}")
    artifacts: dict[str, Compilable] = {}
    for label, widths in tqdm(points.items(), desc="latency table: building fit points", leave=False):
        keep = {g: first_mask(plan.group(g).count, k) for g, k in widths.items()}
        where = folder / label
        where.mkdir()
        if dense is not None:
            try:
                # the exporter's own optimizer, as every other export gets it (export_onnx_unchecked),
                # run in place on an IR view of the proto's weights, and saved tensor by tensor to a
                # side file: optimizing or serializing the proto whole would copy a large model
                # twice more (docs/results.md, "A large-vocabulary stand-in")
                sliced = ir.serde.deserialize_model(slice_onnx(dense, plan, keep, folder) if keep else dense)
                ir.external_data.set_base_dir(sliced.graph, folder)
                onnxscript.optimizer.optimize(sliced)
                ir.save(sliced, where / "model.onnx", external_data="model.onnx.data")
                del sliced
                release_memory()
                artifacts[label] = where / "model.onnx"
                continue
            except PlanError as e:
                log(f"fit points exported from torch: {e}")
                dense = None
        model = materialize_program(plan.program.module(), plan, keep) if keep else plan.program
        artifacts[label] = target.artifact(model, plan.example_inputs, where)
    return artifacts


def _fit(table: LatencyTable, plan: StructurePlan, target: Target, settings: MeasureSettings,
         log: Callable[[str], None]) -> None:
    """Time the table's ``fit_plan`` end to end and fit ``base``/``scale`` to it.

    Each allocation is built once (first-structure masks: which structures are kept does not
    change a latency) into the target's artifact (``Target.artifact``: an ONNX file on disk) and
    all are timed in ``FIT_ROUNDS`` interleaved rounds, keeping each one's fastest: load that
    comes and goes then slows every point alike instead of one of them. Each timing compiles its
    artifact afresh, so one compiled model is in memory at a time, not five (a 256k-token
    vocabulary makes each onnxruntime session over a gigabyte).
    """
    points = fit_plan(table)
    log(f"measuring {len(points)} allocations end to end ({', '.join(points)}) to fit the table")
    best: dict[str, Timing] = {}
    with tempfile.TemporaryDirectory(prefix="osscar-fit-") as tmp:
        artifacts = _fit_artifacts(plan, target, points, Path(tmp), log)
        with tqdm(total=FIT_ROUNDS * len(artifacts), desc="latency table: timing fit points", leave=False) as bar:
            for _ in range(FIT_ROUNDS):
                for label, artifact in artifacts.items():
                    timing = measure(target.compile(artifact, plan.example_inputs), plan.example_inputs, settings)
                    release_memory()  # the session just timed
                    if label not in best or timing.ms < best[label].ms:
                        best[label] = timing
                    bar.update()
    table.noisy = [n for n in table.noisy if n not in points] + [label for label in points if best[label].noisy]
    table.dense_ms = best["dense"].ms
    table.fit([FitPoint(label, widths, best[label].ms) for label, widths in points.items()])
    log("fit: " + ", ".join(f"{label} {table.predict(w):.3g}/{best[label].ms:.3g} ms" for label, w in points.items())
        + f" (predicted/measured); base {table.base_ms:.3g} ms, scale {table.scale:.3g}")
