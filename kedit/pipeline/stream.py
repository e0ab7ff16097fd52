"""The continual-editing stream as library functions; ``flows/stream.py`` calls one per task.

The model, its editor and the gate suite (with its baselines) live in one process-level ``StreamSession``,
looked up by id: tasks exchange ids, paths, configs, metrics and gate reports, never the model.

Every fact that enters ends in exactly one place: accepted (with the version that holds it),
quarantined (invalid record, editor cannot take it, or it failed a gate: with the reason), or
superseded (by a later update of the same subject and prompt). Facts already applied by an
earlier stream (or quarantined on top of the same chain) are skipped, which is what makes a
killed stream resumable without applying anything twice.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from editing import DEFAULT_EDITOR, EditError, make_editor
from evaluation.gates import GateReport, GateSuite, load_gates
from kedit.core.config import flatten
from kedit.core.errors import KeditError
from kedit.core.facts import EditRequest, load_many
from kedit.core.models import load_model, resolve
from kedit.core.paths import sha256_file
from kedit.store.naming import registered_name
from kedit.store.tracking import (
    T_FINGERPRINT,
    T_KIND,
    T_MANIFEST_SHA,
    T_N_QUARANTINED,
    T_PARENT_VERSION,
    T_VERDICT,
    T_VERSION,
    Tracker,
)
from kedit.store.versions import model_fingerprint, rebuild, write_version

log = logging.getLogger(__name__)


class StreamError(KeditError):
    pass


@dataclass(frozen=True)
class StreamConfig:
    feeds: tuple[str, ...]
    model: str
    editor: str | None = None  # None: the registry's default editor
    batch_size: int = 10
    gates: str | None = None  # YAML path; None: data/gates/default.yaml
    tracking_uri: str | None = None
    corpus: str | None = None  # text files for key statistics; None: text sampled from the model
    overrides: dict[str, Any] = field(default_factory=dict)  # editor hparams
    device: str | None = None
    work_dir: str = "out/stream"
    fmt: str = "auto"

    def __post_init__(self):
        if self.editor is None:
            object.__setattr__(self, "editor", DEFAULT_EDITOR)
        if self.batch_size < 1:
            raise StreamError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.feeds:
            raise StreamError("no fact feeds given")


# ----------------------------------------------------------------------------- 1. validate and order


@dataclass(frozen=True)
class Plan:
    path: str  # plan.json: the ordered, validated requests
    fact_ids: list[str]
    n_records: int
    n_invalid: int
    n_superseded: int
    feed_sha256: dict[str, str]
    fact_feed: dict[str, str]  # fact id -> the feed it came from
    feeds: dict[str, dict]  # feed -> {records, accepted, quarantined, superseded, error}


def plan_stream(cfg: StreamConfig, work_dir: Path) -> Plan:
    """Validate the feeds, resolve superseded updates, order by timestamp; write plan.json and the lists.

    A feed that cannot be read at all (missing, unknown format) is reported as invalid, and the others still run.
    """
    unreadable: dict[str, str] = {}
    facts = load_many([Path(p) for p in cfg.feeds], cfg.fmt, unreadable)
    for p, reason in unreadable.items():
        log.error("feed %s is invalid: %s", p, reason)
    feeds = {p: {"records": 0, "accepted": 0, "quarantined": 0, "superseded": 0, "error": e} for p, e in unreadable.items()}
    readable = [Path(p) for p in cfg.feeds if str(Path(p)) not in unreadable]
    work_dir.mkdir(parents=True, exist_ok=True)
    facts.write_quarantine(work_dir)
    (work_dir / "plan.json").write_text(json.dumps([r.to_dict() for r in facts.accepted], ensure_ascii=False))
    log.info("feeds: %s", facts.summary())
    fact_feed = {r.id: facts.origins[r.id][0] for r in facts.accepted}
    for p in readable:
        f = str(p)
        counts = {
            "accepted": sum(1 for v in fact_feed.values() if v == f),
            "quarantined": sum(1 for q in facts.quarantined if q.file == f),
            "superseded": sum(1 for x in facts.superseded if x.file == f),
        }
        feeds[f] = {"records": sum(counts.values()), **counts, "error": None}
    return Plan(
        str(work_dir / "plan.json"),
        [r.id for r in facts.accepted],
        facts.n_records,
        len(facts.quarantined),
        len(facts.superseded),
        {str(p): sha256_file(Path(p)) for p in readable},
        fact_feed,
        feeds,
    )


def read_plan(plan: Plan) -> dict[str, EditRequest]:
    return {d["id"]: EditRequest.from_dict(d) for d in json.loads(Path(plan.path).read_text())}


# ----------------------------------------------------------------------------- the runtime object


@dataclass
class Attempt:
    name: str
    ids: list[str]
    run_id: str
    parent_version: str | None
    before: dict[str, Any]  # each gate's measurement just before the edit (GateSuite.before)
    patches: Any = None  # the PatchSet this attempt applied (what Editor.edit returned)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class StreamSession:
    """Everything a stream keeps in memory between tasks; one per stream, in this process."""

    id: str
    cfg: StreamConfig
    gates: GateSuite  # the gates file's gates and the baselines they keep
    tracker: Tracker
    registered: str
    fingerprint: str
    model: Any
    tok: Any
    editor: Any
    requests: dict[str, EditRequest] = field(default_factory=dict)  # this stream's plan
    earlier: list[EditRequest] = field(default_factory=list)  # accepted along the production chain
    production: str | None = None
    chain: list[str] = field(default_factory=list)  # versions from the base up to production
    n_edits: int = 0
    run_id: str | None = None
    accepted: dict[str, str] = field(default_factory=dict)  # fact id -> version (this stream)
    quarantined: list[dict] = field(default_factory=list)  # this stream's gate/editor quarantine
    skipped: dict[str, str] = field(default_factory=dict)  # fact id -> why (done before this stream)
    history: list[dict] = field(default_factory=list)  # per accepted version: n_edits and drawdowns
    steps: list[dict] = field(default_factory=list)  # timings per attempt
    attempt: Attempt | None = None
    progress: Any = None
    ledger: dict[str, dict] = field(default_factory=dict)  # feed sha256 -> entry, as the stream started


SESSIONS: dict[str, StreamSession] = {}


def session(session_id: str) -> StreamSession:
    try:
        return SESSIONS[session_id]
    except KeyError:
        raise StreamError(f"no stream session {session_id!r} in this process") from None


# ----------------------------------------------------------------------------- 2. open: base, baselines, production


def open_session(cfg: StreamConfig) -> str:
    """Load the base model, measure the baselines on it, and build the editor (statistics from the base)."""
    import torch

    gates = load_gates(cfg.gates)
    path = resolve(cfg.model)
    model, tok = load_model(cfg.model, cfg.device)
    fp = model_fingerprint(path, model)
    tracker = Tracker(cfg.tracking_uri)
    name = registered_name(cfg.model, fp)
    tracker.ensure_registered(name, fp, cfg.model)

    gates.on_base(model, tok)

    corpus = None
    if cfg.corpus:
        from editing.stats import corpus_from_files

        corpus = corpus_from_files([cfg.corpus])
    editor = make_editor(cfg.editor, model, tok, cfg.overrides, corpus)
    with torch.no_grad():
        editor.prepare()  # statistics of the *base* model, so they are cached once per base
    sid = uuid.uuid4().hex[:12]
    SESSIONS[sid] = StreamSession(sid, cfg, gates, tracker, name, fp, model, tok, editor)
    return sid


def restore_production(session_id: str) -> dict:
    """Rebuild the production version from the base and its delta chain; load the editor's state."""
    s = session(session_id)
    closed = s.tracker.close_interrupted(s.registered)
    if closed:
        log.warning("%d run(s) of an interrupted stream marked KILLED", closed)
    prod = s.tracker.production(s.registered)
    chain = rebuild(s.model, s.tracker, s.registered, prod.version if prod else None, s.fingerprint)
    s.production = prod.version if prod else None
    s.chain = [v.version for v in chain.versions]
    s.earlier = chain.requests
    s.n_edits = len(chain.requests)
    if chain.state or chain.editor:
        if chain.editor == s.cfg.editor:
            s.editor.load_state_dict(chain.state)
        else:
            log.warning("production was made by %s; %s starts with fresh state", chain.editor, s.cfg.editor)
    s.history = [_history_point(v.tags) for v in chain.versions]
    if prod is not None:  # on the base model the baselines measured at open stand
        s.gates.on_production(s.model, s.tok, s.earlier)
    log.info("production: %s (%d edits applied)", f"v{s.production}" if s.production else "the base model", s.n_edits)
    return {"production": s.production, "n_edits": s.n_edits, "chain": [v.version for v in chain.versions]}


