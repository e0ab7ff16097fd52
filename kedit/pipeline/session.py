"""Steps 2-4 of a stream: open a session on the base model, restore production, start tracking.

A session holds what a stream keeps in memory between its Prefect tasks: the model, its editor,
the gate suite with its baselines, the tracker and the stream's bookkeeping. Tasks exchange the
session's id, never the model (Prefect would hash and serialize task arguments), so sessions are
looked up in this process's table; ``open_session`` returns what the flow needs to know as an
``Opened`` record, so the flow never reaches into the session.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editing import EDITORS, EditError, Editor, get_editor, make_editor
from evaluation.gates import GateReport, GateSuite, load_gates
from kedit.core.config import flatten
from kedit.core.facts import EditRequest
from kedit.core.facts.reedit import Held, ReEdit, live_facts, noop_reason, resolve
from kedit.core.facts.schema import normalize
from kedit.core.lm import current_answers
from kedit.core.models import load_model
from kedit.store.mkv import MKVExchange, MKVStore, compat_for
from kedit.store.naming import for_client, identify
from kedit.store.networks import trained_assets
from kedit.store.tracking import (
    T_FINGERPRINT,
    T_KIND,
    T_N_EDITS,
    T_N_QUARANTINED,
    T_PARENT_VERSION,
    T_VERDICT,
    Tracker,
    feed_settled,
    metric_tag,
)
from kedit.store.versions import rebuild

from . import federation, monitor
from .config import HISTORY_KEYS, StreamConfig, StreamError
from .plan import Plan, read_plan

if TYPE_CHECKING:
    from torch import nn
    from tqdm import tqdm

    from .attempt import Attempt

log = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything one stream keeps in memory between tasks, in this process."""

    id: str
    cfg: StreamConfig
    gates: GateSuite  # the gates file's gates and the baselines they keep
    tracker: Tracker
    registered: str  # the registered model's name in the store
    fingerprint: str  # of the base weights
    model: nn.Module
    tokenizer: Any
    editor: Editor
    requests: dict[str, EditRequest] = field(default_factory=dict)  # this stream's plan, by EditRequest.key
    live: dict[tuple[str, str], Held] = field(default_factory=dict)  # slot -> what the chain holds for it
    applied: set[str] = field(default_factory=set)  # keys of every fact whose edit held on the chain, superseded or not
    reedits: dict[str, ReEdit] = field(default_factory=dict)  # fact key -> the chain fact it replaces
    filled: dict[str, str] = field(default_factory=dict)  # fact key -> target_true read from the model
    not_held: dict[str, dict] = field(default_factory=dict)  # fact key -> its accepted batch's outcome, until retried
    production: str | None = None
    production_manifest_sha: str | None = None  # production's manifest sha256, verified from the chain (None on the base)
    chain: list[str] = field(default_factory=list)  # versions from the base up to production
    lineage: list[str] = field(default_factory=list)  # the chain and the versions its squashes and copies stand for
    n_edits: int = 0
    run_id: str | None = None
    accepted: dict[str, str] = field(default_factory=dict)  # fact key -> version (this stream)
    quarantined: list[dict] = field(default_factory=list)  # this stream's gate/editor quarantine
    # set when a fact failed only a budget against the base that production has spent: the stream stops,
    # and that fact and every one not yet tried are held back (a later stream with more budget retries them)
    stopped: str | None = None
    held_back: dict[str, str] = field(default_factory=dict)  # fact key -> why
    skipped: dict[str, str] = field(default_factory=dict)  # fact key -> why (done before this stream)
    batches: list[list[str]] | None = None  # what start_stream returned (a repeated call returns it again)
    history: list[dict] = field(default_factory=list)  # the base, then per accepted version: n_edits and HISTORY_KEYS
    # per rejected attempt on the chain: the edit count it would have reached, its HISTORY_KEYS
    rejected: list[dict] = field(default_factory=list)
    limits: dict[str, float] = field(default_factory=dict)  # gate -> threshold, from the reports
    logged: set[tuple[str, int]] = field(default_factory=set)  # (series, step) already on the stream run
    steps: list[dict] = field(default_factory=list)  # timings per attempt
    seconds: dict[str, float] = field(default_factory=dict)  # timings of the stream's own phases (fill_target_true)
    attempt: Attempt | None = None
    progress: tqdm | None = None
    ledger: dict[str, dict] = field(default_factory=dict)  # feed sha256 -> entry, as the stream started

    @property
    def earlier(self) -> list[EditRequest]:
        """The chain's live facts (held, not superseded): what retention asks to keep holding."""
        return [held.request for held in self.live.values()]


