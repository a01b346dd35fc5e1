#!/usr/bin/env python
"""Compare pruning methods on real pretrained models at the same kept structure counts
(docs/results.md, "Quality vs baselines").

Every method goes through ``osscar_export.prune`` with one plan, one calibration set and the same
per-group kept counts: MP, MP+, greedy OBS and OSSCAR in sequential mode, OSSCAR in dense mode.
Torch-Pruning's magnitude criterion (GroupMagnitudeImportance, p=2, on its own dependency graph)
prunes the eager model at the same counts; it handles unit-size structures (neurons, channels)
only, so configurations with heads show "n/a" for it.

Quality is scored on held-out real data with the masked eager model (``apply_masks``): by the
mask-equivalence law (docs/design.md, "Mask-equivalence law") it computes what the materialized
model computes (the column ``mat Δ`` is the measured max |difference| on a calibration batch),
and it runs at the evaluation shape (SmolLM2: 512-token windows) although the graph was captured
at the calibration shape.

    python tools/eval_quality.py --model smollm2 --quick
    python tools/eval_quality.py --model all --methods mp,mp+,greedy,osscar,osscar-dense,tp-magnitude
    python tools/eval_quality.py --model tiny-llama --quick   # random weights and tokens: a smoke test, no quality

``--model all`` runs the three pretrained models; ``tiny-llama`` is a two-layer Llama with random
weights, calibrated and scored on random token windows, so every method runs in seconds.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from osscar_export import StructurePlan, apply_masks, find_structures, prune
from osscar_export.atomic import write_text

METHODS = ("mp", "mp+", "greedy", "osscar", "osscar-dense", "tp-magnitude")
MODELS = ("smollm2", "efficientnet", "minilm")  # pretrained: what --model all runs


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms (sees torch's CPU tensors,
    which tracemalloc does not)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is what is in use
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Setup:
    """One model: its plan, calibration, the configurations to compare and how to score a model."""

    name: str
    model: nn.Module
    example_inputs: tuple
    plan: StructurePlan
    calibration: list
    configs: list[tuple[str, dict[str, int]]]  # label -> kept count per group
    score: Callable[[nn.Module], dict[str, float]]


def counts_for(plan: StructurePlan, fractions: dict[str, float], select: Callable = lambda g: True) -> dict[str, int]:
    """Kept count per group of the given kinds (``max(1, round(f·n))``), selected groups only."""
    return {g.name: max(1, round(fractions[g.kind] * g.count)) for g in plan.groups if g.kind in fractions and select(g)}


def smollm2(quick: bool) -> Setup:
    from osscar_export.data import eval_text_windows, text_windows
    from osscar_export.evaluate import perplexity
    from osscar_export.models import load_model

    loaded = load_model("smollm2-135m", seq_len=256, batch=4)
    plan = find_structures(loaded.model, loaded.example_inputs)
    calibration = text_windows("bbc-news", loaded.tokenizer, 256, 16 if quick else 64, seed=0, batch=4)
    windows = eval_text_windows("wiki-summaries", loaded.tokenizer, 512, 8 if quick else 32, batch=4)
    configs = [
        ("MLP 75%", counts_for(plan, {"neuron": 0.75})),
        ("MLP 50%", counts_for(plan, {"neuron": 0.5})),
        ("MLP 50% + KV 2/3", counts_for(plan, {"neuron": 0.5, "kv_group": 2 / 3})),
    ]
    return Setup("SmolLM2-135M", loaded.model, loaded.example_inputs, plan, calibration, configs, lambda m: {"ppl": perplexity(m, windows)})


def efficientnet(quick: bool) -> Setup:
    from osscar_export.calibration_data import load_calibration
    from osscar_export.data import imagenet_labelled, natural_images
    from osscar_export.evaluate import classification_metrics
    from osscar_export.models import load_model

    loaded = load_model("efficientnet-lite0", batch=8)
    plan = find_structures(loaded.model, loaded.example_inputs)
    calibration = load_calibration("natural-calib", loaded, 32 if quick else 128, seed=0)
    labelled, labels = imagenet_labelled(loaded.preprocess, batch=4)
    heldout = natural_images("heldout", loaded.preprocess, 16 if quick else 64, seed=1, batch=8)
    dense = loaded.model

    def expansion(g) -> bool:
        return any("_expand_conv" in s.target for s in g.producers)

    def score(m: nn.Module) -> dict[str, float]:
        top = classification_metrics(m, dense, labelled, labels)
        held = classification_metrics(m, dense, heldout)
        return {"top1@20": top["top1"], "agree": held["top1_agreement"], "KL": held["kl_dense_to_model"]}

    configs = [(f"expansion {int(f * 100)}%", counts_for(plan, {"channel": f}, expansion)) for f in (0.75, 0.5)]
    return Setup("EfficientNet-Lite0", loaded.model, loaded.example_inputs, plan, calibration, configs, score)


def minilm(quick: bool) -> Setup:
    from osscar_export.calibration_data import load_calibration
    from osscar_export.data import encode_sentences, sentences
    from osscar_export.evaluate import embedding_similarity
    from osscar_export.models import load_model

    loaded = load_model("minilm-l6", seq_len=128, batch=8)
    plan = find_structures(loaded.model, loaded.example_inputs)
    # ~26 real tokens a sentence (calibrate drops the padding rows): 128 sentences give ~3.4k rows
    # for the 1536-input MLP projections; 32 (~800 rows) left that problem under-determined
    calibration = load_calibration("bbc-news", loaded, 128 if quick else 512, seed=0)
    held = encode_sentences(loaded.tokenizer, sentences("wiki-summaries", 64 if quick else 256, seed=1, split="eval"), 128, batch=8)
    dense = loaded.model
    configs = [("MLP 50% + heads 50%", counts_for(plan, {"neuron": 0.5, "head": 0.5}))]
    return Setup("MiniLM-L6", loaded.model, loaded.example_inputs, plan, calibration, configs, lambda m: {"cos": embedding_similarity(m, dense, held)})


def tiny_llama(quick: bool) -> Setup:
    """A two-layer Llama (grouped-query attention, SwiGLU MLP) from a small config with random
    weights, calibrated and scored on random token windows: exercises every method, measures
    nothing about quality."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osscar_export.evaluate import perplexity
    from osscar_export.models import CausalLMLogits

    vocab, seq, batch = 128, 16, 2
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = CausalLMLogits(LlamaForCausalLM(config)).eval()
    tokens = torch.Generator().manual_seed(0)

    def windows(n: int, length: int = seq) -> list[tuple[torch.Tensor]]:
        return [(torch.randint(0, vocab, (batch, length), generator=tokens),) for _ in range(n)]

    example = windows(1)[0]
    plan = find_structures(model, example)
    calibration = windows(4 if quick else 16)
    held = windows(2 if quick else 8, 2 * seq)
    configs = [
        ("MLP 50%", counts_for(plan, {"neuron": 0.5})),
        ("MLP 50% + KV 1/2", counts_for(plan, {"neuron": 0.5, "kv_group": 0.5})),
    ]
    return Setup("tiny-llama", model, example, plan, calibration, configs, lambda m: {"ppl": perplexity(m, held)})