def _history_point(tags: dict[str, str]) -> dict:
    return {
        k: float(tags[f"kedit.{k}"]) for k in ("n_edits", "drawdown_base", "drawdown_prev", "retention") if f"kedit.{k}" in tags
    }


# ----------------------------------------------------------------------------- 3. start tracking, find what is left


def start_stream(session_id: str, plan: Plan) -> list[list[str]]:
    """Open the stream's parent run, skip what the chain already holds, quarantine what the editor refuses; returns batches."""
    s = session(session_id)
    s.requests = read_plan(plan)
    done = {r.id for r in s.earlier}
    earlier_q = s.tracker.quarantined(s.registered, s.chain)
    s.ledger = s.tracker.feed_ledger(s.registered)
    seen_feeds = {f for f, sha in plan.feed_sha256.items() if sha in s.ledger}
    for f in seen_feeds:
        log.info("feed %s (sha256 %s…) was processed before: skipped", f, plan.feed_sha256[f][:12])
    pending = []
    for fid in plan.fact_ids:
        if plan.fact_feed.get(fid) in seen_feeds:
            s.skipped[fid] = "feed already processed"
        elif fid in done:
            s.skipped[fid] = "already applied"
        elif fid in earlier_q:
            s.skipped[fid] = f"quarantined earlier: {earlier_q[fid].get('reason', '')}"
        else:
            pending.append(fid)
    s.run_id = s.tracker.start_run(
        s.registered,
        f"stream-{time.strftime('%Y%m%d-%H%M%S')}",
        {T_KIND: "stream", T_PARENT_VERSION: s.production or "", T_FINGERPRINT: s.fingerprint},
    )
    s.tracker.log_params(
        s.run_id,
        {
            "model": s.cfg.model,
            "editor": s.cfg.editor,
            "batch_size": s.cfg.batch_size,
            "device": str(next(s.model.parameters()).device),
            "dtype": str(next(s.model.parameters()).dtype),
            "start_version": s.production or "base",
            "gates_file": s.gates.source,
            **{f"hparams.{k}": v for k, v in flatten(s.editor.hparams).items()},
            **{f"gates.{k}": v for k, v in s.gates.params().items()},
            **{f"feed_sha256.{Path(p).name}": h for p, h in plan.feed_sha256.items()},
        },
    )
    s.tracker.log_artifacts(s.run_id, Path(plan.path).parent, "feeds")
    refused = []
    for fid in pending:
        try:
            s.editor.check([s.requests[fid]])
        except EditError as e:
            refused.append(fid)
            _quarantine(s, fid, f"editor {s.cfg.editor} refuses it: {e}", gate="editor", attempt=None)
    pending = [f for f in pending if f not in refused]
    if s.skipped:
        log.info("%d fact(s) skipped: already applied or quarantined on this chain", len(s.skipped))
    s.progress = tqdm(total=len(pending), desc=f"stream {s.registered}", unit="fact")
    b = s.cfg.batch_size
    return [pending[i : i + b] for i in range(0, len(pending), b)]


