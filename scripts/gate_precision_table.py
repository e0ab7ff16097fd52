"""The tables of scripts/gate_precision.sh from its outputs: each attempt's edit and gate seconds on the model and on
the bf16 copy, and what the two streams' gates read at each version (where they differ).

usage: python scripts/gate_precision_table.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def steps(out: Path, p: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"gateprec_{p}_steps.jsonl").read_text().splitlines()]


def main(out: Path) -> None:
    runs = {p: steps(out, p) for p in ("model", "auto")}
    print("| attempt | facts | verdict (model / auto) | edit s | gates s, model | share | gates s, bf16 copy | share |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for m, a in zip(runs["model"], runs["auto"], strict=True):
        gm = sum(v for k, v in m.items() if k.startswith("gate:"))
        ga = sum(v for k, v in a.items() if k.startswith("gate:"))
        verdict = m["verdict"] if m["verdict"] == a["verdict"] else f"{m['verdict']} / {a['verdict']}"
        print(
            f"| {m['attempt']} | {m['n']} | {verdict} | {m['edit']:.1f} / {a['edit']:.1f} | {gm:.2f} | {gm / m['wall']:.1%}"
            f" | {ga:.2f} | {ga / a['wall']:.1%} |"
        )
    for p, rows in runs.items():
        big = [r for r in rows if r["n"] == 10]
        parts = {k: sum(r[k] for r in big) / len(big) for k in big[0] if k.startswith("gate:")}
        print(f"{p}: batches of 10, mean gate seconds " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in parts.items()))
    results = {p: json.loads((out / f"gateprec_{p}.json").read_text()) for p in ("model", "auto")}
    print(f"stream seconds: model {results['model']['total_s']:.0f}, auto {results['auto']['total_s']:.0f}")
    for vm, va in zip(results["model"]["versions"], results["auto"]["versions"], strict=True):
        diff = {k: (vm[k], va.get(k)) for k in vm if k != "version" and vm[k] != va.get(k)}
        shown = ", ".join(f"{k} {x:.4g} / {y:.4g}" for k, (x, y) in diff.items())
        print(f"v{vm['version']} ({vm['n_edits']} edits): " + (shown or "every gate metric equal"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
