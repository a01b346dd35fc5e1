"""The end-to-end fit of the latency table: the line, the fit points, old tables."""

from __future__ import annotations

import json
import random

import pytest

from osscar_export.cache import digest
from osscar_export.errors import LatencyTableError
from osscar_export.latency.build import FIT_ROUNDS, fit_plan
from osscar_export.latency.table import FitPoint, LatencyTable, fit_line, table_path
from osscar_export.latency.timing import MeasureSettings, Timing
from osscar_export.targets import get_target
from tests.test_latency import assert_rejected, llama_plan

# --------------------------------------------------------------------------------------------
# the fit


@pytest.mark.parametrize("base,scale", [(-0.8, 1.02), (3.0, 0.6), (0.0, 1.7)])
def test_fit_recovers_a_known_line(base, scale):
    rng = random.Random(0)
    sums = [rng.uniform(1.0, 10.0) for _ in range(5)]
    fitted = fit_line([(s, base + scale * s) for s in sums])
    assert fitted == pytest.approx((base, scale), rel=1e-9, abs=1e-9)


def test_fit_minimises_relative_error():
    # one point off the line by +20%: the fit shares the miss so no point is off by far in
    # relative terms, and the short run (1 ms) is weighted as much as the long one (10 ms)
    points = [(1.0, 1.0), (5.0, 5.0 * 1.2), (10.0, 10.0)]
    base, scale = fit_line(points)
    errors = [(base + scale * s - t) / t for s, t in points]
    assert max(abs(e) for e in errors) < 0.2
    assert abs(errors[0]) < 0.2 and abs(errors[2]) < 0.2
    # and it is the least-squares optimum: nudging either coefficient makes the loss worse
    loss = lambda b, k: sum(((b + k * s - t) / t) ** 2 for s, t in points)  # noqa: E731
    best = loss(base, scale)
    for db, dk in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert loss(base + db, scale + dk) > best


def test_fit_without_a_slope_keeps_scale_one():
    # region sums within 5% of each other: the slope is noise, only the offset is fitted
    assert fit_line([(10.0, 12.0), (9.8, 11.8)]) == pytest.approx((2.0, 1.0))
    assert fit_line([(10.0, 12.0)]) == pytest.approx((2.0, 1.0))
    # times falling as the regions grow: not a latency model, fall back to the offset
    base, scale = fit_line([(2.0, 9.0), (10.0, 3.0)])
    assert scale == 1.0
    with pytest.raises(ValueError, match="no points"):
        fit_line([])
    with pytest.raises(ValueError, match="positive"):
        fit_line([(1.0, 0.0), (2.0, 1.0)])


# --------------------------------------------------------------------------------------------
# the fit plan and the stored points


def table() -> LatencyTable:
    """Two groups; group a is not monotone (width 2 is slower than the wider 3, as odd widths are)."""
    return LatencyTable(
        fingerprint={"cpu": "X"}, target={"name": "ort-cpu"}, model_signature="m", measurement={},
        dense_ms=0.0, base_ms=0.0,
        groups={"a": "sa", "b": "sb"},
        times={"sa": {1: 1.0, 2: 3.0, 3: 2.5, 4: 4.0}, "sb": {1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0}},
    )


def fitted(base: float = 1.5, scale: float = 0.8) -> LatencyTable:
    t = table()
    points = [FitPoint(label, w, base + scale * t.region_ms(w)) for label, w in fit_plan(t).items()]
    t.dense_ms = points[0].ms
    t.fit(points)
    return t


def test_fit_plan_spans_the_range_with_allocations_the_allocator_would_make():
    t = table()
    plan = fit_plan(t)
    assert list(plan)[:2] == ["dense", "fastest"] and plan["dense"] == {}
    assert plan["fastest"] == {"a": 1, "b": 1}
    mids = [w for label, w in plan.items() if label.startswith("mid-")]
    assert len(mids) >= 2
    assert len({json.dumps(w, sort_keys=True) for w in plan.values()}) == len(plan)  # no repeats
    # each mid point keeps the most of its groups that any allocation as fast keeps: a knapsack
    # optimum (checked by brute force), so never a width slower than a wider one (a at 2)
    every = [{"a": ka, "b": kb} for ka in t.widths("a") for kb in t.widths("b")]
    kept = lambda w: sum(w.get(g, t.full_width(g)) / t.full_width(g) for g in t.groups)  # noqa: E731
    for w in mids:
        assert t.region_ms(plan["fastest"]) < t.region_ms(w) < t.region_ms({})
        assert kept(w) == pytest.approx(max(kept(o) for o in every if t.region_ms(o) <= t.region_ms(w)))
        assert w.get("a") != 2


def test_fit_plan_is_only_the_dense_model_when_nothing_saves_time():
    t = table()
    t.times = {"sa": {1: 3.99, 4: 4.0}, "sb": {2: 2.0}}
    assert fit_plan(t) == {"dense": {}}


