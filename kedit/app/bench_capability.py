"""``kedit bench capability``: what the lm-eval capability gate costs per step, all its documents against a sample.

The gate's cost does not depend on what the edits did, only on the documents it scores, so it is timed on the
unedited model: once scoring all of a gates file's ``limit`` documents per task, and once per sample size, on the
same model in one run (their ratio). Per sample size, for each gated 0/1 metric (accuracy), its detection power
(the probability that a step turning the share ``detect`` of the base's right answers wrong fails the gate) and
its false alarm rate (the same for a step that loses one right answer: a change the threshold allows).
"""

from __future__ import annotations

import time
from pathlib import Path

from evaluation.gates import load_gates
from evaluation.gates.base import Step
from evaluation.gates.capability import CapabilityGate, detection_power
from kedit.core.facts import EditRequest
from kedit.core.models import KNOWN_MODELS, load_model, pull

from .bench import machine, save_json


def _gate_seconds(gate: CapabilityGate, model, tok, repeat: int) -> tuple[float, dict]:
    """The fastest of ``repeat`` measurements (what the gate costs, not what the machine did meanwhile), each
    drawing its own sample (a batch of its own seeds the draw)."""
    best, metrics = float("inf"), {}
    for i in range(repeat):
        batch = [EditRequest(f"bench-{i}", "Paris", "{} is the capital of", "Italy")]
        t0 = time.perf_counter()
        metrics = gate.measure(Step(model, tok, batch, []), None).metrics
        best = min(best, time.perf_counter() - t0)
    return best, metrics


def bench_capability(
    model_ref: str, gates: Path | None, samples: list[int], repeat: int = 3, json_out: Path | None = None
) -> dict:
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    cfg = next((g.cfg for g in load_gates(gates).gates if isinstance(g, CapabilityGate)), None)
    if cfg is None:
        raise ValueError(f"{gates or 'the default gates file'}: no capability gate")
    model, tok = load_model(model_ref)
    full = CapabilityGate(cfg.model_copy(update={"sample": None}))
    full.on_base(model, tok)
    full_s, _ = _gate_seconds(full, model, tok, repeat)
    out = {"model": model_ref, "gates": str(gates or "default"), "tasks": list(cfg.tasks), "limit": cfg.limit}
    out |= {"max_regression": cfg.max_regression, "detect": cfg.detect, "full_s": full_s, "rows": [], "machine": machine()}
    out["full"] = _power(full, None)
    for s in samples:
        gate = CapabilityGate(cfg.model_copy(update={"sample": s, "full_every": 10**9}))
        gate.on_base(model, tok)
        seconds, metrics = _gate_seconds(gate, model, tok, repeat)
        row = {"sample": s, "seconds": seconds, "speedup": full_s / seconds}
        out["rows"].append(row | {"metrics": _power(gate, s)})
        save_json(json_out, out)
    return out


def _power(gate: CapabilityGate, sample: int | None) -> dict[str, dict]:
    """Per gated 0/1 metric: the base's right answers among the scored documents, and the probabilities that a step
    losing the share ``detect`` of them, and one losing one of them, fails (``sample`` None: all scored)."""
    cfg, out = gate.cfg, {}
    for key, (right, total) in gate.right_answers().items():
        s, limit = total if sample is None else sample, cfg.max_regression[key]
        out[key] = {
            "right": right,
            "documents": total,
            "power": detection_power(right, total, s, cfg.detect, limit),
            "false_alarm": detection_power(right, total, s, 1 / right, limit) if right else 0.0,
        }
    return out


def table(result: dict) -> str:
    rows = [
        f"| documents per task | seconds | ratio | metric (right of scored) | P(fail) at {result['detect']:.0%} of the right"
        " answers lost | P(fail) at one lost |"
    ]
    rows.append("|---:|---:|---:|---|---:|---:|")
    full = {"sample": f"all ({result['limit']})", "seconds": result["full_s"], "speedup": 1.0, "metrics": result["full"]}
    for r in [full, *result["rows"]]:
        for key, m in r["metrics"].items() or {"": None}.items():
            cells = f"{key} ({m['right']} of {m['documents']}) | {m['power']:.3f} | {m['false_alarm']:.3f}" if m else "| |"
            rows.append(f"| {r['sample']} | {r['seconds']:.2f} | {r['speedup']:.1f}x | {cells} |")
    return "\n".join(rows)
