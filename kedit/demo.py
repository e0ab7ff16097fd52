"""``kedit demo``: the embedded default model against the project's feed of real-world fact updates."""

from __future__ import annotations

import logging
from pathlib import Path

from evaluation.metrics import build_retain_set, counterfact_metrics, fluency, scores_table
from evaluation.scoring import score_targets

from .facts import load_facts, load_known_facts
from .models import DEFAULT_MODEL, KNOWN_MODELS, load_model, pull
from .paths import project_data_dir

log = logging.getLogger(__name__)

FLUENCY_PROMPTS = [
    "The history of the city begins",
    "My favourite thing about the weekend is",
    "Scientists have recently discovered that",
    "The football season ended with",
]


def run_demo(model_ref: str = DEFAULT_MODEL, feed: Path | None = None, out_dir: Path = Path("out/demo")) -> dict:
    """Validate the demo feed, then score the unedited model on it: what the stream will have to fix."""
    data = project_data_dir()
    feed = feed or data / "demo_feed.jsonl"
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    facts = load_facts(feed)
    quarantine = facts.write_quarantine(out_dir)
    log.info("feed %s: %s", feed, facts.summary())
    for q in facts.quarantined:
        log.info("  quarantined %s", q)
    for s in facts.superseded:
        log.info("  superseded  %s (by %s)", s.request.id, s.by)
    log.info("quarantine and supersession lists: %s", quarantine.parent)

    model, tok = load_model(model_ref)
    reqs = facts.accepted
    s = score_targets(model, tok, [r.text for r in reqs] * 2, [r.target_new for r in reqs] + [r.target_true or "" for r in reqs])
    p_new, p_old = s.prob[: len(reqs)], s.prob[len(reqs) :]
    rows = {f"{r.id}": {"P(new)": float(a), "P(old)": float(b)} for r, a, b in zip(reqs, p_new.tolist(), p_old.tolist())}
    print("\nWhat the unedited model believes, per accepted update (per-token probability):")
    print(scores_table(rows))
    stale = int((p_old > p_new).sum())
    print(f"\nThe model prefers the outdated answer for {stale} of {len(reqs)} facts.")

    candidates = load_known_facts(data / "retain_facts.jsonl")
    retain = build_retain_set(model, tok, candidates)
    metrics = counterfact_metrics(model, tok, reqs)
    metrics["retain_set_known"] = len(retain) / len(candidates)
    metrics["fluency"] = fluency(model, tok, FLUENCY_PROMPTS)
    print("\nUnedited model on the demo feed (CounterFact protocol) and capability baselines:")
    print(scores_table({model_ref: metrics}))
    print(
        f"\n{len(retain)} of {len(candidates)} retain facts are known to the model: knowledge drawdown "
        "is measured on those after each edit."
    )
    return {"summary": facts.summary(), "metrics": metrics, "stale": stale, "retain": len(retain)}