def test_fitted_table_recovers_the_line_and_round_trips(tmp_path):
    t = fitted(base=1.5, scale=0.8)
    assert (t.base_ms, t.scale) == pytest.approx((1.5, 0.8))
    assert t.fastest_ms == pytest.approx(1.5 + 0.8 * 1.5)
    loaded = LatencyTable.load(t.save(tmp_path / "t.json"))
    assert loaded == t
    assert [c.label for c in loaded.fit_points] == list(fit_plan(t))
    assert json.loads((tmp_path / "t.json").read_text())["version"] == 3


def old_key(t: LatencyTable) -> str:
    """The key versions 1 and 2 stored: a hash of the same content, without the code version."""
    return digest({"fingerprint": t.fingerprint, "target": t.target, "model": t.model_signature})[:20]


def corrupt_fit_points():
    good = fitted().to_json()
    pts = good["fit_points"]
    edit = lambda i, **kw: json.dumps({**good, "fit_points": [*pts[:i], {**pts[i], **kw}, *pts[i + 1:]]})  # noqa: E731
    yield "edited time", edit(1, ms=pts[1]["ms"] * 1.3)
    yield "zero time", edit(1, ms=0.0)
    yield "unknown group", edit(1, widths={"zz": 1})
    yield "unmeasured width", edit(1, widths={"a": 7})
    yield "width not an integer", edit(1, widths={"a": "1"})
    yield "repeated label", edit(1, label="dense")
    yield "dense point not dense", edit(0, widths={"a": 1})
    yield "dense point off dense_ms", json.dumps({**good, "dense_ms": good["dense_ms"] + 1})
    yield "no dense point", json.dumps({**good, "fit_points": pts[1:]})
    yield "point without ms", json.dumps({**good, "fit_points": [*pts[:-1], {"label": "x", "widths": {}}]})
    yield "edited base", json.dumps({**good, "base_ms": good["base_ms"] + 0.1})
    yield "edited scale", json.dumps({**good, "scale": good["scale"] * 1.1})
    yield "missing fit points", json.dumps({k: v for k, v in good.items() if k != "fit_points"})
    yield "version 3 with fastest_ms only", json.dumps({**{k: v for k, v in good.items() if k != "fit_points"}, "fastest_ms": 2.0})
    yield "version 3 with calibration", json.dumps({**{k: v for k, v in good.items() if k != "fit_points"}, "calibration": pts})
    yield "version 3 with the version 2 key", json.dumps({**good, "key": old_key(fitted())})


@pytest.mark.parametrize("what,text", list(corrupt_fit_points()), ids=[v[0] for v in corrupt_fit_points()])
def test_corrupt_fit_points_are_rejected(tmp_path, what, text):
    assert_rejected(tmp_path, text)


def version1(t: LatencyTable) -> dict:
    """``t`` as version 1 stored it: two end-to-end points, the second as ``fastest_ms``."""
    data = {k: v for k, v in t.to_json().items() if k != "fit_points"}
    return {**data, "version": 1, "key": old_key(t), "fastest_ms": t.fastest_ms}


def version2(t: LatencyTable) -> dict:
    """``t`` as version 2 stored it: the points under ``calibration``."""
    data = {k: v for k, v in t.to_json().items() if k != "fit_points"}
    return {**data, "version": 2, "key": old_key(t), "calibration": t.to_json()["fit_points"]}


def test_version_1_tables_load_with_their_two_points():
    t = table()
    two = {label: w for label, w in fit_plan(t).items() if label in ("dense", "fastest")}
    t.dense_ms = 1.0 + 0.9 * t.region_ms({})
    t.fit([FitPoint(label, w, 1.0 + 0.9 * t.region_ms(w)) for label, w in two.items()])
    old = LatencyTable.from_json(json.loads(json.dumps(version1(t))))
    assert old == t and old.fastest_ms == t.fastest_ms
    assert [c.label for c in old.fit_points] == ["dense", "fastest"]
    with pytest.raises(LatencyTableError, match="not the fit"):  # still checked: a hand-edited fastest_ms
        LatencyTable.from_json({**version1(t), "fastest_ms": t.fastest_ms * 2})
    with pytest.raises(LatencyTableError, match="versions 1 to 3"):
        LatencyTable.from_json({**version1(t), "version": 4})


def test_version_2_tables_load_and_save_as_version_3(tmp_path):
    t = fitted()
    old = LatencyTable.from_json(json.loads(json.dumps(version2(t))))
    assert old == t and old.key != old_key(t)
    saved = json.loads(old.save(tmp_path / "t.json").read_text())
    assert saved["version"] == 3 and saved["key"] == t.key and "calibration" not in saved
    with pytest.raises(LatencyTableError, match="key does not match"):  # the old key is still checked
        LatencyTable.from_json({**version2(t), "key": t.key})


