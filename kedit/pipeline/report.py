"""What a stream reports when it ends: the closing summary, in which every fact of the feeds is accounted
for, the links that open it in the MLflow UI, and the feed ledger (the series and drawdown.png: ``monitor``)."""

from __future__ import annotations

import json
from pathlib import Path

from kedit.store.tracking import FEED_HELD_BACK, T_VERDICT, T_VERSION, feed_settled

from . import monitor
from .config import StreamError
from .plan import Plan
from .session import Session, get_session


def summarize(session: Session, plan: Plan) -> dict:
    """Where every fact ended; raises if one ended nowhere."""
    did_not_hold = [q for q in session.quarantined if q["gate"] == "held"]
    quarantined = [q for q in session.quarantined if q["gate"] != "held"]
    summary = {
        "registered_model": session.registered,
        "production": session.production,
        "n_edits": session.n_edits,
        "records": plan.n_records,
        "accepted": len(session.accepted),  # facts whose own edit holds: what the model now states
        "did_not_hold": len(did_not_hold),  # in an accepted version, but the model does not state them
        "quarantined": plan.n_invalid + len(quarantined),
        "quarantined_invalid": plan.n_invalid,
        "quarantined_gates": len([q for q in quarantined if q["gate"] == "gates"]),
        "quarantined_editor": len([q for q in quarantined if q["gate"] == "editor"]),
        "quarantined_noop": len([q for q in quarantined if q["gate"] == "noop"]),
        "superseded": plan.n_superseded,
        "skipped": len(session.skipped),
        "held_back": len(session.held_back),  # a spent budget stopped the stream before they could be tried
        "stopped": session.stopped,
        "reedits": {k: e.to_dict() for k, e in session.reedits.items() if k in session.accepted},
        "target_true_from_model": len(session.filled),
        "seconds": session.seconds,
        "steps": session.steps,
        "run_id": session.run_id,
    }
    unaccounted = set(plan.fact_keys) - ended(session)
    if unaccounted:
        raise StreamError(f"{len(unaccounted)} fact(s) ended nowhere: {sorted(unaccounted)[:5]}")
    return summary


def finish_stream(session_id: str, plan: Plan) -> dict:
    """Account for every fact, write the lists, record each new feed in the ledger and close the stream's run."""
    session = get_session(session_id)
    tracker = session.tracker
    hold_back_the_rest(session, plan)
    if session.progress is not None:
        session.progress.close()
    work = Path(plan.path).parent
    summary = summarize(session, plan)
    # what steps only sampled (retention on a long chain, a sampled capability gate), checked in full on production
    summary["final_checks"] = session.gates.on_end(session.model, session.tokenizer, session.earlier)
    (work / "stream_quarantine.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in session.quarantined))
    (work / "accepted.json").write_text(json.dumps(session.accepted, indent=2))
    # a feed of its own (the reason is the summary's "stopped"): `kedit stream --feed work/held_back.jsonl` retries them
    held = [session.requests[k].to_dict() for k in session.held_back]
    (work / "held_back.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held))
    tracker.log_dict(session.run_id, session.quarantined, "quarantine_gates.json")
    tracker.log_dict(session.run_id, session.accepted, "accepted.json")
    tracker.log_dict(session.run_id, summary, "summary.json")
    _record_feeds(session, plan, work)
    summary["feeds"] = plan.feeds
    totals = {k: summary[k] for k in ("accepted", "did_not_hold", "quarantined", "superseded", "skipped", "held_back")}
    totals["n_edits"] = session.n_edits
    totals |= summary["final_checks"]
    monitor.log_point(session, session.n_edits, {k: float(v) for k, v in totals.items()})
    if session.rejected:  # the picture holds every rejection, also those after the last version
        monitor.plot_drawdown(session)
    summary["links"] = tracker.ui_links(session.registered, session.run_id)
    tracker.set_tags(session.run_id, {T_VERSION: session.production or "", T_VERDICT: "finished"})
    tracker.end_run(session.run_id)
    return summary


def ended(session: Session) -> set[str]:
    """The facts (keys) this stream has settled: accepted, quarantined (did not hold included), held back, skipped."""
    return set(session.accepted) | {q["key"] for q in session.quarantined} | set(session.held_back) | set(session.skipped)


def hold_back_the_rest(session: Session, plan: Plan) -> None:
    """A stopped stream holds back every fact it had not settled when it stopped, with the stop's reason."""
    if not session.stopped:
        return
    done = ended(session)
    rest = [k for k in plan.fact_keys if k not in done]
    session.held_back |= dict.fromkeys(rest, session.stopped)
    if session.progress is not None:
        session.progress.update(len(rest))


def _record_feeds(session: Session, plan: Plan, work: Path) -> None:
    """One ledger entry per feed this stream saw first: processed, or invalid when nothing of it could be used."""
    invalid_records = _read_jsonl(work / "quarantine.jsonl")  # at most Limits.quarantine_rows per feed
    counts_file = work / "quarantine_counts.json"
    omitted = json.loads(counts_file.read_text()).get("quarantined_rows_omitted", {}) if counts_file.is_file() else {}
    for feed, counts in plan.feeds.items():
        sha = plan.feed_sha256.get(feed) or f"unreadable:{feed}"
        if feed_settled(session.ledger.get(sha)):
            continue
        unusable = counts["records"] and not counts["accepted"] + counts["superseded"]
        held_back = [k for k in session.held_back if plan.fact_feed.get(k) == feed]
        status = "invalid" if counts["error"] or unusable else FEED_HELD_BACK if held_back else "processed"
        quarantine = [q for q in invalid_records if q.get("file") == feed]
        quarantine += [q for q in session.quarantined if plan.fact_feed.get(q["key"]) == feed]
        totals = {k: v for k, v in counts.items() if k != "error"} | {"quarantine_rows_omitted": omitted.get(feed, 0)}
        totals["held_back"] = len(held_back)
        session.tracker.record_feed(session.registered, session.run_id, feed, sha, status, totals, quarantine)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
