"""The tables of scripts/gate_precision.sh from its outputs: each attempt's edit and gate seconds on the model and on
the bf16 copy, and what the two streams' gates read at each version (where they differ).

usage: python scripts/gate_precision_table.py OUT [PREFIX]   (PREFIX: gateprec_ as the script writes them; the copies in
docs/ are bench_gateprec_ and bench_gateprec_rev_)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def steps(out: Path, p: str, prefix: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{prefix}{p}_steps.jsonl").read_text().splitlines()]


def gate_seconds(step: dict) -> float:
    return sum(v for k, v in step.items() if k.startswith("gate:"))


def fmt(x) -> str:
    return "–" if x is None else f"{x:.4g}"


def main(out: Path, prefix: str = "gateprec_") -> None:
    runs = {p: {s["attempt"]: s for s in steps(out, p, prefix)} for p in ("model", "auto")}
    print("| attempt | facts | verdict (model / auto) | edit s | gates s, model | share | gates s, bf16 copy | share |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in dict.fromkeys([*runs["model"], *runs["auto"]]):  # both streams' attempts, in order, matched by name
        m, a = runs["model"].get(name), runs["auto"].get(name)
        one = m or a
        verdict = " / ".join(x["verdict"] if x else "–" for x in (m, a))
        if m and a and m["verdict"] == a["verdict"]:
            verdict = m["verdict"]
        edit = " / ".join(f"{x['edit']:.1f}" if x else "–" for x in (m, a))
        cells = [f"{gate_seconds(x):.2f} | {gate_seconds(x) / x['wall']:.1%}" if x else "– | –" for x in (m, a)]
        print(f"| {name} | {one['n']} | {verdict} | {edit} | {cells[0]} | {cells[1]} |")
    for p, rows in runs.items():
        big = [r for r in rows.values() if r["n"] == max(x["n"] for x in rows.values())]
        parts = {k: sum(r.get(k, 0.0) for r in big) / len(big) for k in big[0] if k.startswith("gate:")}
        means = ", ".join(f"{k[5:]} {v:.2f}" for k, v in parts.items())
        print(f"{p}: the {big[0]['n']}-fact batches, mean gate seconds {means}")
    results = {p: json.loads((out / f"{prefix}{p}.json").read_text()) for p in ("model", "auto")}
    print(f"stream seconds: model {results['model']['total_s']:.0f}, auto {results['auto']['total_s']:.0f}")
    versions = {p: {v["version"]: v for v in r["versions"]} for p, r in results.items()}
    for name in dict.fromkeys([*versions["model"], *versions["auto"]]):
        vm, va = versions["model"].get(name, {}), versions["auto"].get(name, {})
        keys = [k for k in dict.fromkeys([*vm, *va]) if k != "version"]
        diff = {k: (vm.get(k), va.get(k)) for k in keys if vm.get(k) != va.get(k)}
        shown = ", ".join(f"{k} {fmt(x)} / {fmt(y)}" for k, (x, y) in diff.items())
        edits = (vm or va).get("n_edits")
        print(f"v{name} ({edits} edits): " + (shown or "every gate metric equal"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
