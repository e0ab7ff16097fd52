"""Benchmarks on real models. Numbers in docs/benchmarks.md come from these functions."""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.metrics import counterfact_from_probs, counterfact_pairs
from evaluation.scoring import score_targets

from .facts import load_facts
from .models import KNOWN_MODELS, load_model, pull

log = logging.getLogger(__name__)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def bench_metrics(model_ref: str, data: Path, n: int, batch_size: int = 32, single_limit: int | None = None) -> dict:
    """Time the CounterFact protocol's pairs: batched (packed, one forward per batch) against
    one (prompt, target) pair per forward, on the same model and pairs; check they agree."""
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    model, tok = load_model(model_ref)
    reqs = [r for r in load_facts(data, limit=n).accepted if r.target_true is not None]
    pairs = counterfact_pairs(reqs)
    m = len(pairs.prompts)
    score_targets(model, tok, pairs.prompts[:8], pairs.targets[:8])  # warm-up

    t0 = time.perf_counter()
    batched = score_targets(model, tok, pairs.prompts, pairs.targets, batch_size)
    t_batched = time.perf_counter() - t0

    k = m if single_limit is None else min(single_limit, m)
    single_lp = torch.empty(k)
    t0 = time.perf_counter()
    for i in tqdm(range(k), desc="one pair at a time", unit="pair"):
        single_lp[i] = score_targets(model, tok, [pairs.prompts[i]], [pairs.targets[i]]).logprob[0]
    t_single = (time.perf_counter() - t0) * m / k
    return {
        "model": model_ref,
        "data": str(data),
        "n_records": len(reqs),
        "n_pairs": m,
        "n_unique_prompts": len(set(pairs.prompts)),
        "batch_size": batch_size,
        "batched_s": round(t_batched, 2),
        "single_s": round(t_single, 2),
        "single_timed_pairs": k,
        "pairs_per_s_batched": round(m / t_batched, 1),
        "pairs_per_s_single": round(m / t_single, 1),
        "speedup": round(t_single / t_batched, 2),
        "max_abs_logprob_diff": float((batched.logprob[:k] - single_lp).abs().max()),
        "unedited": counterfact_from_probs(pairs, batched.prob),
        "machine": machine(),
    }
