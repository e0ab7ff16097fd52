"""Serving the stream: a deployment on a cron schedule, one started by feed-arrival events, and the directory watcher.

Feed arrival: a feed file (``.jsonl``, ``.csv``, ``.json``) in the watched directory is *complete* when
its name does not start with ``.`` and does not end in a partial suffix (``.tmp``, ``.part``, ``.partial``,
``.crdownload``: ``kedit.core.facts.is_feed_name``), and either it was renamed to that name
(write-then-rename: complete at once) or its size and mtime have not changed for ``settle``
seconds (for writers that cannot rename). The watcher then emits the
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
    from kedit.pipeline.config import StreamConfig

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


class FeedWatcher:
    """Watches a directory and calls ``on_feed(path, sha256)`` once per complete file content.

    Filesystem events come from watchdog: inotify on Linux, or its polling observer (every
    ``interval`` seconds) where inotify cannot be used or with ``polling``; ``kind`` says which, once started. A file
    renamed into the directory (write-then-rename) is complete at once; a file created or written
    in place is complete once its size and mtime have not changed for ``settle`` seconds, checked
    by one timer thread when the last event on it is ``settle`` seconds old. ``scan`` applies the
    settle rule to the whole directory (the files already there at start).
    """

    def __init__(
        self,
        directory: Path,
        on_feed: Callable[[Path, str], None],
        interval: float = 0.5,
        settle: float = 1.0,
        polling: bool = False,
    ):
        self.directory, self.on_feed, self.interval, self.settle = Path(directory), on_feed, interval, settle
        self.polling = polling  # force the polling observer (network filesystems: inotify misses other hosts' writes)
        self.kind: str | None = None  # "inotify" or "polling" once started
        self._seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, unchanged since)
        self._due: dict[Path, float] = {}  # path -> when to check it next
        self._done: set[tuple[Path, str]] = set()
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._observer: Any = None
        self._timer: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        self._observer, self.kind = self._observe()
        self._timer = threading.Thread(target=self._check_due, name="kedit-feed-settle", daemon=True)
        self._timer.start()
        self.scan()
        log.info("feed watcher on %s: %s", self.directory, self.kind)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._timer is not None:
            self._timer.join(timeout=5)

    def _observe(self) -> tuple[Any, str]:
        """inotify (watchdog's native observer) where it can be had, else watchdog's polling observer."""
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        if self.polling:
            return self._started(PollingObserver(timeout=self.interval))
        try:
            return self._started(Observer(timeout=self.interval))
        except OSError as e:  # no inotify here: instances or watches exhausted, or not supported
            log.warning("feed watcher: no native file events (%s); polling every %.1f s", e, self.interval)
        return self._started(PollingObserver(timeout=self.interval))

    def _started(self, observer) -> tuple[Any, str]:
        from watchdog.observers.polling import PollingObserver

        observer.schedule(_feed_events(self), str(self.directory), recursive=False)
        observer.start()
        kind = "polling" if isinstance(observer, PollingObserver) else type(observer).__name__.removesuffix("Observer").lower()
        return observer, kind

    def _check_due(self) -> None:
        """The timer: checks each file when its settle time is up; sleeps until the next one."""
        while not self._stop.is_set():
            with self._lock:
                now = time.monotonic()
                due = [p for p, t in self._due.items() if t <= now]
                if not due:
                    self._lock.wait(min(self._due.values()) - now if self._due else None)
                    continue
                for p in due:
                    del self._due[p]
            for p in due:
                try:
                    self.fire_if_complete(p)
                except Exception:  # a watcher that dies silently is worse than one that logs and goes on
                    log.exception("feed watcher: checking %s failed", p)

    # -- the rules

    def changed(self, path: Path, now: float | None = None) -> None:
        """Created or written in place: check it once it has been stable for ``settle`` seconds."""
        if is_feed_name(path):
            self.fire_if_complete(path, now)

    def arrived(self, path: Path) -> None:
        """Renamed into the directory: the writer's sign that the file is complete."""
        if is_feed_name(path) and path.is_file():
            self._fire(path)

    def gone(self, path: Path) -> None:
        with self._lock:
            self._seen.pop(path, None)
            self._due.pop(path, None)

    def fire_if_complete(self, path: Path, now: float | None = None) -> bool:
        """Fire if size and mtime have not changed for ``settle`` seconds; otherwise check again when they may have."""
        now = time.monotonic() if now is None else now
        sig = _signature(path)
        if sig is None:
            self.gone(path)
            return False
        with self._lock:
            old = self._seen.get(path)
            if old is None or old[:2] != sig:
                self._seen[path] = (*sig, now)
                return self._schedule(path, now + self.settle)
            if now - old[2] < self.settle:
                return self._schedule(path, old[2] + self.settle)
        return self._fire(path)

    def scan(self, now: float | None = None) -> list[Path]:
        """The settle rule over every file of the directory; the files it fired on."""
        present = [Path(p) for p in list_feeds(self.directory)]
        fired = [p for p in present if self.fire_if_complete(p, now)]
        with self._lock:
            for gone in set(self._seen) - set(present):
                self.gone(gone)
        return fired

    def _schedule(self, path: Path, at: float) -> bool:
        with self._lock:
            self._due[path] = at
            self._lock.notify_all()
        return False

    def _fire(self, path: Path) -> bool:
        """Call ``on_feed`` unless this content of this path was fired on before."""
        from kedit.core.paths import sha256_file

        try:
            sha = sha256_file(path)
        except FileNotFoundError:
            self.gone(path)
            return False
        with self._lock:
            self._due.pop(path, None)
            if (path, sha) in self._done:
                return False
            self._done.add((path, sha))
        try:
            self.on_feed(path, sha)
        except Exception:  # a watcher that dies silently is worse than one that logs and goes on
            log.exception("feed watcher: on_feed(%s) failed", path)
        return True


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _feed_events(watcher: FeedWatcher):
    """A watchdog event handler that passes file events on to ``watcher``."""
    from watchdog.events import FileSystemEventHandler

    class FeedEvents(FileSystemEventHandler):
        def on_created(self, event) -> None:
            if not event.is_directory:
                watcher.changed(Path(event.src_path))

        on_modified = on_created

        def on_moved(self, event) -> None:
            if not event.is_directory:
                watcher.gone(Path(event.src_path))
                watcher.arrived(Path(event.dest_path))

        def on_deleted(self, event) -> None:
            if not event.is_directory:
                watcher.gone(Path(event.src_path))

    return FeedEvents()


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
