"""``kedit bench reedit``: facts that change twice or three times over one stream (CoME's setting).

The set is built from CounterFact: N facts are edited once to their ``target_new`` (A); ``n_twice`` of
them are updated again to B, and ``n_thrice`` of those a third time to C, each later value taken from
the ``target_new`` of another record with the same relation (``relation_id``), so that it is a value of
the right kind. A later update arrives at least ``gap`` batches after the one it replaces, as a nightly
feed would deliver it. Each batch is resolved against what the stream has written so far
(``kedit.core.facts.reedit``), exactly as the pipeline does: a re-edit's ``target_true`` is the value
the chain last wrote. Metrics on the final model (``evaluation.metrics.reedit_metrics``).

Every method runs on a fresh model in its own process; the JSON is rewritten after each method, and a
run given the same JSON path and settings skips the methods already there (``--json`` resumes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import deque
from pathlib import Path

from kedit.core.facts import EditRequest
from kedit.core.facts.reedit import Held, resolve
from kedit.core.facts.schema import normalize
from kedit.core.models import KNOWN_MODELS, pull

from .bench import _cases, _corpus_file, each_method_alone, editor_on, machine, resumed, with_code

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Schedule:
    batches: list[list[EditRequest]]
    values: dict[str, list[str]]  # fact id -> its edited values in order (A, B, C)


def relations(data: Path | str) -> dict[str, str]:
    """CounterFact fact id (``cf-<case_id>``) -> relation id, read from the ROME-format file."""
    records = json.loads(Path(data).read_text(encoding="utf-8"))
    return {f"cf-{r['case_id']}": r["requested_rewrite"]["relation_id"] for r in records}


def schedule(
    reqs: list[EditRequest],
    pool: list[EditRequest],
    relation_of: dict[str, str],
    n_twice: int,
    n_thrice: int,
    batch_size: int,
    gap: int,
    seed: int = 0,
) -> Schedule:
    """Batches of first edits and later updates; a fact's k-th update comes ``gap`` batches after its (k-1)-th.

    ``pool`` is every record of the file: later values come from the ``target_new`` of pool records of the
    same relation, distinct (case and spacing folded) from the fact's earlier values."""
    rng = random.Random(seed)
    by_relation: dict[str, list[str]] = {}
    for r in pool:
        by_relation.setdefault(relation_of[r.id], []).append(r.target_new)
    later: dict[int, list[str]] = {}  # per fact, the distinct values of its relation it may take later
    for i, r in enumerate(reqs):
        seen = {normalize(r.target_true or ""), normalize(r.target_new)}
        options = []
        for v in by_relation[relation_of[r.id]]:
            if normalize(v) not in seen:
                seen.add(normalize(v))
                options.append(v)
        rng.shuffle(options)
        later[i] = options
    # the facts changed three times need two other values, those changed twice one
    thrice = rng.sample([i for i in later if len(later[i]) >= 2], n_thrice)
    twice = thrice + rng.sample([i for i in later if later[i] and i not in thrice], n_twice - n_thrice)
    rounds = {i: 2 for i in twice} | {i: 3 for i in thrice}
    values = {r.id: [r.target_new, *later[i][: rounds.get(i, 1) - 1]] for i, r in enumerate(reqs)}
    firsts = deque(reqs)
    waiting: list[tuple[int, EditRequest]] = []  # (earliest tick, request)
    batches: list[list[EditRequest]] = []
    tick = 0  # one per feed delivery; a delivery with nothing in it makes no batch
    while firsts or waiting:
        due = [w for w in waiting if w[0] <= tick][:batch_size]
        for w in due:
            waiting.remove(w)
        batch = [r for _, r in due]
        while firsts and len(batch) < batch_size:
            batch.append(firsts.popleft())
        for r in batch:
            base_id, _, k = r.id.partition("@")
            k = int(k or 1)
            if k < len(values[base_id]):
                waiting.append((tick + gap, dataclasses.replace(r, id=f"{base_id}@{k + 1}", target_new=values[base_id][k])))
        if batch:
            batches.append(batch)
        tick += 1
    return Schedule(batches, values)


