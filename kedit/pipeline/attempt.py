"""Step 5 of a stream, per batch: edit, gate, then commit a version or revert; record the attempt."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing import PatchSet
from evaluation.gates import GateReport
from kedit.store.tracking import (
    T_ATTEMPT_RUN,
    T_EDITOR,
    T_KIND,
    T_MANIFEST_SHA,
    T_N_EDITS,
    T_N_FACTS,
    T_N_QUARANTINED,
    T_PARENT_VERSION,
    T_VERDICT,
    T_VERSION,
    VERSION_ARTIFACT,
    metric_tag,
)
from kedit.store.versions import write_version

from . import monitor
from .config import HISTORY_KEYS
from .session import Session, get_session, quarantine_record

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """One batch (or a bisected half of one) tried on the current production version."""

    name: str
    keys: list[str]  # the facts (EditRequest.key) of this batch
    run_id: str
    parent_version: str | None
    before: dict[str, Any]  # each gate's measurement just before the edit (GateSuite.before)
    patches: PatchSet | None = None  # what Editor.edit returned
    seconds: dict[str, float] = field(default_factory=dict)
    recorded: dict | None = None  # what record_attempt returned, once it has


def _batch(session: Session, keys: list[str]) -> list:
    return [session.requests[k] for k in keys]


def apply_edits(session_id: str, keys: list[str], name: str) -> dict:
    """Let the gates measure what they need before the edit, then edit the model in place; returns timings."""
    session = get_session(session_id)
    t0 = time.perf_counter()
    run_id = session.tracker.start_run(
        session.registered,
        name,
        {T_KIND: "attempt", T_PARENT_VERSION: session.production or "", T_VERDICT: "running", T_N_FACTS: str(len(keys))},
        parent_run_id=session.run_id,
    )
    seconds = {"tracking": time.perf_counter() - t0}
    batch = _batch(session, keys)
    t0 = time.perf_counter()
    before = session.gates.before(session.model, session.tokenizer, batch)
    seconds["gate:before"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    patches = session.editor.edit(batch)
    seconds["edit"] = time.perf_counter() - t0
    session.attempt = Attempt(name, list(keys), run_id, session.production, before, patches, seconds)
    return {"edit_s": seconds["edit"], "n": len(keys)}


def revert_edits(session_id: str) -> float:
    """Undo the current attempt's edit: weights, installed modules and editor state bit for bit. Returns seconds."""
    session = get_session(session_id)
    t0 = time.perf_counter()
    session.editor.revert()
    elapsed = time.perf_counter() - t0
    if session.attempt is not None:
        session.attempt.seconds["rollback"] = elapsed
    return elapsed


def gate_edits(session_id: str) -> GateReport:
    """Every gate of the suite on the edited model."""
    session = get_session(session_id)
    attempt = session.attempt
    batch = _batch(session, attempt.keys)
    report = session.gates.measure(session.model, session.tokenizer, batch, session.earlier, attempt.before)
    for gate, seconds in report.seconds.items():
        attempt.seconds[f"gate:{gate}"] = seconds
    return report


def commit_version(session_id: str, report: GateReport) -> str:
    """Store the attempt's patches as a new version of the registered model and move ``production`` to it."""
    session = get_session(session_id)
    attempt = session.attempt
    t0 = time.perf_counter()
    batch = _batch(session, attempt.keys)
    n_edits = session.n_edits + len(batch)
    history = {k: report.metrics[k] for k in HISTORY_KEYS if k in report.metrics and math.isfinite(report.metrics[k])}
    with tempfile.TemporaryDirectory(prefix="kedit-version-") as tmp:
        sha = write_version(
            Path(tmp),
            attempt.patches,
            session.editor.state_dict(),
            batch,
            {
                "registered_model": session.registered,
                "base_model": session.cfg.model,
                "base_fingerprint": session.fingerprint,
                "parent_version": attempt.parent_version,
                "parent_manifest_sha256": session.production_manifest_sha,  # the verified head the edit was made on
                "editor": session.cfg.editor,
                "hparams": session.editor.hparams.model_dump(mode="json"),
                "n_edits": n_edits,
                "stream_run_id": session.run_id,
            },
        )
        tags = {
            T_PARENT_VERSION: attempt.parent_version or "",
            T_MANIFEST_SHA: sha,
            T_N_EDITS: str(n_edits),
            T_EDITOR: session.cfg.editor,
            **{metric_tag(k): f"{v:.6g}" for k, v in history.items()},
        }
        tags[T_ATTEMPT_RUN] = attempt.run_id
        where = f"{VERSION_ARTIFACT}s/{attempt.name}"  # on the stream run, beside its other versions
        version = session.tracker.register_version(session.registered, session.run_id, Path(tmp), tags, where)
        attempt.seconds["version_bytes"] = sum(f.stat().st_size for f in Path(tmp).iterdir())
    session.tracker.set_production(session.registered, version)
    # from here on the version is in production: only bookkeeping follows
    session.editor.commit()
    session.production = version
    session.production_manifest_sha = sha
    session.n_edits = n_edits
    session.earlier += batch
    session.gates.on_accept(report)
    for key in attempt.keys:
        session.accepted[key] = version
    session.history.append({"n_edits": n_edits, **history})
    attempt.seconds["tracking"] += time.perf_counter() - t0
    session.progress.update(len(attempt.keys))
    return version