@dataclass(frozen=True)
class Opened:
    """What the flow needs of an open session: its id, the model lock's name and store, whether to bisect."""

    session_id: str
    registered: str
    bisect: bool
    store: str  # the tracking URI, resolved: a local SQLite store is part of the lock's name


_SESSIONS: dict[str, Session] = {}  # this process's open sessions; the flow closes its own


def get_session(session_id: str) -> Session:
    try:
        return _SESSIONS[session_id]
    except KeyError:
        raise StreamError(f"no stream session {session_id!r} in this process") from None


def close_session(session_id: str) -> None:
    _SESSIONS.pop(session_id, None)


# ----------------------------------------------------------------------------- open: base, baselines, editor


def open_session(cfg: StreamConfig) -> Opened:
    """Load the base model, measure the gates' baselines on it, and build the editor (statistics from the base)."""
    import torch

    gates = load_gates(cfg.gates)
    model, tokenizer = load_model(cfg.model, cfg.device)
    registered, fingerprint = identify(cfg.model, model)
    registered = for_client(registered, cfg.client)  # a federation's client: its own registered model of the base
    tracker = Tracker(cfg.tracking_uri)
    tracker.ensure_registered(registered, fingerprint, cfg.model)

    editor_cls = get_editor(cfg.editor)
    gates.refuse_memories(cfg.editor if editor_cls.installs_memories else None, model)
    gates.on_base(model, tokenizer)
    assets = _assets(cfg) | trained_assets(tracker, editor_cls, registered, fingerprint)
    editor = make_editor(cfg.editor, model, tokenizer, cfg.overrides, assets=assets)
    with torch.no_grad():
        editor.prepare()  # statistics of the *base* model, so they are cached once per base
    if cfg.mkv:
        if not editor.shares_targets:
            sharing = sorted(n for n, c in EDITORS.items() if c.shares_targets)
            raise StreamError(f"{cfg.editor} does not share target vectors; a federated stream needs one of {sharing}")
        compat = compat_for(editor, fingerprint)
        client = MKVStore(cfg.mkv).client(cfg.client)
        editor.exchange = MKVExchange(client, compat, cfg.mkv_threshold, cfg.mkv_min_share, cfg.mkv_refine)
    session_id = uuid.uuid4().hex[:12]
    _SESSIONS[session_id] = Session(session_id, cfg, gates, tracker, registered, fingerprint, model, tokenizer, editor)
    return Opened(session_id, registered, gates.bisect, tracker.uri)


def _assets(cfg: StreamConfig) -> dict[str, Any]:
    """The editor's named inputs besides weights; an editor takes only those it declares."""
    if not cfg.corpus:
        return {}
    from editing.stats import corpus_from_files

    return {"corpus": corpus_from_files([cfg.corpus])}


# ----------------------------------------------------------------------------- restore production


def restore_production(session_id: str) -> dict:
    """Rebuild the production version from the base and its patch chain; load the editor's state."""
    session = get_session(session_id)
    closed = session.tracker.close_interrupted(session.registered)
    if closed:
        log.warning("%d run(s) of an interrupted stream marked KILLED", closed)
    prod = session.tracker.production(session.registered)
    chain = rebuild(session.model, session.tracker, session.registered, prod.version if prod else None, session.fingerprint)
    session.production = prod.version if prod else None
    session.production_manifest_sha = chain.head_manifest_sha
    session.chain = [v.version for v in chain.versions]
    session.lineage = chain.lineage
    session.applied = {r.key for r, _ in chain.applied}
    session.live = live_facts(chain.applied)
    session.n_edits = len(chain.requests)
    if chain.state or chain.editor:
        if chain.editor == session.cfg.editor:
            session.editor.load_state_dict(chain.state)
        else:
            log.warning("production was made by %s; %s starts with fresh state", chain.editor, session.cfg.editor)
    session.history = [dict(monitor.BASE_POINT)] + [history_point(v.tags) for v in chain.versions]
    session.rejected = monitor.earlier_rejections(session)
    federation.publish(session, set(session.chain))  # a kill between a version and its upload: upload now
    if prod is not None:  # on the base model the baselines measured at open stand
        session.gates.on_production(session.model, session.tokenizer, session.earlier)
    where = f"v{session.production}" if session.production else "the base model"
    log.info("production: %s (%d edits applied)", where, session.n_edits)
    return {"production": session.production, "n_edits": session.n_edits, "chain": session.chain}