# --------------------------------------------------------------------------------------------
# measure_latency on a synthetic machine where time = parameter count: the fit must be exact


class Sized:
    """A stand-in for a compiled model: its 'latency' is its parameter count."""

    def __init__(self, model) -> None:
        self.params = sum(p.numel() for p in model.parameters())

    def prepare(self, inputs):
        return ()

    def __call__(self):
        return None


@pytest.fixture
def counting_machine(monkeypatch):
    from osscar_export.latency import build

    calls: list[int] = []
    target_type = type(get_target("ort-cpu"))
    monkeypatch.setattr(target_type, "compile", lambda self, model, inputs: Sized(model))
    monkeypatch.setattr(target_type, "artifact", lambda self, model, inputs, folder: model)
    monkeypatch.setattr(target_type, "runs_onnx", False)  # fit points materialized in torch, sized by Sized

    def measure(runnable, inputs, settings=MeasureSettings()):
        calls.append(runnable.params)
        ms = runnable.params * 1e-4
        return Timing(ms, (ms,), 0.0, 0.0, 1, False)

    monkeypatch.setattr(build, "measure", measure)
    return calls


@pytest.fixture(scope="module")
def tiny_mlp_lm():
    return llama_plan(vocab=128, hidden=64, intermediate=256, seq=16)[2]


def test_measure_latency_fits_the_machine_exactly_and_upgrades_old_tables(tiny_mlp_lm, counting_machine, tmp_path):
    from osscar_export.latency.build import measure_latency

    plan = tiny_mlp_lm
    # MLP neurons vary, attention stays whole: regions are disjoint, so parameters add up exactly
    widths = {g.name: [8, 64, 128, g.count] if g.kind == "neuron" else [g.count] for g in plan.groups}
    target = get_target("ort-cpu")
    t = measure_latency(plan, target, widths, cache_dir=tmp_path)
    region_calls = len(counting_machine) - FIT_ROUNDS * len(t.fit_points)
    assert len(t.fit_points) >= 4 and t.fastest_ms is not None
    # time = parameters: the model is T = (parameters outside the regions) + 1 x (regions)
    assert t.scale == pytest.approx(1.0, rel=1e-9)
    for c in t.fit_points:
        assert t.predict(c.widths) == pytest.approx(c.ms, rel=1e-9)
    assert t.dense_ms == pytest.approx(sum(p.numel() for p in plan.program.parameters()) * 1e-4)

    # a version 1 table of the same machine: its regions are kept, only the fit points re-measured
    path = table_path(tmp_path, target.for_inputs(plan.example_inputs), t.model_signature)
    two = LatencyTable.from_json(t.to_json())
    two.fit([c for c in t.fit_points if c.label in ("dense", "fastest")])
    path.write_text(json.dumps(version1(two)))
    counting_machine.clear()
    upgraded = measure_latency(plan, target, widths, cache_dir=tmp_path)
    assert region_calls > 0 and len(counting_machine) == FIT_ROUNDS * len(t.fit_points)
    assert upgraded == t
    assert LatencyTable.load(path) == t and json.loads(path.read_text())["version"] == 3
    counting_machine.clear()
    assert measure_latency(plan, target, widths, cache_dir=tmp_path) == t
    assert counting_machine == []  # complete now: nothing measured


def test_an_interrupted_table_build_resumes_where_it_stopped(tiny_mlp_lm, counting_machine, tmp_path, monkeypatch):
    from osscar_export.latency import build
    from osscar_export.latency.build import measure_latency

    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path / "cache"))
    plan, target = tiny_mlp_lm, get_target("ort-cpu")
    widths = {g.name: [8, 64, 128, g.count] if g.kind == "neuron" else [g.count] for g in plan.groups}
    whole = measure_latency(plan, target, widths, cache_dir=tmp_path / "whole")
    fit_calls = FIT_ROUNDS * len(whole.fit_points)
    region_calls = len(counting_machine) - fit_calls
    stop = region_calls // 2
    assert stop >= 2

    timed = build.measure

    def interrupted(runnable, inputs, settings=MeasureSettings()):
        if len(counting_machine) == stop:
            raise KeyboardInterrupt  # Ctrl-C while the regions are timed
        return timed(runnable, inputs, settings)

    counting_machine.clear()
    monkeypatch.setattr(build, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        measure_latency(plan, target, widths, cache_dir=tmp_path / "t")
    assert len(counting_machine) == stop and list((tmp_path / "t").glob("*.partial.json"))

    counting_machine.clear()
    monkeypatch.setattr(build, "measure", timed)
    resumed = measure_latency(plan, target, widths, cache_dir=tmp_path / "t")
    assert len(counting_machine) == region_calls - stop + fit_calls  # the first regions are not timed again
    assert resumed == whole
    assert [p.name for p in (tmp_path / "t").iterdir()] == [table_path(tmp_path, target.for_inputs(plan.example_inputs), whole.model_signature).name]
