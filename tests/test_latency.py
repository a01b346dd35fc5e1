"""Targets, timing and the latency table: orderings that must hold, caches that must not lie."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from osscar_export.errors import LatencyTableError, TargetUnavailableError
from osscar_export.latency.table import LatencyTable, find_table, graph_signature, table_path
from osscar_export.latency.timing import MeasureSettings, measure
from osscar_export.plan import StructureGroup
from osscar_export.targets import get_target
from osscar_export.widths import ALIGN, first_mask, width_grid

FAST = MeasureSettings(warmup=2, repeats=3, iters=5, max_attempts=2)


def mlp(hidden: int, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))


# --------------------------------------------------------------------------------------------
# targets


@pytest.mark.parametrize("name", ["torch", "ort-cpu"])
def test_bigger_matmul_model_is_slower(name):
    target = get_target(name)
    x = torch.randn(64, 64)
    small, big = mlp(32), mlp(2048)  # 64x more multiply-adds
    t_small = measure(target.compile(small, (x,)), (x,), FAST)
    t_big = measure(target.compile(big, (x,)), (x,), FAST)
    assert t_big.ms > 3 * t_small.ms, (t_small, t_big)


def test_ort_cpu_computes_the_model_and_reports_its_providers():
    target = get_target("ort-cpu")
    model, x = mlp(96), torch.randn(8, 64)
    run = target.compile(model, (x,))
    (out,) = run(*run.prepare((x,)))
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)
    fp = target.fingerprint()
    assert fp["providers"] == ["CPUExecutionProvider"]
    assert fp["cores"] >= 1 and fp["cpu"] and fp["onnxruntime"]
    with pytest.raises(ValueError, match="takes 1 inputs"):
        run.prepare((x, x))


def test_target_settings_include_the_input_shapes():
    t = get_target("ort-cpu").for_inputs((torch.zeros(1, 128, dtype=torch.long),))
    assert t.settings() == {"name": "ort-cpu", "threads": 1, "dtype": "float32", "input_shapes": [[1, 128]]}
    assert get_target("ort-cpu", threads=2).settings() != get_target("ort-cpu").settings()
    with pytest.raises(ValueError, match="dtype"):
        get_target("torch", dtype="int3")


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is not None
    and "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
    and torch.cuda.is_available(),
    reason="CUDA onnxruntime is usable here",
)
def test_ort_cuda_is_refused_without_cuda():
    target = get_target("ort-cuda")
    with pytest.raises(TargetUnavailableError, match="CUDAExecutionProvider"):
        target.fingerprint()
    with pytest.raises(TargetUnavailableError):
        target.compile(mlp(8), (torch.randn(2, 64),))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_is_refused_without_tensorrt():
    target = get_target("tensorrt")
    with pytest.raises(TargetUnavailableError, match="tensorrt"):
        target.fingerprint()
    with pytest.raises(TargetUnavailableError, match="not installed"):
        target.compile(mlp(8), (torch.randn(2, 64),))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "ort-cuda", "tensorrt"])
def test_gpu_targets_compute_the_model_and_order_latencies(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    settings = {"device": "cuda"} if name == "torch" else {}
    target = get_target(name, **settings)
    x = torch.randn(256, 256)
    small, big = mlp(32, 256), mlp(8192, 256)
    run = target.compile(small, (x,))
    out = run(*run.prepare((x,)))
    out = out[0] if isinstance(out, (list, tuple)) else out
    torch.testing.assert_close(torch.as_tensor(out).float().cpu(), small(x), rtol=1e-2, atol=1e-3)
    assert "gpu" in target.fingerprint()
    t_small = measure(target.compile(small, (x,)), (x,), FAST)
    t_big = measure(target.compile(big, (x,)), (x,), FAST)
    assert t_big.ms > t_small.ms


def test_unknown_target_names_the_known_ones():
    with pytest.raises(TargetUnavailableError, match="ort-cpu"):
        get_target("tpu")


# --------------------------------------------------------------------------------------------
# measure


class Sleeper:
    """A fake runnable whose call takes ``ms(call number)`` milliseconds."""

    def __init__(self, ms):
        self.ms = ms
        self.calls = 0

    def prepare(self, inputs):
        return ()

    def __call__(self):
        self.calls += 1
        end = time.perf_counter() + self.ms(self.calls) / 1e3
        while time.perf_counter() < end:
            pass


def test_interference_is_detected_and_re_measured_a_bounded_number_of_times():
    s = MeasureSettings(warmup=0, repeats=3, iters=3, max_spread=0.10, max_attempts=3)
    # every third call block gets much slower: the repeat medians disagree by far more than 10%
    sleeper = Sleeper(lambda c: 0.2 if (c - 1) // 3 % 3 == 0 else 2.0)
    t = measure(sleeper, (), s)
    assert t.noisy and t.attempts == 3
    assert sleeper.calls == 3 * 3 * 3
    assert t.spread > 0.10
    assert t.ms == pytest.approx(min(t.repeat_ms))


# --------------------------------------------------------------------------------------------
# width grid and signatures


def group(kind: str, count: int) -> StructureGroup:
    return StructureGroup(name="g", kind=kind, count=count, unit=1, consumers=(), producers=())


def test_fallback_width_grid_is_aligned_and_bounded():
    # the grid measure_latency falls back to (FALLBACK_LEVELS; it adds the full width when missing)
    from osscar_export.latency.build import FALLBACK_LEVELS

    g = width_grid(group("neuron", 1536), FALLBACK_LEVELS)
    assert g[-1] == 1536 and len(g) == FALLBACK_LEVELS
    assert all(w % ALIGN == 0 for w in g)
    assert width_grid(group("head", 9), FALLBACK_LEVELS) == list(range(1, 10))
    assert width_grid(group("channel", 20), FALLBACK_LEVELS) == [8, 16]


def test_graph_signature_depends_on_shapes_not_values():
    x = (torch.randn(4, 64),)
    sig = lambda m: graph_signature(torch.export.export(m, x, strict=False))
    a, b = mlp(96), mlp(96)
    with torch.no_grad():
        b[0].weight.mul_(3)
    assert sig(a) == sig(b)
    assert sig(a) != sig(mlp(88))


# --------------------------------------------------------------------------------------------
# the table: persistence, staleness, corruption


def sample_table(fingerprint=None, settings=None, model="m1") -> LatencyTable:
    return LatencyTable(
        fingerprint=fingerprint or {"cpu": "X", "cores": 2},
        target=settings or {"name": "ort-cpu", "threads": 1},
        model_signature=model,
        measurement={"warmup": 5},
        dense_ms=10.0,
        base_ms=4.0,
        groups={"layers.0.mlp.neuron": "s1", "layers.1.mlp.neuron": "s1", "layers.0.attn.head": "s2"},
        times={"s1": {1: 0.5, 8: 1.0, 16: 2.0}, "s2": {1: 0.2, 2: 1.0}},
        noisy=["s1@8"],
    )


def test_table_round_trip_and_prediction(tmp_path):
    table = sample_table()
    path = table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(path)
    assert loaded == table
    assert loaded.predict({}) == pytest.approx(4.0 + 2.0 + 2.0 + 1.0)
    assert loaded.predict({"layers.0.mlp.neuron": 8, "layers.0.attn.head": 1}) == pytest.approx(4.0 + 1.0 + 2.0 + 0.2)
    with pytest.raises(LatencyTableError, match="width 3"):
        loaded.ms("layers.0.mlp.neuron", 3)
    with pytest.raises(LatencyTableError, match="no group"):
        loaded.predict({"nope": 1})


def test_staleness_is_detected():
    table = sample_table()
    fp, st = dict(table.fingerprint), dict(table.target)
    assert table.stale_reason(fp, st, "m1") is None
    assert "cores" in table.stale_reason({**fp, "cores": 16}, st, "m1")
    assert "threads" in table.stale_reason(fp, {**st, "threads": 4}, "m1")
    assert "model" in table.stale_reason(fp, st, "m2")
    assert "warmup 5 in the table, 3 here" in table.stale_reason(fp, st, "m1", {"warmup": 3})


def test_table_status_says_cached_stale_or_missing(tmp_path):
    from osscar_export.latency.table import table_status

    target = get_target("torch").for_inputs((torch.zeros(1, 16),))
    here = sample_table(target.fingerprint(), target.settings())
    found, status = table_status([tmp_path], target, "m1", here.measurement)
    assert found is None and status.startswith("missing")
    elsewhere = sample_table({**target.fingerprint(), "cpu": "Another CPU"}, target.settings())
    elsewhere.save(tmp_path / "torch-other.json")
    found, status = table_status([tmp_path], target, "m1", here.measurement)
    assert found is None and status.startswith("stale") and "'Another CPU' in the table" in status
    assert table_status([tmp_path], target, "m1", {"warmup": 1})[1].startswith("stale")
    here.save(table_path(tmp_path, target, "m1"))
    found, status = table_status([tmp_path], target, "m1", here.measurement)
    assert found == table_path(tmp_path, target, "m1") and status.startswith("cached")


def test_find_table_reuses_matching_and_skips_stale(tmp_path):
    target = get_target("torch").for_inputs((torch.zeros(1, 16),))
    assert find_table(tmp_path, target, "m1") is None
    fresh = sample_table(target.fingerprint(), target.settings())
    fresh.save(table_path(tmp_path, target, "m1"))
    assert find_table(tmp_path, target, "m1") == fresh
    assert find_table(tmp_path, get_target("torch", threads=2).for_inputs((torch.zeros(1, 16),)), "m1") is None
    assert find_table(tmp_path, target, "m2") is None
    # a table measured elsewhere, copied to this path, is stale, not reused
    elsewhere = sample_table({**target.fingerprint(), "cpu": "another CPU"}, target.settings())
    elsewhere.save(table_path(tmp_path, target, "m1"))
    assert find_table(tmp_path, target, "m1") is None


def corrupt_variants():
    good = sample_table().to_json()
    yield "truncated", json.dumps(good)[:-40]
    yield "not an object", "[1, 2]"
    yield "wrong schema", json.dumps({**good, "schema": "something-else"})
    yield "wrong version", json.dumps({**good, "version": 99})
    yield "missing field", json.dumps({k: v for k, v in good.items() if k != "base_ms"})
    yield "negative time", json.dumps({**good, "times": {**good["times"], "s2": {"1": -0.2, "2": 1.0}}})
    yield "bad width", json.dumps({**good, "times": {**good["times"], "s2": {"x": 0.2}}})
    yield "dangling signature", json.dumps({**good, "groups": {**good["groups"], "extra": "s9"}})
    yield "edited fingerprint", json.dumps({**good, "fingerprint": {"cpu": "Y", "cores": 2}})


def assert_rejected(tmp_path, text: str) -> None:
    """A table file holding ``text`` is refused whole, with the advice to re-measure."""
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(LatencyTableError, match="delete it to re-measure"):
        LatencyTable.load(path)


@pytest.mark.parametrize("what,text", list(corrupt_variants()), ids=[v[0] for v in corrupt_variants()])
def test_corrupt_tables_are_rejected(tmp_path, what, text):
    assert_rejected(tmp_path, text)


def test_failed_save_leaves_the_old_table_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    sample_table().save(path)
    before = path.read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    changed = sample_table()
    changed.base_ms = 99.0
    with pytest.raises(OSError, match="disk full"):
        changed.save(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


# --------------------------------------------------------------------------------------------
# measuring a plan (regions per group signature) and validating the additive model


def llama_plan(vocab: int, hidden: int, intermediate: int, seq: int):
    """A 2-layer GQA Llama (4 query heads over 2 KV heads), its example tokens and its plan."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osscar_export.models import CausalLMLogits
    from osscar_export.passes.structures import find_structures

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * seq,
    )
    model = CausalLMLogits(LlamaForCausalLM(config)).eval()
    inputs = (torch.randint(0, vocab, (1, seq)),)
    return model, inputs, find_structures(model, inputs)