def record_attempt(session_id: str, report: GateReport, verdict: str, quarantine: bool) -> dict:
    """Log the attempt's metrics, report and verdict; for a rejected single fact (or with bisection off), quarantine it."""
    session = get_session(session_id)
    attempt = session.attempt
    tracker = session.tracker
    t0 = time.perf_counter()
    if attempt.recorded is not None:  # a retried task: the attempt's run is written and closed already
        return attempt.recorded
    reason = report.reason()
    quarantined = []
    if quarantine:
        quarantined = [quarantine_record(session, k, f"failed gates: {reason}", "gates", attempt, report) for k in attempt.keys]
    tracker.log_metrics(attempt.run_id, report.metrics, step=session.n_edits)
    tracker.log_dict(attempt.run_id, report.to_dict(), "gate_report.json")
    batch = {"fact_keys": attempt.keys, "fact_ids": [r.id for r in _batch(session, attempt.keys)]}
    tracker.log_dict(attempt.run_id, {**batch, "parent_version": attempt.parent_version}, "batch.json")
    tracker.log_dict(attempt.run_id, quarantined, "quarantine.json")
    tags = {T_VERDICT: verdict, T_N_QUARANTINED: str(len(quarantined))}
    monitor.note_limits(session, report)
    rejected = None
    if verdict == "accepted":
        tags[T_VERSION] = session.production
        monitor.log_accepted(session, report, {"n_edits": session.n_edits, "facts_accepted": len(session.accepted)})
    else:
        rejected = monitor.rejected_point(session, len(attempt.keys), attempt.name, report)
    tracker.set_tags(attempt.run_id, tags)
    tracker.rename_run(attempt.run_id, run_label(attempt.name, verdict, session.production, quarantine))
    # the runs table shows a red cross for FAILED: a batch the gates rejected stands out from the accepted ones
    tracker.end_run(attempt.run_id, "FINISHED" if verdict == "accepted" else "FAILED")
    session.quarantined += quarantined  # only now: a failure above leaves the session as it was
    if rejected is not None:
        session.rejected.append(rejected)  # drawn with the next version, or when the stream ends
    else:
        monitor.plot_drawdown(session)
    attempt.seconds["tracking"] += time.perf_counter() - t0
    session.steps.append({"attempt": attempt.name, "n": len(attempt.keys), "keys": list(attempt.keys), "verdict": verdict})
    session.steps[-1].update(attempt.seconds)
    if quarantine:
        session.progress.update(len(attempt.keys))
    detail = "" if verdict == "accepted" else f" — {reason}"
    log.info("%s (%d facts): %s%s", attempt.name, len(attempt.keys), verdict, detail)
    attempt.recorded = {"verdict": verdict, "quarantined": len(quarantined)}
    return attempt.recorded


def run_label(name: str, verdict: str, version: str | None, quarantined: bool) -> str:
    """The attempt run's name with its verdict, as the runs table lists it."""
    if verdict == "accepted":
        return f"accepted {name} → v{version}"
    # the verdict first: the runs table cuts long names, and a rejection must stay visible
    return f"REJECTED {name} ({'quarantined' if quarantined else 'bisected'})"


def note_wall(session_id: str, seconds: float) -> None:
    """The flow's wall time for the last attempt (edit to recorded verdict), for the orchestration overhead."""
    session = get_session(session_id)
    if session.steps:
        session.steps[-1]["wall"] = seconds
