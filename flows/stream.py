"""The continual-editing flow: validate → open → (model slot) restore production → per batch: edit, gate, commit or roll back.

Tasks pass ids, paths, configs, metrics and gate reports (a typed ``GateReport``); the model
stays in the process's StreamSession (``kedit.stream``). No task caches its result (``NO_CACHE``):
an edit must run every time it is asked for, and never twice because of a retry: only tracking
writes are retried.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import transaction

from evaluation.gates import GateReport
from kedit.pipeline import stream as lib

from .locks import one_stream_per_model

EDIT = {"cache_policy": NO_CACHE, "persist_result": False, "retries": 0}
TRACK = {"cache_policy": NO_CACHE, "persist_result": False, "retries": 2, "retry_delay_seconds": 1}


@task(name="validate-feeds", **EDIT)
def validate_feeds(cfg: lib.StreamConfig, work_dir: str) -> lib.Plan:
    return lib.plan_stream(cfg, Path(work_dir))


@task(name="load-model", **EDIT)
def load_model(cfg: lib.StreamConfig) -> str:
    return lib.open_session(cfg)


@task(name="restore-production", **EDIT)
def restore_production(session_id: str) -> dict:
    return lib.restore_production(session_id)


@task(name="start-tracking", **TRACK)
def start_tracking(session_id: str, plan: lib.Plan) -> list[list[str]]:
    return lib.start_stream(session_id, plan)


@task(name="apply-edits", **EDIT)
def apply_edits(session_id: str, ids: list[str], attempt: str) -> dict:
    return lib.apply_edits(session_id, ids, attempt)


@apply_edits.on_rollback
def _revert(txn) -> None:
    lib.revert_edits(txn.get("session_id"))


@task(name="check-gates", **EDIT)
def check_gates(session_id: str) -> GateReport:
    return lib.check_gates(session_id)


@task(name="commit-version", **EDIT)
def commit_version(session_id: str, report: GateReport) -> str:
    return lib.commit_version(session_id, report)


@task(name="record-attempt", **TRACK)
def record_attempt(session_id: str, report: GateReport, verdict: str, quarantine: bool) -> dict:
    return lib.record_attempt(session_id, report, verdict, quarantine)


@task(name="finish", **TRACK)
def finish(session_id: str, plan: lib.Plan) -> dict:
    return lib.finish_stream(session_id, plan)


def attempt(session_id: str, ids: list[str], name: str, bisect: bool) -> None:
    """One transaction: edit, gate, then commit a version or roll back; a failing batch is bisected."""
    t0 = time.perf_counter()
    with transaction() as txn:
        txn.set("session_id", session_id)
        apply_edits(session_id, ids, name)
        report = check_gates(session_id)
        if report.passed:
            commit_version(session_id, report)
        else:
            txn.rollback()
    isolate = not report.passed and bisect and len(ids) > 1
    verdict = "accepted" if report.passed else "rolled_back"
    record_attempt(session_id, report, verdict, quarantine=not report.passed and not isolate)
    lib.note_wall(session_id, time.perf_counter() - t0)
    if isolate:
        half = len(ids) // 2
        attempt(session_id, ids[:half], f"{name}.1", bisect)
        attempt(session_id, ids[half:], f"{name}.2", bisect)


@flow(name="kedit-stream", log_prints=False)
def stream(cfg: lib.StreamConfig) -> dict:
    plan = validate_feeds(cfg, cfg.work_dir)
    session_id = load_model(cfg)
    try:
        with one_stream_per_model(lib.session(session_id).registered):
            restore_production(session_id)
            batches = start_tracking(session_id, plan)
            bisect = lib.session(session_id).gates.bisect
            for i, ids in enumerate(batches):
                attempt(session_id, ids, f"batch-{i:03d}", bisect)
            return finish(session_id, plan)
    finally:
        lib.close_session(session_id)