def history_point(tags: dict[str, str]) -> dict:
    point = {k: float(tags[metric_tag(k)]) for k in HISTORY_KEYS if metric_tag(k) in tags}
    return {"n_edits": float(tags[T_N_EDITS]), **point} if T_N_EDITS in tags else point


# ----------------------------------------------------------------------------- start: skip what is done, open the run


def start_stream(session_id: str, plan: Plan) -> list[list[str]]:
    """Open the stream's parent run, skip what the chain already holds, quarantine what the editor refuses; returns batches."""
    session = get_session(session_id)
    if session.batches is not None:  # started already (a retried task): one parent run, one skip list
        return session.batches
    session.requests = read_plan(plan)
    pending = _not_done(session, plan)
    if session.run_id is None:  # a try that failed after opening the run reuses it
        session.run_id = session.tracker.start_run(
            session.registered,
            f"stream-{time.strftime('%Y%m%d-%H%M%S')}",
            {T_KIND: "stream", T_PARENT_VERSION: session.production or "", T_FINGERPRINT: session.fingerprint},
        )
    session.tracker.log_params(session.run_id, _run_params(session, plan))
    session.tracker.log_artifacts(session.run_id, Path(plan.path).parent, "feeds")
    monitor.start_series(session)
    pending = _resolve_reedits(session, pending)
    pending = _fill_target_true(session, pending)
    pending = [key for key in pending if _editor_takes(session, key)]
    if session.skipped:
        log.info("%d fact(s) skipped: already applied or quarantined on this chain", len(session.skipped))
    from tqdm.auto import tqdm

    session.progress = tqdm(total=len(pending), desc=f"stream {session.registered}", unit="fact")
    size = session.cfg.batch_size
    session.batches = [pending[i : i + size] for i in range(0, len(pending), size)]
    return session.batches


def _not_done(session: Session, plan: Plan) -> list[str]:
    """The plan's facts that neither an earlier stream (same feed, same chain) nor the chain itself settled.

    A fact is known by its content (``EditRequest.key``), not by the producer's id: ids repeat across feeds."""
    done = session.applied  # superseded facts too: an old record sent again must not bring its value back
    quarantined_before = session.tracker.quarantined(session.registered, session.lineage)
    session.ledger = session.tracker.feed_ledger(session.registered)
    # a feed whose facts a spent budget held back is tried again when sent again (its settled facts are skipped
    # below); the watcher of `kedit serve` does not send it again by itself
    seen_feeds = {f for f, sha in plan.feed_sha256.items() if feed_settled(session.ledger.get(sha))}
    for feed in seen_feeds:
        log.info("feed %s (sha256 %s…) was processed before: skipped", feed, plan.feed_sha256[feed][:12])
    pending = []
    for key in plan.fact_keys:
        if plan.fact_feed.get(key) in seen_feeds:
            session.skipped[key] = "feed already processed"
        elif key in quarantined_before:  # first: a fact whose edit did not hold is in a version, but not applied
            session.skipped[key] = f"quarantined earlier: {quarantined_before[key].get('reason', '')}"
        elif key in done:
            session.skipped[key] = "already applied"
        else:
            pending.append(key)
    return pending


def _resolve_reedits(session: Session, pending: list[str]) -> list[str]:
    """A fact the chain holds under another value is a re-edit: its target_true becomes the value the chain
    last wrote. The same value again is a no-op, quarantined naming the version that holds it."""
    res = resolve([session.requests[k] for k in pending], session.live)
    for request, held in res.noops:
        quarantine_fact(session, request.key, noop_reason(held), gate="noop")
    for reedit in res.reedits:
        session.requests[reedit.request.key] = reedit.request
        session.reedits[reedit.request.key] = reedit
    if res.reedits:
        session.tracker.log_dict(session.run_id, [e.to_dict() for e in res.reedits], "reedits.json")
        log.info("%d fact(s) re-edit what the chain holds", len(res.reedits))
    noops = {r.key for r, _ in res.noops}
    return [k for k in pending if k not in noops]


