"""``kedit demo``: the embedded default model against the project's feed of real-world fact updates."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from evaluation.metrics import scores_table
from kedit.core.facts import load_facts
from kedit.core.lm import score_targets
from kedit.core.models import DEFAULT_MODEL, KNOWN_MODELS, load_model, pull
from kedit.core.paths import default_corpus, project_data_dir

log = logging.getLogger(__name__)


def run_demo(
    model_ref: str = DEFAULT_MODEL,
    feed: Path | None = None,
    out_dir: Path = Path("out/demo"),
    editor: str | None = None,
    batch_size: int = 4,
    tracking_uri: str | None = None,
    corpus: Path | None = None,
    gates: Path | None = None,
) -> dict:
    """Validate the demo feed, show what the unedited model believes, then run the gated stream and show the result."""
    from flows.stream import stream
    from kedit.pipeline.config import StreamConfig
    from kedit.store.tracking import resolve_uri

    data = project_data_dir()
    feed = feed or data / "demo_feed.jsonl"
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    facts = load_facts(feed)
    log.info("feed %s: %s", feed, facts.summary())
    for q in facts.quarantined:
        log.info("  quarantined %s", q)
    for s in facts.superseded:
        log.info("  superseded  %s (by %s)", s.request.id, s.by)

    model, tok = load_model(model_ref)
    reqs = facts.accepted
    before = _beliefs(model, tok, reqs)
    print("\nWhat the unedited model believes, per accepted update (per-token probability):")
    print(scores_table(before))
    del model

    corpus = corpus or default_corpus()
    log.info("key statistics from %s", corpus or "text sampled from the model")
    cfg = StreamConfig(
        feeds=(str(feed),),
        model=model_ref,
        editor=editor,
        batch_size=batch_size,
        tracking_uri=tracking_uri,
        corpus=str(corpus) if corpus else None,
        work_dir=str(out_dir),
        gates=str(gates or data / "gates" / "demo.yaml"),
    )
    summary = stream(cfg)

    model, tok = load_model(model_ref)
    from kedit.store.tracking import Tracker
    from kedit.store.versions import rebuild

    tracker = Tracker(tracking_uri)
    rebuild(model, tracker, summary["registered_model"], summary["production"], None)
    after = _beliefs(model, tok, reqs)
    rows = {
        k: {"before P(new)": before[k]["P(new)"], "after P(new)": after[k]["P(new)"], "after P(old)": after[k]["P(old)"]}
        for k in before
    }
    print(f"\nAfter the stream (production v{summary['production']} of {summary['registered_model']}):")
    print(scores_table(rows))
    print(
        f"\n{summary['records']} records: {summary['accepted']} accepted (the model now states them), "
        f"{summary['did_not_hold']} did not hold, {summary['quarantined']} quarantined, "
        f"{summary['superseded']} superseded, {summary['skipped']} already applied before this run."
    )
    if summary["stopped"]:
        print(f"{summary['held_back']} held back: the stream stopped, {summary['stopped']}")
    quarantine = Path(out_dir) / "stream_quarantine.jsonl"
    for line in quarantine.read_text().splitlines():
        rec = json.loads(line)
        what = "did not hold" if rec["gate"] == "held" else "quarantined by the gates"
        print(f"  {what}: {rec['id']}: {rec['reason']}")
    uri = resolve_uri(tracking_uri)
    links = summary["links"]
    print(
        f"\nTracking store: {uri}. Serve it with `kedit up` (or `mlflow ui --backend-store-uri {uri} --port 5000`), then open:\n"
        f"  the runs table (a rejected batch shows a red cross and REJECTED in its name): {links['runs']}\n"
        f"  this stream's charts (drawdown, retention and the gates' limits from 0 edits; rejected.*: the rejected attempts;\n"
        f"    drawdown.png under Artifacts): {links['stream']}\n"
        f"  the registered model, its versions and the alias 'production': {links['model']}\n"
        f"In the terminal: kedit status"
    )
    return summary


def _beliefs(model, tok, reqs) -> dict[str, dict[str, float]]:
    s = score_targets(model, tok, [r.text for r in reqs] * 2, [r.target_new for r in reqs] + [r.target_true or "" for r in reqs])
    n = len(reqs)
    return {r.id: {"P(new)": float(s.prob[i]), "P(old)": float(s.prob[n + i])} for i, r in enumerate(reqs)}