@pytest.fixture(scope="module")
def tiny_llama():
    return llama_plan(vocab=256, hidden=128, intermediate=768, seq=64)


def matrix_cost_ms(runnable) -> float:
    """A deterministic stand-in for a timing: 1 ms per call plus 1 ms per million weight-matrix
    entries of the module the torch target compiled (a matmul's cost per token), so region times
    and end-to-end times obey the additive model the table assumes, exactly."""
    entries = sum(p.numel() for p in runnable.module.parameters() if p.dim() >= 2)
    return 1.0 + entries / 1e6


def test_measure_latency_measures_identical_layers_once_and_predicts_end_to_end(tiny_llama, tmp_path, monkeypatch):
    """The table's logic on recorded-style timings (``matrix_cost_ms``): which regions are timed,
    the fit, and the prediction of an allocation it was not fitted on. Real timings of the same
    steps are checked by the slow test below: on a shared machine they miss 25% at random."""
    from osscar_export.latency import build
    from osscar_export.latency.build import measure_latency
    from osscar_export.latency.timing import Timing
    from osscar_export.passes.materialize import materialize

    model, inputs, plan = tiny_llama
    target = get_target("torch")
    timed: list[float] = []

    def cost(runnable, example_inputs, settings):
        timed.append(matrix_cost_ms(runnable))
        return Timing(timed[-1], (timed[-1],), 0.0, 0.0, 1, False)

    monkeypatch.setattr(build, "measure", cost)
    widths = {g.name: sorted({1, g.count // 2, g.count}) for g in plan.groups}
    table = measure_latency(plan, target, widths, settings=FAST, cache_dir=tmp_path)
    assert set(table.groups) == {g.name for g in plan.groups}
    layers = {g.name.split("layers.")[1].split(".")[0] for g in plan.groups if "layers." in g.name}
    assert len(layers) == 2
    # the two decoder layers are identical: one measured curve per kind of group, not per layer
    assert len(set(table.groups.values())) == len(plan.groups) // 2
    regions = sum(len(curve) for curve in table.times.values())
    assert len(timed) == regions + build.FIT_ROUNDS * len(table.fit_points)
    for g in plan.groups:
        assert table.widths(g.name) == widths[g.name]
    mlp = next(g for g in plan.groups if g.kind == "neuron")
    assert table.ms(mlp.name, 1) < table.ms(mlp.name, mlp.count)

    # the fit passes through every allocation it was fitted to, the fastest one among them
    assert table.fastest_ms is not None and table.scale > 0
    assert {c.label for c in table.fit_points} >= {"dense", "fastest"}
    for c in table.fit_points:
        assert table.predict(c.widths) == pytest.approx(c.ms, rel=1e-6)
    # ... and predicts a third allocation it was not fitted on
    half = {g.name: g.count // 2 if g.kind == "neuron" else g.count for g in plan.groups}
    small = materialize(model, plan, {g: first_mask(plan.group(g).count, k) for g, k in half.items()})
    predicted = table.predict(half)
    assert table.fastest_ms < predicted < table.dense_ms
    assert predicted == pytest.approx(matrix_cost_ms(target.compile(small, inputs)), rel=1e-6)

    # a second run re-uses the stored table without measuring anything
    def no_measuring(*args, **kwargs):
        raise AssertionError("the stored table should have been re-used")

    monkeypatch.setattr(build, "measure", no_measuring)
    assert measure_latency(plan, target, widths, settings=FAST, cache_dir=tmp_path) == table


@pytest.mark.slow
def test_measured_table_predicts_end_to_end_within_25_percent(tiny_llama, tmp_path):
    """The same steps timed for real on onnxruntime: the additive model holds on this runtime.
    Slow, not CI: other load on a shared machine made it miss 25% in 1 of 2 runs."""
    from osscar_export.latency.build import measure_latency
    from osscar_export.passes.materialize import materialize

    model, inputs, plan = tiny_llama
    target = get_target("ort-cpu")
    # thread CPU time: other jobs stretch the long end-to-end run far more than the short regions
    # (see osscar_export.latency.timing)
    settings = MeasureSettings(warmup=2, repeats=3, iters=5, max_attempts=2, clock="thread")
    widths = {g.name: sorted({1, g.count // 2, g.count}) for g in plan.groups}
    table = measure_latency(plan, target, widths, settings=settings, cache_dir=tmp_path)
    mlp = next(g for g in plan.groups if g.kind == "neuron")
    assert table.ms(mlp.name, 1) < table.ms(mlp.name, mlp.count)
    for c in table.fit_points:
        assert abs(table.predict(c.widths) - c.ms) / c.ms < 0.25, (c, table.predict(c.widths))
    half = {g.name: g.count // 2 if g.kind == "neuron" else g.count for g in plan.groups}
    small = materialize(model, plan, {g: first_mask(plan.group(g).count, k) for g, k in half.items()})
    measured = measure(target.compile(small, inputs), inputs, settings).ms
    predicted = table.predict(half)
    assert table.fastest_ms < predicted < table.dense_ms
    assert abs(predicted - measured) / measured < 0.25, (predicted, measured, table.dense_ms, table.fastest_ms)


def test_thread_clock_is_refused_for_multithreaded_targets(tiny_llama, tmp_path):
    from osscar_export.latency.build import measure_latency

    _, _, plan = tiny_llama
    with pytest.raises(ValueError, match="single-threaded"):
        measure_latency(plan, get_target("ort-cpu", threads=2), settings=MeasureSettings(clock="thread"), cache_dir=tmp_path)


class Stem(torch.nn.Module):
    """A stem group spanning root-level modules: only the root owns all of its tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 64, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(64)
        self.proj = torch.nn.Conv2d(64, 32, 3, padding=1)
        self.body = torch.nn.Sequential(*(torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(6)))
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(self.proj(torch.relu(self.bn(self.conv(x)))))
        return self.head(y.mean((2, 3)))


def _stem_table(monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Stem's latency table, timed for real, and the modules the target compiled for it."""
    from osscar_export.latency.build import measure_latency
    from osscar_export.passes.structures import find_structures

    torch.manual_seed(0)
    model, inputs = Stem().eval(), (torch.randn(1, 3, 48, 48),)
    plan = find_structures(model, inputs)
    timed: list[torch.fx.GraphModule] = []
    compile_ = type(get_target("ort-cpu")).compile

    def recording(self, module, example_inputs):
        timed.append(module)
        return compile_(self, module, example_inputs)

    monkeypatch.setattr(type(get_target("ort-cpu")), "compile", recording)
    settings = MeasureSettings(warmup=2, repeats=3, iters=5, max_attempts=2, clock="thread")
    table = measure_latency(plan, get_target("ort-cpu"), {g.name: [1, 32, g.count] for g in plan.groups},
                            settings=settings, cache_dir=None)
    monkeypatch.undo()
    return model, inputs, plan, table, timed, settings


def test_root_owned_group_is_measured_on_its_subgraph(monkeypatch):
    from osscar_export.latency.regions import owning_paths

    model, inputs, plan, table, timed, _ = _stem_table(monkeypatch)
    stem = plan.group("conv.channel")
    assert owning_paths(stem) == [""]  # no submodule owns it
    # every region is a small part of the model; only the end-to-end points, ONNX files sliced
    # from the dense one, compile all of it, once per timing round
    from osscar_export.latency.build import FIT_ROUNDS

    files = [m for m in timed if isinstance(m, Path)]
    assert len(files) == FIT_ROUNDS * len(table.fit_points) and len(set(files)) == len(table.fit_points)
    full_nodes = sum(n.op == "call_function" for n in plan.program.graph.nodes)
    sizes = [sum(n.op == "call_function" for n in m.graph.nodes) for m in timed if not isinstance(m, Path)]
    assert all(n <= full_nodes // 2 for n in sizes), (sizes, full_nodes)
    assert len(sizes) == sum(len(curve) for curve in table.times.values())
    assert table.ms(stem.name, 1) < table.ms(stem.name, stem.count)


@pytest.mark.slow
def test_root_owned_group_predicts_end_to_end(monkeypatch):
    """Timed for real: other load on the shared machine made it miss 30% in 1 of 5 CI-style runs."""
    from osscar_export.passes.materialize import materialize

    model, inputs, plan, table, _, settings = _stem_table(monkeypatch)
    half = {"conv.channel": 32}
    small = materialize(model, plan, {g: first_mask(plan.group(g).count, k) for g, k in half.items()})
    target = get_target("ort-cpu")
    measured = measure(target.compile(small, inputs), inputs, settings).ms
    predicted = table.predict(half)
    assert abs(predicted - measured) / measured < 0.3, (predicted, measured, table.dense_ms, table.fastest_ms)


def test_identical_regions_are_analysed_once(tiny_llama, monkeypatch):
    from osscar_export.latency import build, regions
    from osscar_export.latency.build import measure_latency
    from osscar_export.latency.timing import Timing

    _, _, plan = tiny_llama
    analysed: list[int] = []
    find = regions.find_structures

    def counting(*args, **kwargs):
        analysed.append(1)
        return find(*args, **kwargs)

    monkeypatch.setattr(regions, "find_structures", counting)
    monkeypatch.setattr(build, "measure", lambda *a, **k: Timing(1.0, (1.0,), 0.0, 0.0, 1, False))
    table = measure_latency(plan, get_target("ort-cpu"), {g.name: [g.count] for g in plan.groups}, cache_dir=None)
    # two identical decoder layers: each kind of region is analysed for the first layer only
    assert len(analysed) == len(set(table.groups.values())) == len(plan.groups) // 2
