"""What a target step's time is made of on this CPU: the matmuls' throughput by token count, and what compiling
the blocks (torch.compile, inductor) saves on a forward and backward through them.

usage: python scripts/step_compute.py [--model smollm2-135m] [--tokens 16 48 100] [--threads 2] [--json FILE]

1. One MLP projection's shape (the model's gate projection, d_model to d_ff), bf16 and fp32: the forward ``x @ Wᵀ`` and
   the backward's input gradient ``g @ W`` for M = 1 ... 512 rows, in GFLOP/s. Where the rate flattens, a step is
   bound by arithmetic (fewer tokens is what saves time); where it climbs with M, by per-call cost.
2. The model's blocks above the BalancEdit preset's layer (5 on) on a bf16 copy, eager attention, weights frozen:
   a forward and backward over T tokens of one sequence, eager, then each block compiled (``dynamic=True``), the
   compile's own time apart. This runs without a key/value cache: a transformers DynamicCache that fills its layers
   as it goes made compiled blocks recompile per layer in a scratch attempt inside ``optimize_targets`` (dynamo's
   guards read each layer's cache state), which is why this is measured here and not there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kedit.app.bench import machine
from kedit.core.models import load_model


def timed(fn, repeat: int) -> float:
    """Seconds per call, after three calls of warm-up."""
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def matmuls(d_in: int, d_out: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(d_out, d_in, dtype=dtype)  # (d_out, d_in) as nn.Linear keeps it
        for m in (1, 8, 48, 128, 512):
            x, g = torch.randn(m, d_in, dtype=dtype), torch.randn(m, d_out, dtype=dtype)
            flop = 2 * m * d_in * d_out
            fwd = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w), 50)
            bwd = timed(lambda g=g, w=w: g @ w, 50)  # the input gradient of a frozen weight
            rows.append({"dtype": str(dtype), "m": m, "forward_gflops": flop / fwd / 1e9, "input_grad_gflops": flop / bwd / 1e9})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def blocks(model, first: int, tokens: int) -> dict:
    base = model.model
    layers = base.layers[first:]
    pos = torch.arange(tokens)[None]
    h0 = torch.randn(1, tokens, model.config.hidden_size, dtype=torch.bfloat16)
    pe = base.rotary_emb(h0, pos)
    mask = torch.full((tokens, tokens), float("-inf")).triu(1).to(torch.bfloat16)[None, None]  # (1, 1, T, T)

    def step():
        h = h0.clone().requires_grad_(True)
        x = h
        for layer in layers:
            x = layer(x, attention_mask=mask, position_embeddings=pe, position_ids=pos)
            x = x[0] if isinstance(x, tuple) else x
        x.float().pow(2).mean().backward()

    eager = timed(step, 20)
    for layer in layers:
        layer.compile(dynamic=True)
    t = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t
    compiled = timed(step, 20)
    for layer in layers:
        layer._compiled_call_impl = None  # back to eager for the next token count
    row = {"tokens": tokens, "blocks": len(layers), "eager_s": eager, "compiled_s": compiled, "compile_s": compile_s}
    row["speedup"] = eager / compiled
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 48, 100])
    ap.add_argument("--first", type=int, default=5, help="the first block a step runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    model = model.to(torch.bfloat16).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_attn_implementation("eager")
    d, d_ff = model.config.hidden_size, model.config.intermediate_size
    out = {"model": args.model, "matmuls": matmuls(d, d_ff), "blocks": [blocks(model, args.first, t) for t in args.tokens]}
    if args.json:
        args.json.write_text(json.dumps(out | {"machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
