"""Step 5 of a stream, per batch: edit, gate, then commit a version or revert; record the attempt."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing import PatchSet
from evaluation.gates import GateReport
from kedit.core.facts.reedit import Held
from kedit.store.tracking import (
    T_ATTEMPT_RUN,
    T_EDITOR,
    T_EDITOR_ASSETS,
    T_HELD_BACK,
    T_KIND,
    T_MANIFEST_SHA,
    T_N_EDITS,
    T_N_FACTS,
    T_N_NOT_HELD,
    T_N_QUARANTINED,
    T_PARENT_VERSION,
    T_SUPERSEDES,
    T_VERDICT,
    T_VERSION,
    VERSION_ARTIFACT,
    metric_tag,
)
from kedit.store.versions import NOT_HOLDING, SUPERSEDES, write_version

from . import federation, monitor
from .config import HISTORY_KEYS
from .session import Session, get_session, quarantine_record

log = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"  # in the stream's work dir: one line of timings per attempt, appended as it ends


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
    shared = federation.metrics(session, federation.hold(session, run_id))
    if shared:  # a federated client: reused, offered and refused vectors on the attempt's run
        session.tracker.log_metrics(run_id, shared, step=session.n_edits)
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
    report = session.gates.measure(session.model, session.tokenizer, batch, _still_meant(session, batch), attempt.before)
    for gate, seconds in report.seconds.items():
        attempt.seconds[f"gate:{gate}"] = seconds
    return report


def _still_meant(session: Session, batch: list) -> list:
    """The chain's live facts less those the batch updates: a re-edit's old value is meant to stop holding."""
    slots = {r.slot for r in batch}
    return [held.request for slot, held in session.live.items() if slot not in slots]


def verdict_of(report: GateReport, retry: bool) -> str:
    """accepted; rolled_back (the gates failed); did_not_hold (a fact retried alone whose edit still does not hold)."""
    if retry and not (report.passed and not report.not_held):
        return "did_not_hold"
    return "accepted" if report.passed else "rolled_back"


def commit_version(session_id: str, report: GateReport) -> str:
    """Store the attempt's patches as a new version of the registered model and move ``production`` to it."""
    session = get_session(session_id)
    attempt = session.attempt
    t0 = time.perf_counter()
    batch = _batch(session, attempt.keys)
    n_edits = session.n_edits + len(batch)
    not_holding = report.not_held
    held = [r for r in batch if r.key not in not_holding]
    supersedes = [session.reedits[r.key].to_dict() for r in held if r.key in session.reedits]
    history = {k: report.metrics[k] for k in HISTORY_KEYS if k in report.metrics and math.isfinite(report.metrics[k])}
    with tempfile.TemporaryDirectory(prefix="kedit-version-") as tmp:
        sha = write_version(
            Path(tmp),
            attempt.patches,
            session.editor.version_state(),
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
                NOT_HOLDING: not_holding,
                SUPERSEDES: supersedes,
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
        if session.editor.provenance():  # a trained network's name, version and sha256
            tags[T_EDITOR_ASSETS] = json.dumps(session.editor.provenance(), sort_keys=True)
        if supersedes:
            tags[T_SUPERSEDES] = _versions_named(supersedes)
        where = f"{VERSION_ARTIFACT}s/{attempt.name}"  # on the stream run, beside its other versions
        version = session.tracker.register_version(session.registered, session.run_id, Path(tmp), tags, where)
        attempt.seconds["version_bytes"] = sum(f.stat().st_size for f in Path(tmp).iterdir())
    session.tracker.set_production(session.registered, version)
    # from here on the version is in production: only bookkeeping follows (a kill before the upload is
    # made good by the next start's publish)
    federation.publish(session, {version})
    session.editor.commit()
    session.production = version
    session.production_manifest_sha = sha
    session.n_edits = n_edits
    # the facts that hold become live (a re-edit replaces its slot's old value); the others await their retry
    session.live.update({r.slot: Held(r, version) for r in held})
    session.gates.on_accept(report)
    for r in held:
        session.accepted[r.key] = version
        session.not_held.pop(r.key, None)
    for key in not_holding:
        session.not_held[key] = {"version": version, "attempt": attempt.name, **report.facts[key]}
    session.history.append({"n_edits": n_edits, **history})
    attempt.seconds["tracking"] += time.perf_counter() - t0
    session.progress.update(len(held))
    return version


def _versions_named(supersedes: list[dict]) -> str:
    return ",".join(sorted({f"v{e['supersedes_version']}" for e in supersedes if e["supersedes_version"]}))


def record_attempt(session_id: str, report: GateReport, verdict: str, quarantine: bool) -> dict:
    """Log the attempt's metrics, report and verdict; for a rejected single fact (or with bisection off), quarantine it."""
    session = get_session(session_id)
    attempt = session.attempt
    tracker = session.tracker
    t0 = time.perf_counter()
    if attempt.recorded is not None:  # a retried task: the attempt's run is written and closed already
        return attempt.recorded
    reason = report.reason()
    if verdict != "accepted":  # (not at revert: a crash after the version is in production reverts the task too)
        federation.drop(session, attempt.run_id)
    quarantined = []
    stopped = session.gates.budget_spent(report) if quarantine else None
    if verdict == "did_not_hold":
        quarantined = [did_not_hold_record(session, k, attempt, report) for k in attempt.keys]
    elif stopped:  # not these facts' fault: held back for a stream with more budget, like every fact after them
        reason = stopped
    elif quarantine:
        quarantined = [quarantine_record(session, k, f"failed gates: {reason}", "gates", attempt, report) for k in attempt.keys]
    retry: list[str] = []
    if verdict == "accepted":
        # a fact whose own edit does not hold is retried once alone; one that was alone already gets its verdict now
        retry = report.not_held if len(attempt.keys) > 1 else []
        if len(attempt.keys) == 1 and report.not_held:
            quarantined = [did_not_hold_record(session, k, attempt, report) for k in report.not_held]
    tracker.log_metrics(attempt.run_id, report.metrics, step=session.n_edits)
    tracker.log_dict(attempt.run_id, report.to_dict(), "gate_report.json")
    batch = {"fact_keys": attempt.keys, "fact_ids": [r.id for r in _batch(session, attempt.keys)]}
    tracker.log_dict(attempt.run_id, {**batch, "parent_version": attempt.parent_version}, "batch.json")
    tracker.log_dict(attempt.run_id, quarantined, "quarantine.json")
    tracker.log_dict(attempt.run_id, _facts_table(session, attempt.keys, report), "facts.json")
    tags = {T_VERDICT: verdict, T_N_QUARANTINED: str(len(quarantined)), T_N_NOT_HELD: str(len(report.not_held))}
    reedits = [session.reedits[k].to_dict() for k in attempt.keys if k in session.reedits]
    if reedits:
        tracker.log_dict(attempt.run_id, reedits, "reedits.json")
        tags[T_SUPERSEDES] = _versions_named(reedits)
    monitor.note_limits(session, report)
    rejected = None
    if verdict == "accepted":
        tags[T_VERSION] = session.production
        monitor.log_accepted(session, report, {"n_edits": session.n_edits, "facts_accepted": len(session.accepted)})
    else:
        rejected = monitor.rejected_point(session, len(attempt.keys), attempt.name, report)
    if stopped:
        tags[T_HELD_BACK] = str(len(attempt.keys))
    tracker.set_tags(attempt.run_id, tags)
    tracker.rename_run(attempt.run_id, run_label(attempt.name, verdict, session.production, quarantine, bool(stopped)))
    # the runs table shows a red cross for FAILED: a batch the gates rejected stands out from the accepted ones
    tracker.end_run(attempt.run_id, "FINISHED" if verdict == "accepted" else "FAILED")
    session.quarantined += quarantined  # only now: a failure above leaves the session as it was
    if stopped:
        session.stopped = stopped
        session.held_back |= dict.fromkeys(attempt.keys, stopped)
    if rejected is not None:
        session.rejected.append(rejected)  # drawn with the next version, or when the stream ends
    else:
        monitor.plot_drawdown(session)
    attempt.seconds["tracking"] += time.perf_counter() - t0
    session.steps.append({"attempt": attempt.name, "n": len(attempt.keys), "keys": list(attempt.keys), "verdict": verdict})
    session.steps[-1].update(attempt.seconds)
    if quarantined:
        session.progress.update(len(quarantined))
    detail = "" if verdict == "accepted" else f" — {reason}"
    if retry:
        detail += f"; {len(retry)} fact(s) did not hold and are retried alone"
    if stopped:
        detail += "; the stream stops and holds back the facts not yet accepted"
    log.info("%s (%d facts): %s%s", attempt.name, len(attempt.keys), verdict, detail)
    attempt.recorded = {"verdict": verdict, "quarantined": len(quarantined), "retry": retry, "stopped": stopped}
    return attempt.recorded


def did_not_hold_record(session: Session, key: str, attempt: Attempt, report: GateReport) -> dict:
    """A fact whose own edit does not hold: after its batch was accepted and once more alone (or alone already)."""
    now = report.facts.get(key, {})
    first = session.not_held.pop(key, None) or {"version": session.production, "attempt": attempt.name, **now}
    reason = (
        f"did not hold: P(new) {first['p_new']:.3g} vs P(old) {_p(first['p_old'])} after {first['attempt']} (v{first['version']})"
    )
    if first["attempt"] != attempt.name:
        reason += f"; retried alone: P(new) {now.get('p_new', float('nan')):.3g} vs P(old) {_p(now.get('p_old'))}"
    record = quarantine_record(session, key, reason, "held", attempt, report)
    return record | {
        "verdict": "did_not_hold",
        "after_batch": first,
        "retried": now if first["attempt"] != attempt.name else None,
    }


def _p(p: float | None) -> str:
    return "n/a (no old answer)" if p is None else f"{p:.3g}"


def _facts_table(session: Session, keys: list[str], report: GateReport) -> list[dict]:
    """Per fact of the attempt: id, values, whether its edit holds and its probabilities; re-edits and filled old values."""
    rows = []
    for k in keys:
        r = session.requests[k]
        row = {"key": k, "id": r.id, "prompt": r.text, "target_new": r.target_new, "target_true": r.target_true}
        if k in session.filled:
            row["target_true_from"] = "model"
        if k in session.reedits:
            row["target_true_from"] = f"v{session.reedits[k].supersedes.version}"
        rows.append(row | report.facts.get(k, {}))
    return rows


def run_label(name: str, verdict: str, version: str | None, quarantined: bool, stopped: bool = False) -> str:
    """The attempt run's name with its verdict, as the runs table lists it."""
    if verdict == "accepted":
        return f"accepted {name} → v{version}"
    if verdict == "did_not_hold":
        return f"DID NOT HOLD {name} (retried alone)"
    # the verdict first: the runs table cuts long names, and a rejection must stay visible
    outcome = "budget spent: stream stopped" if stopped else "quarantined" if quarantined else "bisected"
    return f"REJECTED {name} ({outcome})"


def note_wall(session_id: str, seconds: float) -> None:
    """The flow's wall time for the last attempt (edit to recorded verdict), for the orchestration overhead."""
    session = get_session(session_id)
    if session.steps:
        session.steps[-1]["wall"] = seconds
        # appended as the stream goes: a long stream stopped and resumed keeps every part's timings
        with (Path(session.cfg.work_dir) / STEPS_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(session.steps[-1]) + "\n")
