"""The continual-editing flow: validate → open → (model lock) restore production → per batch: edit, gate, commit or roll back.

Each task calls one library function of ``kedit.pipeline`` and passes fact keys, paths, configs, metrics
and typed gate reports; the model stays in the pipeline's session. No task caches its result
(``NO_CACHE``): an edit must run every time it is asked for, and never twice because of a retry;
only ``finish``, whose writes are safe to repeat (files rewritten, ledger keyed by feed hash), is retried.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import transaction

from evaluation.gates import GateReport
from kedit.pipeline import attempt as attempts
from kedit.pipeline import report, session
from kedit.pipeline.config import StreamConfig
from kedit.pipeline.plan import Plan, make_plan

from .locks import one_stream_per_model

EDIT = {"cache_policy": NO_CACHE, "persist_result": False, "retries": 0}
TRACK = {"cache_policy": NO_CACHE, "persist_result": False, "retries": 2, "retry_delay_seconds": 1}


@task(name="validate-feeds", **EDIT)
def validate_feeds(cfg: StreamConfig, work_dir: str) -> Plan:
    return make_plan(cfg, Path(work_dir))


@task(name="load-model", **EDIT)
def load_model(cfg: StreamConfig) -> session.Opened:
    return session.open_session(cfg)


@task(name="restore-production", **EDIT)
def restore_production(session_id: str) -> dict:
    return session.restore_production(session_id)


@task(name="start-tracking", **EDIT)  # it also fills the session's skip and quarantine lists: never twice
def start_tracking(session_id: str, plan: Plan) -> list[list[str]]:
    return session.start_stream(session_id, plan)


@task(name="apply-edits", **EDIT)
def apply_edits(session_id: str, keys: list[str], name: str) -> dict:
    return attempts.apply_edits(session_id, keys, name)


@apply_edits.on_rollback
def _revert(txn) -> None:
    attempts.revert_edits(txn.get("session_id"))


@task(name="gate-edits", **EDIT)
def gate_edits(session_id: str) -> GateReport:
    return attempts.gate_edits(session_id)


@task(name="commit-version", **EDIT)
def commit_version(session_id: str, gate_report: GateReport) -> str:
    return attempts.commit_version(session_id, gate_report)


@task(name="record-attempt", **EDIT)  # it also quarantines facts in the session: never twice
def record_attempt(session_id: str, gate_report: GateReport, verdict: str, quarantine: bool) -> dict:
    return attempts.record_attempt(session_id, gate_report, verdict, quarantine)


@task(name="finish", **TRACK)
def finish(session_id: str, plan: Plan) -> dict:
    return report.finish_stream(session_id, plan)


def attempt(session_id: str, keys: list[str], name: str, bisect: bool, retry: bool = False) -> bool:
    """One transaction: edit, gate, then commit a version or roll back; a failing batch is bisected, and a
    fact of an accepted batch whose own edit did not hold is retried once alone. True when a spent budget
    stops the stream (``finish`` holds back what is left)."""
    t0 = time.perf_counter()
    with transaction() as txn:
        txn.set("session_id", session_id)
        apply_edits(session_id, keys, name)
        gate_report = gate_edits(session_id)
        verdict = attempts.verdict_of(gate_report, retry)
        if verdict == "accepted":
            commit_version(session_id, gate_report)
        else:
            txn.rollback()
    isolate = verdict == "rolled_back" and bisect and len(keys) > 1
    recorded = record_attempt(session_id, gate_report, verdict, quarantine=verdict == "rolled_back" and not isolate)
    attempts.note_wall(session_id, time.perf_counter() - t0)
    if recorded["stopped"]:
        return True
    if isolate:
        half = len(keys) // 2
        return attempt(session_id, keys[:half], f"{name}.1", bisect) or attempt(session_id, keys[half:], f"{name}.2", bisect)
    retries = enumerate(recorded["retry"])
    return any(attempt(session_id, [key], f"{name}.retry-{i + 1}", bisect=False, retry=True) for i, key in retries)


@flow(name="kedit-stream", log_prints=False)
def stream(cfg: StreamConfig) -> dict:
    plan = validate_feeds(cfg, cfg.work_dir)
    opened = load_model(cfg)
    try:
        with one_stream_per_model(opened.registered, opened.store):
            restore_production(opened.session_id)
            batches = start_tracking(opened.session_id, plan)
            for i, keys in enumerate(batches):
                if attempt(opened.session_id, keys, f"batch-{i:03d}", opened.bisect):
                    break  # a budget against the base is spent
            return finish(opened.session_id, plan)
    finally:
        session.close_session(opened.session_id)
