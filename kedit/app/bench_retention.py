"""``kedit bench retention``: what the retention gate costs per step as the chain grows, all edits against a sample.

The gate's cost does not depend on whether the earlier edits hold, only on how many prompts it scores, so the
chain is stood in for by the first N facts of a file, all taken as holding on the previous version (no edit is
made). Per chain length: the gate scoring all N (``sample: null``) and scoring its sample, timed on the same
model in one run (their ratio), with the sample's detection power for the configured broken share and its false
alarm rate (the same probability for a step that breaks only the share ``healthy``, which the gate should pass).
"""

from __future__ import annotations

import time
from pathlib import Path

from evaluation.gates.retention import detection_power
from kedit.core.facts import load_facts
from kedit.core.models import KNOWN_MODELS, load_model, pull

from .bench import machine, save_json


def _gate_seconds(model, tok, cfg: dict, earlier: list, batch: list, repeat: int) -> tuple[float, dict]:
    from evaluation.gates import GateReport, suite_from_mapping

    suite = suite_from_mapping({"gates": [{"gate": "retention", **cfg}], "bisect": False})
    suite.on_accept(GateReport([], {}, {}, [r.key for r in earlier]))
    best, report = float("inf"), None
    for _ in range(repeat):  # the fastest of a few: what the gate costs, not what the machine did meanwhile
        t0 = time.perf_counter()
        report = suite.measure(model, tok, batch, earlier, suite.before(model, tok, batch))
        best = min(best, time.perf_counter() - t0)
    return best, report.metrics


def bench_retention(
    model_ref: str,
    data: Path,
    lengths: list[int],
    sample: int = 50,
    minimum: float = 0.8,
    detect: float = 0.3,
    healthy: float = 0.1,
    repeat: int = 2,
    json_out: Path | None = None,
) -> dict:
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    facts = [r for r in load_facts(data).accepted if r.target_true is not None]
    if len(facts) < max(lengths) + 1:
        raise ValueError(f"{data}: {len(facts)} facts with target_true, the longest chain needs {max(lengths) + 1}")
    model, tok = load_model(model_ref)
    batch = facts[:1]
    sampled = {"min": minimum, "sample": sample, "full_every": 10**9, "detect": detect}
    out = {"model": model_ref, "data": str(data), "sample": sample, "min": minimum, "detect": detect, "healthy": healthy}
    out["rows"] = []
    out["machine"] = machine()
    for n in lengths:
        earlier = facts[1 : n + 1]
        full_s, _ = _gate_seconds(model, tok, {"min": minimum}, earlier, batch, repeat)
        sample_s, metrics = _gate_seconds(model, tok, sampled, earlier, batch, repeat)
        out["rows"].append(
            {
                "earlier": n,
                "full_s": full_s,
                "sampled_s": sample_s,
                "speedup": full_s / sample_s,
                "scored": metrics["retention_scored"],
                "power": metrics.get("retention_power", 1.0),  # no sample below its size: every edit scored
                "false_alarm": detection_power(n, sample, healthy, minimum) if n > sample else 0.0,
            }
        )
        save_json(json_out, out)
    return out


def table(result: dict) -> str:
    rows = [
        f"| earlier edits | all scored | a sample of {result['sample']} | ratio | P(fail) at {result['detect']:.0%} broken"
        f" | P(fail) at {result['healthy']:.0%} broken |"
    ]
    rows.append("|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        rows.append(
            f"| {r['earlier']} | {r['full_s']:.2f} s | {r['sampled_s']:.2f} s | {r['speedup']:.1f}x | {r['power']:.3f}"
            f" | {r['false_alarm']:.4f} |"
        )
    return "\n".join(rows)
