"""``kedit bench phases``: where an editor's time goes, per function of ``editing/``, over real batches.

The editor edits the first N CounterFact cases in batches (sequentially, as a stream does) under cProfile;
the report lists the functions of the ``editing`` package by cumulative time with their call counts, and the
editor's own diagnostics (e.g. target-optimization steps), so that a speed change removes measured work.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path

from .bench import _cases, _corpus_file, editor_on, machine, save_json


def bench_phases(
    model_ref: str,
    data: Path,
    method: str,
    n: int = 20,
    batch_size: int = 10,
    corpus: Path | None = None,
    overrides: dict | None = None,
    top: int = 15,
    json_out: Path | None = None,
) -> dict:
    corpus_path = _corpus_file(corpus)
    model, tok, editor, t_stats = editor_on(model_ref, method, corpus_path, overrides)  # statistics: not profiled
    reqs = _cases(data, n)
    batches = [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)]
    prof = cProfile.Profile()
    diagnostics: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for b in batches:
        prof.enable()
        editor.edit(b)
        prof.disable()
        editor.commit()
        for k, v in editor.diagnostics.items():
            diagnostics.setdefault(k, []).extend(v)
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (prim calls, calls, tottime, cumtime, callers)
    package = str(Path(__file__).resolve().parents[2] / "editing")
    rows = [
        {"function": f"{Path(f).relative_to(Path(package).parent)}:{name}", "calls": nc, "cumulative_s": ct, "own_s": tt}
        for (f, _, name), (_, nc, tt, ct, _) in stats.items()
        if f.startswith(package)
    ]
    rows.sort(key=lambda r: -r["cumulative_s"])
    out = {
        "model": model_ref,
        "method": method,
        "n": len(reqs),
        "batch_size": batch_size,
        "seconds_per_edit": total / len(reqs),
        "statistics_s": t_stats,
        "functions": rows[:top],
        "diagnostics": {k: sum(v) / len(v) for k, v in diagnostics.items() if v},
        "machine": machine(),
    }
    save_json(json_out, out)
    return out


def table(result: dict) -> str:
    total = result["seconds_per_edit"] * result["n"]
    lines = [f"{result['method']}: {result['seconds_per_edit']:.2f} s per edit ({total:.1f} s for {result['n']})"]
    lines += ["| function | calls | cumulative | share |", "|---|---:|---:|---:|"]
    for r in result["functions"]:
        lines.append(f"| `{r['function']}` | {r['calls']} | {r['cumulative_s']:.1f} s | {r['cumulative_s'] / total:.0%} |")
    return "\n".join(lines)
