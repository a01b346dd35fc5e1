#!/usr/bin/env python
"""Write a Hugging Face folder of a randomly initialised LM shaped like a small modern LLM with a
very large vocabulary, for the job's speed and memory checks (docs/results.md, "Job speed").

Default shape (Gemma-3-270M's sizes on Llama's modeling): hidden 640, 18 layers, 4 query heads
and 1 KV head of 256, MLP 2048, a 262144-token vocabulary with tied embeddings: about 270M
parameters, two thirds of them in the embedding, whose LM head dominates a prefill. The
tokenizer is SmolLM2's (its ids all fit the vocabulary), so the job calibrates on real text.
Random weights: for latency and memory only, never for quality.

    python tools/standin_llm.py --out WORK/standin
    /usr/bin/time -v osscar-export WORK/standin --speedup 1.25 --out WORK/standin-out
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=262144)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    from transformers import LlamaConfig, LlamaForCausalLM

    from osscar_export.models import load_model

    tokenizer = load_model("smollm2-135m", seq_len=8, batch=1, image_size=None).tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {params / 1e6:.0f}M parameters, vocabulary {args.vocab}")


if __name__ == "__main__":
    main()