def _fill_target_true(session: Session, pending: list[str]) -> list[str]:
    """A fact without target_true gets the model's current answer, in one batched generation on production:
    the greedy continuation cut at the first line break, clause mark or sentence-ending full stop, then to as
    many words as target_new has (``current_answers``), so that the efficacy check compares values of one
    shape (a one-word city with a one-word answer, not with the sentence that follows it).
    A model that already answers target_new makes the fact a no-op."""
    missing = [k for k in pending if session.requests[k].target_true is None]
    if not missing:
        return pending
    t0 = time.perf_counter()
    prompts = [session.requests[k].text for k in missing]
    words = [len(session.requests[k].target_new.split()) for k in missing]
    answers = current_answers(session.model, session.tokenizer, prompts, words)
    seconds = time.perf_counter() - t0
    noops = set()
    for key, answer in zip(missing, answers):
        request = session.requests[key]
        if answer is None:
            continue  # nothing to read: the fact stays without target_true (an editor that needs it refuses it)
        if normalize(answer) == normalize(request.target_new):
            noops.add(key)
            quarantine_fact(session, key, f"no-op: the model already answers {answer!r}", gate="noop")
            continue
        session.requests[key] = dataclasses.replace(request, target_true=answer)
        session.filled[key] = answer
    rows = [
        {"key": k, "id": session.requests[k].id, "prompt": session.requests[k].text, "target_true": a}
        for k, a in zip(missing, answers)
    ]
    session.tracker.log_dict(session.run_id, rows, "filled_target_true.json")
    monitor.log_point(session, session.n_edits, {"fill_target_true_s": seconds, "filled_target_true": len(session.filled)})
    session.seconds["fill_target_true"] = seconds
    log.info("target_true read from the model for %d fact(s) in %.2f s", len(session.filled), seconds)
    return [k for k in pending if k not in noops]


def _run_params(session: Session, plan: Plan) -> dict[str, Any]:
    param = next(session.model.parameters())
    return {
        "model": session.cfg.model,
        "editor": session.cfg.editor,
        "batch_size": session.cfg.batch_size,
        "device": str(param.device),
        "dtype": str(param.dtype),
        "start_version": session.production or "base",
        "gates_file": session.gates.source,
        **{f"hparams.{k}": v for k, v in flatten(session.editor.hparams).items()},
        **{f"gates.{k}": v for k, v in session.gates.params().items()},
        **feed_params(plan.feed_sha256),
    }


def feed_params(feed_sha256: dict[str, str]) -> dict[str, str]:
    """``feed_sha256.<name>`` run parameters; MLflow allows only letters, digits, ``_-. /`` in keys, so a
    feed named ``feed(1).jsonl`` becomes ``feed_1_.jsonl`` (with a counter should two names meet)."""
    out: dict[str, str] = {}
    for path, sha in feed_sha256.items():
        base = "feed_sha256." + re.sub(r"[^A-Za-z0-9_.\- ]", "_", Path(path).name)
        key, n = base, 1
        while key in out:
            n += 1
            key = f"{base}.{n}"
        out[key] = sha
    return out


def _editor_takes(session: Session, key: str) -> bool:
    try:
        session.editor.require_supported([session.requests[key]])
    except EditError as e:
        quarantine_fact(session, key, f"editor {session.cfg.editor} refuses it: {e}", gate="editor")
        return False
    return True


def quarantine_record(
    session: Session, key: str, reason: str, gate: str, attempt: Attempt | None, report: GateReport | None = None
) -> dict:
    """What the store keeps of a fact this stream quarantines: its key (the identity on the chain), the
    producer's id, why, and the request itself."""
    request = session.requests[key]
    return {
        "key": key,
        "id": request.id,
        "reason": reason,
        "gate": gate,
        "attempt": attempt.name if attempt else None,
        "parent_version": attempt.parent_version if attempt else session.production,
        "failed": [asdict(c) for c in report.failed] if report else [],
        "request": request.to_dict(),
    }


def quarantine_fact(session: Session, key: str, reason: str, gate: str) -> dict:
    """Quarantine a fact refused before any attempt: it gets its own run, so that a resumed stream on the
    same chain skips it too. The session lists it only once the run is written, and only once."""
    done = next((q for q in session.quarantined if q["key"] == key), None)
    if done is not None:  # a retried start: refused already
        return done
    record = quarantine_record(session, key, reason, gate, None)
    tracker = session.tracker
    run = tracker.start_run(
        session.registered,
        f"refused-{request_label(session.requests[key])}",
        {T_KIND: "attempt", T_PARENT_VERSION: session.production or ""},
        parent_run_id=session.run_id,
    )
    tracker.log_dict(run, [record], "quarantine.json")
    tracker.set_tags(run, {T_VERDICT: "refused", T_N_QUARANTINED: "1"})
    tracker.end_run(run)
    session.quarantined.append(record)
    return record


def request_label(request: EditRequest) -> str:
    """A short printable name for run names: the producer's id, cut, without control characters."""
    return re.sub(r"[^\w.\-]", "_", request.id)[:60]
