"""End-to-end check on a real LM: prune SmolLM2-135M, materialize, export ONNX, generate in both.

Prunes a fraction of every SwiGLU MLP's neurons and whole KV groups in every attention layer
(magnitude supports, no re-fit: this checks the rewrite, not quality), then verifies that
- the materialized model computes what the masked model computes (logits, real prompt);
- the ONNX export matches it in onnxruntime;
- greedy decoding gives the same next tokens in torch and in onnxruntime.

The export has static shapes, so decoding runs on a fixed window of prompt + new tokens: the
model is causal, so the logits at position t do not depend on the filler after t. Measured
numbers: docs/results.md, "Materialize"; the rewrite itself: docs/design.md, "Materialize".

    python tools/smollm2_onnx_check.py --mlp-keep 0.5 --kv-remove 1 --new-tokens 20
    python tools/smollm2_onnx_check.py --tiny   # a small random Llama and random prompt ids: a smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from osscar_export import StructureGroup, apply_masks, export_onnx, find_structures, materialize
from osscar_export.models import CausalLMLogits, load_model

PROMPT = "The history of the printing press began in"
TINY_VOCAB = 256


def tiny_llama() -> torch.nn.Module:
    """SmolLM2's architecture (grouped-query attention, SwiGLU MLP) at a tiny size, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return CausalLMLogits(LlamaForCausalLM(config)).eval()


def magnitude_mask(group: StructureGroup, model: torch.nn.Module, width: int) -> torch.Tensor:
    """Keep the structures whose consumer input rows have the largest norm (summed over consumers)."""
    score = torch.zeros(group.count)
    for c in group.consumers:
        w = model.get_parameter(c.weight).detach()
        for i in range(group.count):
            score[i] += float(w.index_select(c.input.dim, c.input.indices(torch.tensor([i]))).norm())
    mask = torch.zeros(group.count, dtype=torch.bool)
    mask[score.argsort(descending=True)[:width]] = True
    return mask


def greedy(step, ids: torch.Tensor, prompt_len: int, new_tokens: int) -> list[int]:
    """Greedy decoding in a fixed window: ``step(ids) -> logits`` for the whole window each time."""
    ids = ids.clone()
    out = []
    for k in range(new_tokens):
        pos = prompt_len + k - 1
        token = int(np.argmax(step(ids)[0, pos]))
        out.append(token)
        if pos + 1 < ids.shape[1]:
            ids[0, pos + 1] = token
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlp-keep", type=float, default=0.5, help="fraction of MLP neurons kept per layer")
    ap.add_argument("--kv-remove", type=int, default=1, help="KV groups removed per attention layer")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", type=Path, default=None, help="where model.onnx goes (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true",
                    help="a small randomly initialised Llama and a random prompt of token ids instead of SmolLM2")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.perf_counter()
    if a.tiny:
        name, model, filler = "a tiny random Llama", tiny_llama(), 0
        prompt = torch.randint(1, TINY_VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
        decode = list  # token ids: the tiny model has no tokenizer
    else:
        loaded = load_model("smollm2-135m")
        name, model, tok = "smollm2-135m", loaded.model.eval(), loaded.tokenizer
        prompt, filler, decode = tok(a.prompt, return_tensors="pt").input_ids, tok.eos_token_id, tok.decode
    window = prompt.shape[1] + a.new_tokens
    ids = torch.full((1, window), filler, dtype=torch.long)
    ids[0, : prompt.shape[1]] = prompt[0]
    args = (ids,)
    print(f"loaded {name} in {time.perf_counter() - t0:.1f}s; prompt {prompt.shape[1]} tokens, window {window}")

    t = time.perf_counter()
    plan = find_structures(model, args)
    kinds: dict[str, int] = {}
    for g in plan.groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    print(f"find_structures: {len(plan.groups)} groups {kinds} in {time.perf_counter() - t:.1f}s")

    masks = {}
    for g in plan.groups:
        if g.kind == "neuron":
            masks[g.name] = magnitude_mask(g, model, max(1, round(a.mlp_keep * g.count)))
        elif g.kind == "kv_group":
            masks[g.name] = magnitude_mask(g, model, g.count - a.kv_remove)
    pruned = {k for k, m in masks.items() if not bool(m.all())}
    print(f"pruning {len(pruned)} groups: MLP neurons kept {a.mlp_keep:.0%}, "
          f"{a.kv_remove} KV group(s) removed per layer")

    t = time.perf_counter()
    masked = apply_masks(model, plan, masks)
    small = materialize(model, plan, masks)
    n_dense = sum(p.numel() for p in model.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    print(f"materialize: {n_dense / 1e6:.2f}M -> {n_small / 1e6:.2f}M parameters in {time.perf_counter() - t:.1f}s")
    with torch.no_grad():
        dense_logits, masked_logits, small_logits = model(*args), masked(*args), small(*args)
    diff = float((small_logits - masked_logits).abs().max())
    scale = float(masked_logits.abs().max())
    print(f"small vs masked logits: max |diff| {diff:.3g} (max |logit| {scale:.3g}); "
          f"masked vs dense max |diff| {float((masked_logits - dense_logits).abs().max()):.3g}")
    ok = diff <= 1e-4 * scale + 1e-5

    with tempfile.TemporaryDirectory() as tmp:
        path = (a.out or Path(tmp)) / ("tiny-pruned.onnx" if a.tiny else "smollm2-pruned.onnx")
        t = time.perf_counter()
        rep = export_onnx(small, args, path)
        print(f"ONNX: {rep.path} ({rep.path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f}s, "
              f"{rep.runtime} max |diff| {rep.max_abs_diff:.3g} (max |logit| {rep.max_abs_ref:.3g})")
        import onnxruntime as ort

        session = ort.InferenceSession(str(rep.path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        t = time.perf_counter()
        ort_tokens = greedy(lambda x: session.run(None, {name: x.numpy()})[0], ids, prompt.shape[1], a.new_tokens)
        with torch.no_grad():
            torch_tokens = greedy(lambda x: small(x).numpy(), ids, prompt.shape[1], a.new_tokens)
            masked_tokens = greedy(lambda x: masked(x).numpy(), ids, prompt.shape[1], a.new_tokens)
            dense_tokens = greedy(lambda x: model(x).numpy(), ids, prompt.shape[1], a.new_tokens)
        print(f"greedy decoding of {a.new_tokens} tokens, 4 models, in {time.perf_counter() - t:.1f}s")

    same = ort_tokens == torch_tokens
    ok = ok and same and masked_tokens == torch_tokens
    print(f"dense  (torch): {decode(dense_tokens)!r}")
    print(f"masked (torch): {decode(masked_tokens)!r}")
    print(f"small  (torch): {decode(torch_tokens)!r}")
    print(f"small  (ORT)  : {decode(ort_tokens)!r}")
    agree = sum(x == y for x, y in zip(ort_tokens, torch_tokens))
    print(f"ORT vs torch next tokens: {agree}/{a.new_tokens} identical; masked vs small identical: "
          f"{masked_tokens == torch_tokens}")
    print("PASS" if ok else "FAIL", f"(total {time.perf_counter() - t0:.0f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
