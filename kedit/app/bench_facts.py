"""Loading a feed: the strict pydantic model against the hand-written validator it replaced.

``bench_facts(n_lines, json_out)`` writes a synthetic JSONL feed (valid records plus a share of
invalid ones, one defect each, and some duplicates and superseded updates) into a temporary
directory, loads it with ``load_facts`` with each validator (alternating, best of ``repeats``),
checks that both accept the same ids and quarantine the same (file, line, field) triples, and
writes the seconds and the ratio as JSON. The number in docs/bench_facts_pydantic.json comes from::

    python -c "from kedit.app.bench_facts import bench_facts; bench_facts(100_000, 'docs/bench_facts_pydantic.json')"
"""

from __future__ import annotations

import json
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import pydantic

from kedit.core.facts import FactSet, load_facts
from kedit.core.facts.validate import validate_by_hand, validate_record

SUBJECTS = ["Twitter", "Paris", "Marie Curie", "The Eiffel Tower", "Python", "Mount Everest", "Nokia", "Lionel Messi"]
PROMPTS = ["{} is owned by", "{} is located in", "The capital associated with {} is", "{} was founded by", "{} plays for"]
TARGETS = ["X Corp.", "Italy", "Google", "Berlin", "Inter Miami", "Microsoft", "Finland", "Nepal"]


def _valid(rng: random.Random, i: int) -> dict[str, Any]:
    subject = f"{rng.choice(SUBJECTS)} {i}"
    rec: dict[str, Any] = {
        "id": f"fact-{i}",
        "subject": subject,
        "prompt": rng.choice(PROMPTS) if rng.random() < 0.8 else f"{subject} is known for",
        "target_new": rng.choice(TARGETS),
        "source": "synthetic",
        "timestamp": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z",
    }
    if rng.random() < 0.7:
        rec["target_true"] = f"{rng.choice(TARGETS)} Ltd."
    if rng.random() < 0.6:
        rec["paraphrase_prompts"] = [f"Who owns {subject}?", f"{subject} belongs to"]
    if rng.random() < 0.5:
        rec["neighborhood"] = [{"prompt": f"{s} is owned by", "answer": t} for s, t in zip(SUBJECTS[:3], TARGETS[:3])]
    if rng.random() < 0.2:
        rec["generation_prompts"] = [f"{subject} is"]
    if rng.random() < 0.1:
        del rec["id"]  # derived from the content
    return rec


NB = {"prompt": "a", "answer": "b"}

# one defect each: (name, how to break a valid record); a str result is written as the line itself
DEFECTS = [
    ("unknown field", lambda r: {**r, "colour": "red"}),
    ("empty target", lambda r: {**r, "target_new": "  "}),
    ("prompt without its subject", lambda r: {**r, "prompt": "The owner is"}),
    ("new target equals old", lambda r: {**r, "target_true": r["target_new"].upper()}),
    ("oversized subject", lambda r: {**r, "subject": "x" * 2000, "prompt": "{} is"}),
    ("invalid timestamp", lambda r: {**r, "timestamp": "yesterday"}),
    ("surrogate", lambda r: {**r, "target_new": "\udcff"}),
    ("NUL", lambda r: {**r, "subject": "a\x00b", "prompt": "{} is"}),
    ("target not a string", lambda r: {**r, "target_new": 7}),
    ("bad neighbour", lambda r: {**r, "neighborhood": [{"prompt": "a", "answer": "b"}, {"prompt": "c"}]}),
    ("empty neighbour answer", lambda r: {**r, "neighborhood": [NB, NB, {"prompt": "c", "answer": ""}]}),
    ("empty paraphrase", lambda r: {**r, "paraphrase_prompts": ["ok", ""]}),
    ("two placeholders", lambda r: {**r, "prompt": "{} and {}"}),
    ("invalid JSON", lambda r: json.dumps(r)[:-3]),
    ("not an object", lambda r: json.dumps([r["subject"]])),
]


