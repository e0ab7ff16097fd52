"""Serving the stream: a deployment on a cron schedule, one started by feed-arrival events, and the directory watcher.

Feed arrival: a file in the watched directory is *complete* when its name does not start with
``.`` and does not end in ``.tmp``/``.part`` (write-then-rename), and its size and mtime have
not changed for ``settle`` seconds (for writers that cannot rename). The watcher then emits the
Prefect event ``kedit.feed.arrived``; anything else can emit the same event through the Prefect
server's events API. The event-triggered deployment runs ``kedit-feeds`` on that one feed; the
cron deployment runs it on every feed of the directory. Either way the feed ledger (in the
MLflow store) makes each feed, by content hash, processed exactly once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from kedit.core.facts import is_feed_name, list_feeds

log = logging.getLogger(__name__)

FEED_EVENT = "kedit.feed.arrived"


@task(name="new-feeds", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=1)
def new_feeds(paths: list[str], model: str, tracking_uri: str | None) -> list[str]:
    """The feeds whose content hash is not in the model's ledger yet."""
    from kedit.core.paths import sha256_file
    from kedit.store.naming import identify
    from kedit.store.tracking import Tracker

    name, _ = identify(model)
    ledger = Tracker(tracking_uri).feed_ledger(name)
    fresh = []
    for p in paths:
        if not Path(p).is_file():
            log.warning("feed %s is gone", p)
            continue
        if sha256_file(Path(p)) in ledger:
            log.info("feed %s was processed before (same content): nothing to do", p)
        else:
            fresh.append(p)
    return fresh


def run_dir(work_dir: str | Path) -> Path:
    """A work directory of this flow run's own: two feeds arriving in the same second run side by side
    (the second waits for the model's lock) and must not share plan.json."""
    import uuid

    from prefect.runtime import flow_run

    return Path(work_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{(flow_run.id or uuid.uuid4().hex)[:8]}"


@flow(name="kedit-feeds")
def process_feeds(
    model: str,
    editor: str | None = None,
    feeds_dir: str | None = None,
    feed: str | None = None,
    batch_size: int = 10,
    gates: str | None = None,
    tracking_uri: str | None = None,
    corpus: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    work_dir: str = "out/serve",
) -> dict:
    """Run the stream on one arrived feed, or on every new feed of a directory."""
    from kedit.pipeline.stream import StreamConfig

    from .stream import stream

    paths = [feed] if feed else list_feeds(feeds_dir or ".")
    fresh = new_feeds(paths, model, tracking_uri)
    if not fresh:
        return {"feeds": [], "skipped": paths}
    cfg = StreamConfig(
        feeds=tuple(fresh),
        model=model,
        editor=editor,
        batch_size=batch_size,
        gates=gates,
        tracking_uri=tracking_uri,
        corpus=corpus,
        overrides=overrides or {},
        device=device,
        work_dir=str(run_dir(work_dir)),
    )
    return stream(cfg)


# ----------------------------------------------------------------------------- the watcher


class FeedWatcher(threading.Thread):
    """Polls a directory; calls ``on_feed(path, sha256)`` once per complete file content."""

    def __init__(self, directory: Path, on_feed: Callable[[Path, str], None], interval: float = 0.5, settle: float = 1.0):
        super().__init__(name="kedit-feed-watcher", daemon=True)
        self.directory, self.on_feed, self.interval, self.settle = Path(directory), on_feed, interval, settle
        self._seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, unchanged since)
        self._done: set[tuple[Path, str]] = set()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:  # a watcher that dies silently is worse than one that logs and goes on
                log.exception("feed watcher: scan failed")
            self._stop.wait(self.interval)

    def scan(self, now: float | None = None) -> list[Path]:
        from kedit.core.paths import sha256_file

        now = time.monotonic() if now is None else now
        fired = []
        present = set()
        for p in self.directory.iterdir() if self.directory.is_dir() else []:
            if not p.is_file() or not is_feed_name(p):
                continue
            present.add(p)
            st = p.stat()
            sig = (st.st_size, st.st_mtime_ns)
            old = self._seen.get(p)
            if old is None or old[:2] != sig:
                self._seen[p] = (*sig, now)
                continue
            if now - old[2] < self.settle:
                continue
            sha = sha256_file(p)
            if (p, sha) in self._done:
                continue
            self._done.add((p, sha))
            fired.append(p)
            self.on_feed(p, sha)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return fired


def emit_feed_event(target: str) -> Callable[[Path, str], None]:
    def emit(path: Path, sha: str) -> None:
        from prefect.events import emit_event

        emit_event(
            event=FEED_EVENT,
            resource={"prefect.resource.id": f"kedit.feed.{sha[:16]}", "kedit.target": target},
            payload={"path": str(path.resolve()), "sha256": sha},
        )
        log.info("feed arrived: %s (sha256 %s…) → event %s", path, sha[:12], FEED_EVENT)

    return emit


# ----------------------------------------------------------------------------- deployments


def build_deployments(target: str, params: dict[str, Any], cron: str | None):
    """The event-triggered deployment and, with ``cron``, the scheduled one; both run ``kedit-feeds``."""
    from prefect.events import DeploymentEventTrigger

    on_feed = process_feeds.to_deployment(
        name=f"{target}-on-feed",
        parameters=params,
        triggers=[
            DeploymentEventTrigger(
                name=f"{target}: feed arrived",
                expect={FEED_EVENT},
                match={"kedit.target": target},
                parameters={"feed": "{{ event.payload.path }}"},
            )
        ],
        tags=["kedit", target],
    )
    deps = [on_feed]
    if cron:
        deps.append(process_feeds.to_deployment(name=f"{target}-cron", cron=cron, parameters=params, tags=["kedit", target]))
    return deps


def serve(
    feeds_dir: Path,
    model: str,
    editor: str,
    cron: str | None,
    target: str,
    params: dict[str, Any],
    limit: int = 2,
) -> None:
    """Register the deployments, start the watcher, and execute flow runs here until interrupted."""
    from prefect import serve as prefect_serve

    feeds_dir.mkdir(parents=True, exist_ok=True)
    deps = build_deployments(target, {"model": model, "editor": editor, "feeds_dir": str(feeds_dir.resolve()), **params}, cron)
    watcher = FeedWatcher(feeds_dir, emit_feed_event(target))
    watcher.start()
    log.info("watching %s for feeds (target %s)%s", feeds_dir, target, f", schedule {cron!r}" if cron else "")
    try:
        prefect_serve(*deps, limit=limit)
    finally:
        watcher.stop()
