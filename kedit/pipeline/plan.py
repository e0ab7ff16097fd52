"""Step 1 of a stream: validate the feeds, resolve superseded updates, order by timestamp."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kedit.core.facts import EditRequest, load_many

from .config import StreamConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    path: str  # plan.json: the ordered, validated requests
    fact_keys: list[str]  # EditRequest.key of each accepted request, in order
    n_records: int
    n_invalid: int
    n_superseded: int
    feed_sha256: dict[str, str]
    fact_feed: dict[str, str]  # fact key -> the feed it came from
    feeds: dict[str, dict]  # feed -> {records, accepted, quarantined, superseded, error}


def make_plan(cfg: StreamConfig, work_dir: Path) -> Plan:
    """Validate the feeds, resolve superseded updates, order by timestamp; write plan.json and the lists.

    A feed that cannot be read at all (missing, unknown format) is reported as invalid, and the others still run.
    """
    unreadable: dict[str, str] = {}
    facts = load_many([Path(p) for p in cfg.feeds], cfg.fmt, unreadable, cfg.limits)
    for path, reason in unreadable.items():
        log.error("feed %s is invalid: %s", path, reason)
    feeds = {p: {"records": 0, "accepted": 0, "quarantined": 0, "superseded": 0, "error": e} for p, e in unreadable.items()}
    readable = [Path(p) for p in cfg.feeds if str(Path(p)) not in unreadable]
    work_dir.mkdir(parents=True, exist_ok=True)
    facts.write_quarantine(work_dir, cfg.limits.quarantine_rows)
    (work_dir / "plan.json").write_text(json.dumps([r.to_dict() for r in facts.accepted], ensure_ascii=False))
    log.info("feeds: %s", facts.summary())
    fact_feed = {r.key: facts.origins[r.key][0] for r in facts.accepted}
    for path in readable:
        feed = str(path)
        counts = {
            "accepted": sum(1 for origin in fact_feed.values() if origin == feed),
            "quarantined": sum(1 for q in facts.quarantined if q.file == feed),
            "superseded": sum(1 for x in facts.superseded if x.file == feed),
        }
        feeds[feed] = {"records": sum(counts.values()), **counts, "error": None}
    return Plan(
        str(work_dir / "plan.json"),
        [r.key for r in facts.accepted],
        facts.n_records,
        len(facts.quarantined),
        len(facts.superseded),
        {str(p): facts.sha256[str(p)] for p in readable},  # of the bytes loaded, not of the file as it is now
        fact_feed,
        feeds,
    )


def read_plan(plan: Plan) -> dict[str, EditRequest]:
    requests = (EditRequest.from_dict(d) for d in json.loads(Path(plan.path).read_text()))
    return {r.key: r for r in requests}