# ----------------------------------------------------------------------------- 4. one attempt: edit, gate, commit or revert


def apply_edits(session_id: str, ids: list[str], attempt: str) -> dict:
    """Measure the batch's neighbours on the current model, then edit (in place); returns timings."""
    s = session(session_id)
    t0 = time.perf_counter()
    run_id = s.tracker.start_run(
        s.registered,
        attempt,
        {T_KIND: "attempt", T_PARENT_VERSION: s.production or "", T_VERDICT: "running", "kedit.n_facts": str(len(ids))},
        parent_run_id=s.run_id,
    )
    t_track = time.perf_counter() - t0
    batch = [s.requests[i] for i in ids]
    t0 = time.perf_counter()
    before = s.gates.before(s.model, s.tok, batch)
    t_before = time.perf_counter() - t0
    t0 = time.perf_counter()
    delta = s.editor.edit(batch)
    t_edit = time.perf_counter() - t0
    s.attempt = Attempt(
        attempt, list(ids), run_id, s.production, before, delta, {"tracking": t_track, "gate:before": t_before, "edit": t_edit}
    )
    return {"edit_s": t_edit, "n": len(ids)}


def revert_edits(session_id: str) -> float:
    """Undo the current attempt's edit: weights and editor state bit for bit. Returns seconds."""
    s = session(session_id)
    t0 = time.perf_counter()
    s.editor.revert()
    dt = time.perf_counter() - t0
    if s.attempt is not None:
        s.attempt.seconds["rollback"] = dt
    return dt


