"""``kedit bench mquake``: multi-hop portability on MQuAKE, before and after editing each case's facts.

Per case: its rewrites edited as one batch on the base model, then its multi-hop questions
(``evaluation.metrics.multihop_metrics``) and its single-hop efficacy (each rewrite's own prompt) scored,
then the edit reverted bit for bit before the next case. Before editing, the same questions on the base.
Each method runs in its own process; the JSON is rewritten after each method and a rerun with the same
settings skips the methods already there (the unedited model, scoring only, is scored again).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from kedit.core.facts.formats.mquake import MultiHopCase, load_multihop
from kedit.core.models import KNOWN_MODELS, load_model, pull

from .bench import _corpus_file, each_method_alone, editor_on, machine, resumed, save_json, with_code, worker_pool

log = logging.getLogger(__name__)


def _triples(cases: list[MultiHopCase]) -> list[tuple]:
    return [(c.questions, c.answer, c.new_answer) for c in cases]


def _unedited(model_ref: str, cases: list[MultiHopCase]) -> dict:
    from evaluation.metrics import edit_success, mean, multihop_metrics

    model, tok = load_model(model_ref)
    single = edit_success(model, tok, [r for c in cases for r in c.requests])
    return multihop_metrics(model, tok, _triples(cases)) | {"single_hop_efficacy": mean(single)}


def _run_method(method: str, model_ref: str, cases: list[MultiHopCase], corpus_path: str | None, overrides: dict) -> dict:
    from tqdm import tqdm

    from evaluation.metrics import edit_success, multihop_metrics
    from kedit.store.versions import model_fingerprint

    model, tok, editor, _ = editor_on(model_ref, method, corpus_path, overrides)
    base = model_fingerprint(None, model)
    questions, single = [], []
    t_edit = 0.0
    for case in tqdm(cases, desc=f"{method}: MQuAKE cases", unit="case"):
        t0 = time.perf_counter()
        editor.edit(list(case.requests))
        t_edit += time.perf_counter() - t0
        m = multihop_metrics(model, tok, _triples([case]))
        questions.append((m["multihop"] * m["n_questions"], m["n_questions"], m["multihop_cases"]))
        single.append(edit_success(model, tok, list(case.requests)))
        editor.revert()
    if model_fingerprint(None, model) != base:
        raise RuntimeError("reverting the edits did not restore the base weights")
    n_questions = sum(q[1] for q in questions)
    return {
        "multihop": sum(q[0] for q in questions) / n_questions,
        "multihop_cases": sum(q[2] for q in questions) / len(cases),
        "single_hop_efficacy": float(torch.cat(single).float().mean()),
        "n_questions": n_questions,
        "seconds_per_edit": t_edit / sum(len(c.requests) for c in cases),
    }


def bench_mquake(
    model_ref: str,
    data: Path,
    methods: list[str],
    n: int = 20,
    corpus: Path | None = None,
    overrides: dict[str, dict] | None = None,
    json_out: Path | None = None,
) -> dict:
    """The unedited model and each method on the first ``n`` cases (see the module's docstring); resumes from ``json_out``."""
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    cases = load_multihop(data, n)
    corpus_path = _corpus_file(corpus)
    settings = {"model": model_ref, "data": str(data), "n": len(cases), "corpus": corpus_path or "model samples"}
    settings["overrides"] = overrides or {}
    settings = with_code(settings)
    out = {**settings, "results": resumed(json_out, settings), "machine": machine()}
    with worker_pool() as pool:  # scoring only: cheap to redo
        out["unedited"] = pool.submit(_unedited, model_ref, cases).result()
    save_json(json_out, out)
    return each_method_alone(
        out, methods, _run_method, lambda m: (model_ref, cases, corpus_path, (overrides or {}).get(m, {})), json_out
    )