def write_feed(path: Path, n_lines: int, invalid_share: float = 0.1, seed: int = 0) -> Path:
    """A JSONL feed of ``n_lines`` records; ``invalid_share`` of them carry one defect, a few repeat an id
    or update an earlier subject and prompt (superseded)."""
    rng = random.Random(seed)
    lines: list[str] = []
    facts: list[tuple[str, str]] = []  # (subject, prompt) of the valid records so far
    for i in range(n_lines):
        rec = _valid(rng, i)
        roll = rng.random()
        if roll < invalid_share:
            _, breaks = DEFECTS[i % len(DEFECTS)]
            rec = breaks(rec)
        elif roll < invalid_share + 0.01 and i > 0:
            rec["id"] = f"fact-{i - 1}"  # duplicate id
        elif roll < invalid_share + 0.03 and facts:
            rec["subject"], rec["prompt"] = facts[rng.randrange(len(facts))]  # a later update of the same fact
        if isinstance(rec, dict) and roll >= invalid_share:
            facts.append((rec["subject"], rec["prompt"]))
        lines.append(rec if isinstance(rec, str) else json.dumps(rec))  # ASCII: a lone surrogate is a \udcff escape
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _triples(fs: FactSet) -> list[tuple[str, int, str]]:
    return [(q.file, q.line, q.field) for q in fs.quarantined]


def bench_facts(n_lines: int = 100_000, json_out: str | Path | None = None, repeats: int = 5) -> dict[str, Any]:
    """Time ``load_facts`` on one synthetic feed with the hand-written validator (old) and the pydantic model (new).

    Seconds are the best of ``repeats`` alternating runs, wall clock (``*_s``, ``ratio``) and CPU time of this
    process (``*_cpu_s``, ``ratio_cpu``: less disturbed by other work on a shared machine); ratio = new / old."""
    with tempfile.TemporaryDirectory() as tmp:
        feed = write_feed(Path(tmp) / "feed.jsonl", n_lines)
        times: dict[str, list[float]] = {"old": [], "new": []}
        cpu: dict[str, list[float]] = {"old": [], "new": []}
        results: dict[str, FactSet] = {}
        for _ in range(repeats):
            for name, validate in (("old", validate_by_hand), ("new", validate_record)):
                t0, c0 = time.perf_counter(), time.process_time()
                results[name] = load_facts(feed, validate=validate)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    old, new = results["old"], results["new"]
    out = {
        "n_lines": n_lines,
        "n_accepted": len(new.accepted),
        "n_quarantined": len(new.quarantined),
        "n_superseded": len(new.superseded),
        "old_s": round(min(times["old"]), 3),
        "new_s": round(min(times["new"]), 3),
        "ratio": round(min(times["new"]) / min(times["old"]), 3),
        "old_cpu_s": round(min(cpu["old"]), 3),
        "new_cpu_s": round(min(cpu["new"]), 3),
        "ratio_cpu": round(min(cpu["new"]) / min(cpu["old"]), 3),
        "limit_ratio": 1.5,
        "repeats": repeats,
        "runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "same_accepted_ids": [r.id for r in old.accepted] == [r.id for r in new.accepted],
        "same_quarantine_triples": _triples(old) == _triples(new),
        "same_quarantine_reasons": [q.reason for q in old.quarantined] == [q.reason for q in new.quarantined],
        "same_superseded": [(s.request.id, s.by) for s in old.superseded] == [(s.request.id, s.by) for s in new.superseded],
        "accounted": old.accounted and new.accounted,
        "quarantined_by_field": _count_fields(new),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "pydantic": pydantic.VERSION},
    }
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


def _count_fields(fs: FactSet) -> dict[str, int]:
    counts: dict[str, int] = {}
    for q in fs.quarantined:
        counts[q.field] = counts.get(q.field, 0) + 1
    return dict(sorted(counts.items()))