def check_gates(session_id: str) -> GateReport:
    """Evaluate every gate on the edited model."""
    s = session(session_id)
    a = s.attempt
    batch = [s.requests[i] for i in a.ids]
    report = s.gates.measure(s.model, s.tok, batch, s.earlier, a.before)
    for k, v in report.seconds.items():
        a.seconds[f"gate:{k}"] = v
    return report


def commit_version(session_id: str, report: GateReport) -> str:
    """Store the delta as a new version of the registered model and move ``production`` to it."""
    s = session(session_id)
    a = s.attempt
    t0 = time.perf_counter()
    batch = [s.requests[i] for i in a.ids]
    n_edits = s.n_edits + len(batch)
    m = report.metrics
    with tempfile.TemporaryDirectory(prefix="kedit-version-") as tmp:
        sha = write_version(
            Path(tmp),
            a.patches,
            s.editor.state_dict(),
            batch,
            {
                "registered_model": s.registered,
                "base_model": s.cfg.model,
                "base_fingerprint": s.fingerprint,
                "parent_version": a.parent_version,
                "editor": s.cfg.editor,
                "hparams": s.editor.hparams.model_dump(mode="json"),
                "n_edits": n_edits,
                "stream_run_id": s.run_id,
            },
        )
        tags = {
            T_PARENT_VERSION: a.parent_version or "",
            T_MANIFEST_SHA: sha,
            "kedit.n_edits": str(n_edits),
            "kedit.editor": s.cfg.editor,
            **{f"kedit.{k}": f"{m[k]:.6g}" for k in ("drawdown_base", "drawdown_prev", "retention") if k in m},
        }
        version = s.tracker.register_version(s.registered, a.run_id, Path(tmp), tags)
        a.seconds["version_bytes"] = sum(f.stat().st_size for f in Path(tmp).iterdir())
    s.tracker.set_production(s.registered, version)
    # from here on the version is in production: only bookkeeping follows
    s.editor.commit()
    s.production = version
    s.n_edits = n_edits
    s.earlier += batch
    s.gates.on_accept(report)
    for fid in a.ids:
        s.accepted[fid] = version
    s.history.append({"n_edits": n_edits, **{k: m[k] for k in ("drawdown_base", "drawdown_prev", "retention") if k in m}})
    a.seconds["tracking"] += time.perf_counter() - t0
    s.progress.update(len(a.ids))
    return version


def record_attempt(session_id: str, report: GateReport, verdict: str, quarantine: bool) -> dict:
    """Log the attempt's metrics, report and verdict; for a rejected single fact (or with bisection off), quarantine it."""
    s = session(session_id)
    a = s.attempt
    t0 = time.perf_counter()
    reason = report.reason()
    q = []
    if quarantine:
        for fid in a.ids:
            q.append(_quarantine(s, fid, f"failed gates: {reason}", gate="gates", attempt=a, report=report))
    metrics = report.metrics
    s.tracker.log_metrics(a.run_id, metrics, step=s.n_edits)
    s.tracker.log_dict(a.run_id, report.to_dict(), "gate_report.json")
    s.tracker.log_dict(a.run_id, {"fact_ids": a.ids, "parent_version": a.parent_version}, "batch.json")
    s.tracker.log_dict(a.run_id, q, "quarantine.json")
    tags = {T_VERDICT: verdict, T_N_QUARANTINED: str(len(q))}
    if verdict == "accepted":
        tags[T_VERSION] = s.production
        s.tracker.log_metrics(s.run_id, {**metrics, "n_edits": s.n_edits, "facts_accepted": len(s.accepted)}, step=s.n_edits)
        _plot(s)
    s.tracker.set_tags(a.run_id, tags)
    s.tracker.end_run(a.run_id)
    a.seconds["tracking"] += time.perf_counter() - t0
    s.steps.append({"attempt": a.name, "n": len(a.ids), "ids": list(a.ids), "verdict": verdict, **a.seconds})
    if quarantine:
        s.progress.update(len(a.ids))
    log.info("%s (%d facts): %s%s", a.name, len(a.ids), verdict, "" if verdict == "accepted" else f" — {reason}")
    return {"verdict": verdict, "quarantined": len(q)}


def note_wall(session_id: str, seconds: float) -> None:
    """The flow's wall time for the last attempt (edit to recorded verdict), for the orchestration overhead."""
    s = session(session_id)
    if s.steps:
        s.steps[-1]["wall"] = seconds