SETUPS: dict[str, Callable[[bool], Setup]] = {"smollm2": smollm2, "efficientnet": efficientnet, "minilm": minilm,
                                              "tiny-llama": tiny_llama}


def tp_magnitude(setup: Setup, counts: dict[str, int]) -> nn.Module:
    """Torch-Pruning's magnitude pruning of the same groups to the same counts (unit-size groups)."""
    import torch_pruning as tp

    model = copy.deepcopy(setup.model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=setup.example_inputs)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    for name, kept in counts.items():
        group = setup.plan.group(name)
        if group.unit != 1:
            raise NotImplementedError(f"{name}: {group.kind} of {group.unit} rows")
        consumer = model.get_submodule(next(c for c in group.consumers if c.full).weight.rsplit(".", 1)[0])
        fn = tp.prune_linear_in_channels if isinstance(consumer, nn.Linear) else tp.prune_conv_in_channels
        scores = importance(graph.get_pruning_group(consumer, fn, idxs=list(range(group.count))))
        drop = scores.argsort()[: group.count - kept].tolist()
        graph.get_pruning_group(consumer, fn, idxs=drop).prune()
    return model


def run(setup: Setup, methods: list[str], console: Console) -> list[dict]:
    rows = [{"model": setup.name, "config": "dense", "method": "-", **setup.score(setup.model)}]
    console.print(rows[-1])
    probe = setup.calibration[0]
    for label, counts in setup.configs:
        for method in methods:
            row = {"model": setup.name, "config": label, "method": method}
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                if method == "tp-magnitude":
                    try:
                        model = tp_magnitude(setup, counts)
                    except NotImplementedError as err:
                        rows.append({**row, "note": f"n/a ({err})"})
                        console.print(rows[-1])
                        continue
                else:
                    mode = "dense" if method == "osscar-dense" else "sequential"
                    result = prune(setup.model, setup.calibration, widths=counts, method=method.removesuffix("-dense"),
                                   mode=mode, plan=setup.plan, progress=False)
                    model = apply_masks(setup.model, setup.plan, result.masks, result.weights, result.shifts)
                seconds = time.perf_counter() - t0
            with torch.inference_mode():
                if method != "tp-magnitude":
                    row["mat Δ"] = float((result.model(*probe) - model(*probe)).abs().max())
                    row["loss"] = sum(result.layer_losses.values())
                    row["params"] = _params(result.model) / _params(setup.model)
                row.update(setup.score(model.eval()))
            rows.append({**row, "prune s": seconds, "peak MB": mem.mb})
            console.print(rows[-1])
    return rows


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def table(rows: list[dict]) -> Table:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("model",)]
    t = Table(title="osscar-export: quality at equal kept structure counts")
    t.add_column("model")
    for k in keys:
        t.add_column(k, justify="right" if k not in ("config", "method", "note") else "left")
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        t.add_row(r["model"], *cells)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=(*SETUPS, "all"), default="all",
                        help="a pretrained model, all three, or tiny-llama (random weights, for smoke tests)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="small calibration and evaluation sets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this JSON file (atomically)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console(width=200)
    rows = []
    for name in MODELS if args.model == "all" else (args.model,):
        t0 = time.perf_counter()
        setup = SETUPS[name](args.quick)
        console.print(f"{setup.name}: {len(setup.plan.groups)} groups, {len(setup.calibration)} calibration batches, set up in {time.perf_counter() - t0:.0f}s")
        rows += run(setup, methods, console)
        if args.json:
            write_text(args.json, json.dumps(rows, indent=1))
    console.print(table(rows))


if __name__ == "__main__":
    main()