def _run_method(method: str, model_ref: str, sched: Schedule, corpus_path: str | None, overrides: dict) -> dict:
    """One editor through the whole schedule on a fresh model; metrics on the final model."""
    import resource

    from tqdm import tqdm

    from evaluation.metrics import ReEditCase, reedit_metrics

    model, tok, editor, t_stats = editor_on(model_ref, method, corpus_path, overrides)
    live: dict[tuple[str, str], Held] = {}  # what the stream holds per slot, as the pipeline keeps it
    first: dict[str, EditRequest] = {}  # each fact's first edit, with CounterFact's old value
    n_edits = n_reedits = 0
    diagnostics: dict[str, dict[str, list[float]]] = {"first": {}, "reedit": {}}  # per request, by kind of edit
    t0 = time.perf_counter()
    for b, batch in enumerate(tqdm(sched.batches, desc=f"{method}: re-edit stream", unit="batch")):
        res = resolve(batch, live)
        if res.noops:
            raise RuntimeError(f"the schedule repeats a value: {[r.id for r, _ in res.noops]}")
        editor.edit(res.to_edit)
        editor.commit()
        for name, values in editor.diagnostics.items():  # to_edit: the first edits, then the re-edits
            diagnostics["first"].setdefault(name, []).extend(values[: len(res.first)])
            diagnostics["reedit"].setdefault(name, []).extend(values[len(res.first) :])
        live.update({r.slot: Held(r, str(b)) for r in res.to_edit})
        first.update({r.id: r for r in res.first})
        n_edits += len(res.to_edit)
        n_reedits += len(res.reedits)
    t_edit = time.perf_counter() - t0
    once, again = [], []
    for held in live.values():
        base_id = held.request.id.partition("@")[0]
        values = sched.values[base_id]
        case = ReEditCase(dataclasses.replace(held.request, target_true=first[base_id].target_true), tuple(values[:-1]))
        (again if len(values) > 1 else once).append(case)
    thrice = [c for c in again if len(c.superseded) >= 2]
    return {
        "reedited": reedit_metrics(model, tok, again),
        "reedited_thrice": reedit_metrics(model, tok, thrice) if thrice else None,
        "once": reedit_metrics(model, tok, once),
        "n_edits": n_edits,
        "n_reedits": n_reedits,
        "seconds_per_edit": t_edit / max(n_edits, 1),
        # the editor's own measurements (editing.base.Editor.diagnostics), mean over first edits and re-edits
        "diagnostics": {kind: {k: sum(v) / len(v) for k, v in d.items() if v} for kind, d in diagnostics.items()},
        "statistics_s": t_stats,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bench_reedit(
    model_ref: str,
    data: Path,
    methods: list[str],
    n: int = 100,
    n_twice: int = 30,
    n_thrice: int = 10,
    batch_size: int = 10,
    gap: int = 3,
    start: int = 0,
    seed: int = 0,
    corpus: Path | None = None,
    overrides: dict[str, dict] | None = None,
    json_out: Path | None = None,
) -> dict:
    """The re-edit stream for each method (see the module's docstring); resumes from ``json_out``."""
    if not 0 <= n_thrice <= n_twice <= n:
        raise ValueError(f"need 0 <= n_thrice <= n_twice <= n, got {n_thrice}, {n_twice}, {n}")
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    pool = _cases(data, 10**9)
    reqs = pool[start : start + n]
    sched = schedule(reqs, pool, relations(data), n_twice, n_thrice, batch_size, gap, seed)
    corpus_path = _corpus_file(corpus)
    settings = {
        "model": model_ref,
        "data": str(data),
        "n": len(reqs),
        "start": start,
        "n_twice": n_twice,
        "n_thrice": n_thrice,
        "batch_size": batch_size,
        "gap": gap,
        "seed": seed,
        "corpus": corpus_path or "model samples",
        "overrides": overrides or {},
    }
    settings = with_code(settings)
    out = {**settings, "n_batches": len(sched.batches), "results": resumed(json_out, settings), "machine": machine()}
    return each_method_alone(
        out, methods, _run_method, lambda m: (model_ref, sched, corpus_path, (overrides or {}).get(m, {})), json_out
    )


def table(result: dict) -> str:
    """One row per method: latest wins (prompt, paraphrases), residual P of superseded values, specificity."""
    head = "method        | re-edited: latest wins / para / P(superseded) / P(latest) / spec | once: eff / gen / spec | s/edit"
    rows = [head]
    for m, r in result["results"].items():
        a, o = r["reedited"], r["once"]
        rows.append(
            f"{m:13} | {a['latest_wins']:.3f} / {a['latest_wins_paraphrase']:.3f} / {a['superseded_prob']:.4f} / "
            f"{a['latest_prob']:.4f} / {a['specificity']:.3f} | {o['latest_wins']:.3f} / {o['latest_wins_paraphrase']:.3f} / "
            f"{o['specificity']:.3f} | {r['seconds_per_edit']:.2f}"
        )
    return "\n".join(rows)