def _quarantine(
    s: StreamSession, fid: str, reason: str, gate: str, attempt: Attempt | None, report: GateReport | None = None
) -> dict:
    rec = {
        "id": fid,
        "reason": reason,
        "gate": gate,
        "attempt": attempt.name if attempt else None,
        "parent_version": attempt.parent_version if attempt else s.production,
        "failed": [asdict(c) for c in report.failed] if report else [],
        "request": s.requests[fid].to_dict(),
    }
    s.quarantined.append(rec)
    if attempt is None:  # refused before any attempt: record it in its own run so a resumed stream skips it too
        run = s.tracker.start_run(
            s.registered, f"refused-{fid}", {T_KIND: "attempt", T_PARENT_VERSION: s.production or ""}, parent_run_id=s.run_id
        )
        s.tracker.log_dict(run, [rec], "quarantine.json")
        s.tracker.set_tags(run, {T_VERDICT: "refused", T_N_QUARANTINED: "1"})
        s.tracker.end_run(run)
    return rec


def _plot(s: StreamSession) -> None:
    """drawdown.png on the stream run: drawdown and retention over the model's edit count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in s.history if "n_edits" in p]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, label in (("drawdown_base", "drawdown vs base"), ("drawdown_prev", "drawdown vs previous version")):
        xs = [p["n_edits"] for p in pts if key in p]
        ax.plot(xs, [p[key] for p in pts if key in p], marker="o", label=label)
    ax.set_xlabel("edits applied to the model")
    ax.set_ylabel("fraction of known facts lost")
    ax2 = ax.twinx()
    xs = [p["n_edits"] for p in pts if "retention" in p]
    ax2.plot(xs, [p["retention"] for p in pts if "retention" in p], color="grey", linestyle="--", label="retention")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("retention of earlier edits")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{s.registered}: knowledge drawdown over edits")
    fig.tight_layout()
    s.tracker.log_figure(s.run_id, fig, "drawdown.png")
    plt.close(fig)


# ----------------------------------------------------------------------------- 5. finish


def finish_stream(session_id: str, plan: Plan) -> dict:
    """Account for every fact, log the summary and close the session."""
    s = session(session_id)
    if s.progress is not None:
        s.progress.close()
    work = Path(plan.path).parent
    summary = {
        "registered_model": s.registered,
        "production": s.production,
        "n_edits": s.n_edits,
        "records": plan.n_records,
        "accepted": len(s.accepted),
        "quarantined": plan.n_invalid + len(s.quarantined),
        "quarantined_invalid": plan.n_invalid,
        "quarantined_gates": len([q for q in s.quarantined if q["gate"] == "gates"]),
        "quarantined_editor": len([q for q in s.quarantined if q["gate"] == "editor"]),
        "superseded": plan.n_superseded,
        "skipped": len(s.skipped),
        "steps": s.steps,
        "run_id": s.run_id,
    }
    unaccounted = set(plan.fact_ids) - set(s.accepted) - {q["id"] for q in s.quarantined} - set(s.skipped)
    if unaccounted:
        raise StreamError(f"{len(unaccounted)} fact(s) ended nowhere: {sorted(unaccounted)[:5]}")
    (work / "stream_quarantine.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in s.quarantined))
    (work / "accepted.json").write_text(json.dumps(s.accepted, indent=2))
    s.tracker.log_dict(s.run_id, s.quarantined, "quarantine_gates.json")
    s.tracker.log_dict(s.run_id, s.accepted, "accepted.json")
    s.tracker.log_dict(s.run_id, summary, "summary.json")
    for feed, counts in plan.feeds.items():
        sha = plan.feed_sha256.get(feed) or f"unreadable:{feed}"
        if sha in s.ledger:
            continue
        status = (
            "invalid" if counts["error"] or (counts["records"] and not counts["accepted"] + counts["superseded"]) else "processed"
        )
        quarantine = [q for q in _read_jsonl(work / "quarantine.jsonl") if q.get("file") == feed]
        quarantine += [q for q in s.quarantined if plan.fact_feed.get(q["id"]) == feed]
        s.tracker.record_feed(
            s.registered, s.run_id, feed, sha, status, {k: v for k, v in counts.items() if k != "error"}, quarantine
        )
    summary["feeds"] = plan.feeds
    s.tracker.log_metrics(
        s.run_id,
        {k: summary[k] for k in ("accepted", "quarantined", "superseded", "skipped")} | {"n_edits": s.n_edits},
        step=s.n_edits,
    )
    s.tracker.set_tags(s.run_id, {T_VERSION: s.production or "", T_VERDICT: "finished"})
    s.tracker.end_run(s.run_id)
    return summary


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def close_session(session_id: str) -> None:
    SESSIONS.pop(session_id, None)
