"""What a stream reports: the drawdown plot after each accepted version, and the closing summary,
in which every fact of the feeds is accounted for, and the feed ledger."""

from __future__ import annotations

import json
from pathlib import Path

from kedit.store.tracking import T_VERDICT, T_VERSION

from .config import StreamError
from .plan import Plan
from .session import Session, get_session


def plot_drawdown(session: Session) -> None:
    """drawdown.png on the stream run: drawdown and retention over the model's edit count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in session.history if "n_edits" in p]

    def series(key: str) -> tuple[list[float], list[float]]:
        kept = [p for p in points if key in p]
        return [p["n_edits"] for p in kept], [p[key] for p in kept]

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, label in (("drawdown_base", "drawdown vs base"), ("drawdown_prev", "drawdown vs previous version")):
        ax.plot(*series(key), marker="o", label=label)
    ax.set_xlabel("edits applied to the model")
    ax.set_ylabel("fraction of known facts lost")
    ax2 = ax.twinx()
    ax2.plot(*series("retention"), color="grey", linestyle="--", label="retention")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("retention of earlier edits")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{session.registered}: knowledge drawdown over edits")
    fig.tight_layout()
    session.tracker.log_figure(session.run_id, fig, "drawdown.png")
    plt.close(fig)


def summarize(session: Session, plan: Plan) -> dict:
    """Where every fact ended; raises if one ended nowhere."""
    quarantined = session.quarantined
    summary = {
        "registered_model": session.registered,
        "production": session.production,
        "n_edits": session.n_edits,
        "records": plan.n_records,
        "accepted": len(session.accepted),
        "quarantined": plan.n_invalid + len(quarantined),
        "quarantined_invalid": plan.n_invalid,
        "quarantined_gates": len([q for q in quarantined if q["gate"] == "gates"]),
        "quarantined_editor": len([q for q in quarantined if q["gate"] == "editor"]),
        "superseded": plan.n_superseded,
        "skipped": len(session.skipped),
        "steps": session.steps,
        "run_id": session.run_id,
    }
    unaccounted = set(plan.fact_keys) - set(session.accepted) - {q["key"] for q in quarantined} - set(session.skipped)
    if unaccounted:
        raise StreamError(f"{len(unaccounted)} fact(s) ended nowhere: {sorted(unaccounted)[:5]}")
    return summary


def finish_stream(session_id: str, plan: Plan) -> dict:
    """Account for every fact, write the lists, record each new feed in the ledger and close the stream's run."""
    session = get_session(session_id)
    tracker = session.tracker
    if session.progress is not None:
        session.progress.close()
    work = Path(plan.path).parent
    summary = summarize(session, plan)
    (work / "stream_quarantine.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in session.quarantined))
    (work / "accepted.json").write_text(json.dumps(session.accepted, indent=2))
    tracker.log_dict(session.run_id, session.quarantined, "quarantine_gates.json")
    tracker.log_dict(session.run_id, session.accepted, "accepted.json")
    tracker.log_dict(session.run_id, summary, "summary.json")
    _record_feeds(session, plan, work)
    summary["feeds"] = plan.feeds
    totals = {k: summary[k] for k in ("accepted", "quarantined", "superseded", "skipped")} | {"n_edits": session.n_edits}
    tracker.log_metrics(session.run_id, totals, step=session.n_edits)
    tracker.set_tags(session.run_id, {T_VERSION: session.production or "", T_VERDICT: "finished"})
    tracker.end_run(session.run_id)
    return summary


def _record_feeds(session: Session, plan: Plan, work: Path) -> None:
    """One ledger entry per feed this stream saw first: processed, or invalid when nothing of it could be used."""
    invalid_records = _read_jsonl(work / "quarantine.jsonl")  # at most Limits.quarantine_rows per feed
    counts_file = work / "quarantine_counts.json"
    omitted = json.loads(counts_file.read_text()).get("quarantined_rows_omitted", {}) if counts_file.is_file() else {}
    for feed, counts in plan.feeds.items():
        sha = plan.feed_sha256.get(feed) or f"unreadable:{feed}"
        if sha in session.ledger:
            continue
        unusable = counts["records"] and not counts["accepted"] + counts["superseded"]
        status = "invalid" if counts["error"] or unusable else "processed"
        quarantine = [q for q in invalid_records if q.get("file") == feed]
        quarantine += [q for q in session.quarantined if plan.fact_feed.get(q["key"]) == feed]
        totals = {k: v for k, v in counts.items() if k != "error"} | {"quarantine_rows_omitted": omitted.get(feed, 0)}
        session.tracker.record_feed(session.registered, session.run_id, feed, sha, status, totals, quarantine)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
