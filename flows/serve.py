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

Confinement: the events API is open to anyone who can reach the Prefect server, so an event (or a
flow run created by hand) chooses a feed, never the configuration. ``kedit serve`` writes a
``ServePolicy`` (the feed directories, the served model, editor, tracking URI, overrides, device and
batch size, and the files the gates, corpus and work dir may name) to a file and points
``KEDIT_SERVE_POLICY`` at it before serving; Prefect's runner starts every flow run in a subprocess
that inherits the serving process's environment, and it applies no per-run environment, so a flow
run's parameters cannot lift the policy. Under a policy, a parameter other than the served one fails
the flow run; a feed that does not resolve inside a feed directory (a symlink out of it included) or
that is not a regular file is *refused*: recorded in the ledger as ``refused`` with the reason, and
never read. Without a policy (the flow run directly) any feed path is accepted, but only a regular file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from kedit.core.errors import KeditError
from kedit.core.facts import is_feed_name, list_feeds

log = logging.getLogger(__name__)

FEED_EVENT = "kedit.feed.arrived"
POLICY_ENV = "KEDIT_SERVE_POLICY"  # path of the serving policy (JSON) that every flow run of `kedit serve` inherits
REFUSED = "refused"  # the ledger status of a feed that was not read
T_FEED_REASON = "kedit.feed_reason"  # why a feed was refused

# ----------------------------------------------------------------------------- confinement


class FeedRefused(KeditError):
    """A feed path that is not read: outside the feed directories, a symlink out of them, or not a regular file."""


class ParameterRefused(KeditError):
    """A flow run's parameter that the serving policy does not allow: events choose feeds, not the configuration."""


def confine(path: str | Path, dirs: Iterable[str | Path] | None = None) -> Path:
    """The real path of the feed ``path``, once it is known to be safe to read; else ``FeedRefused`` with the reason.

    The path is resolved (every symlink followed, strictly: it must exist); with ``dirs`` (resolved
    directories) the result must lie inside one of them, so a symlink whose target is outside is
    refused, and the name must be a feed's (not hidden, not partial). The file itself must be a regular
    file: a FIFO would block the reader, a device would never end. The reason names paths, never content.
    """
    p = Path(path)
    try:
        link = p.lstat()
    except FileNotFoundError:
        raise FeedRefused(f"{p}: no such file") from None
    except OSError as e:
        raise FeedRefused(f"{p}: cannot be examined ({e.strerror})") from None
    except ValueError as e:  # an embedded NUL: no file has that name
        raise FeedRefused(f"{str(p)!r}: not a path ({e})") from None
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # a dangling link, a loop (RuntimeError before Python 3.13), a permission
        raise FeedRefused(f"{p}: does not resolve to a file ({getattr(e, 'strerror', None) or e})") from None
    what = f"a symlink to {real}" if stat.S_ISLNK(link.st_mode) else "a path"
    if dirs is not None:
        roots = [Path(d) for d in dirs]
        if not any(real != d and real.is_relative_to(d) for d in roots):
            raise FeedRefused(f"{p}: {what}, outside the feed directories {', '.join(map(str, roots))}")
        if not is_feed_name(p):
            raise FeedRefused(f"{p}: not a feed's name (hidden, partial or an unknown suffix)")
    try:
        st = real.stat()
    except OSError as e:
        raise FeedRefused(f"{p}: cannot be examined ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise FeedRefused(f"{p}: {kind}, not a regular file" + (f" ({what})" if stat.S_ISLNK(link.st_mode) else ""))
    return real


def path_allowed(value: str | Path | None, exact: Iterable[str | None], within: Iterable[str]) -> bool:
    """``value`` (resolved) is one of ``exact`` or lies inside one of the directories ``within``; None only if in ``exact``."""
    if value is None:
        return None in exact
    try:
        real = Path(value).resolve()
    except (ValueError, OSError, RuntimeError):  # an embedded NUL, a link loop: not a path anyone allowed
        return False
    if any(e is not None and real == Path(e) for e in exact):
        return True
    return any(real.is_relative_to(Path(d)) for d in within)


# an event may not change these (a federated client's name and store included: a run cannot act as another client)
FIXED = ("model", "editor", "tracking_uri", "overrides", "device", "batch_size", "limits")
FIXED += ("client", "mkv", "mkv_threshold", "mkv_refine")
ALLOWED_FILES = ("gates", "corpus", "work_dir")  # these may name only the served file or one under an --allow path


@dataclass(frozen=True)
class ServePolicy:
    """What the flow runs of one ``kedit serve`` may do: read feeds from ``feed_dirs``, with the served configuration."""

    feed_dirs: tuple[str, ...]
    fixed: dict[str, Any] = field(default_factory=dict)  # FIXED -> served value
    files: dict[str, str | None] = field(default_factory=dict)  # ALLOWED_FILES -> served path (resolved) or None
    allow: tuple[str, ...] = ()  # resolved: files under these may be named by gates, corpus and work_dir too
    signing_key_id: str | None = None  # KEDIT_SIGNING_KEY's id when served; a run must hold the same key

    @classmethod
    def served(cls, feed_dirs: Iterable[str | Path], params: dict[str, Any], allow: Iterable[str | Path] = ()) -> ServePolicy:
        """The policy of a deployment served with ``params`` (the flow's parameters, without ``feed``)."""
        from kedit.store.versions import key_id, signing_key

        key = signing_key()
        # a parameter the deployment leaves out runs at the flow's default: the policy must hold that value,
        # or a run that also leaves it out would be refused
        params = {**_flow_defaults(), **params}
        return cls(
            feed_dirs=tuple(str(Path(d).resolve()) for d in feed_dirs),
            fixed={k: _normal(k, params.get(k)) for k in FIXED},
            files={k: str(Path(params[k]).resolve()) if params.get(k) is not None else None for k in ALLOWED_FILES},
            allow=tuple(str(Path(a).resolve()) for a in allow),
            signing_key_id=key_id(key) if key else None,
        )

    def check_environment(self) -> None:
        """The run must verify and sign versions with the key the deployment was served with: a run whose
        environment was changed (a worker's job variables) to drop or swap the key is refused."""
        from kedit.store.versions import key_id, signing_key

        key = signing_key()
        have = key_id(key) if key else None
        if have != self.signing_key_id:
            raise ParameterRefused(
                f"this run's signing key ({have or 'none'}) is not the one served ({self.signing_key_id or 'none'}): "
                "refusing to run with a changed environment"
            )

    def check(self, params: dict[str, Any]) -> None:
        """Raise ``ParameterRefused`` for the first parameter the policy does not allow (``feed`` is ``confine``'s);
        one left out is the flow's default."""
        params = {**_flow_defaults(), **params}
        for k in FIXED:
            if _normal(k, params.get(k)) != self.fixed.get(k):
                raise ParameterRefused(
                    f"parameter {k}={params.get(k)!r} is not the served {self.fixed.get(k)!r}: "
                    "a flow run of `kedit serve` chooses a feed, not the configuration"
                )
        for k in ALLOWED_FILES:
            if not path_allowed(params.get(k), [self.files.get(k)], self.allow):
                raise ParameterRefused(
                    f"parameter {k}={params.get(k)!r} is neither the served {self.files.get(k)!r} nor under an allowed path"
                    f" ({', '.join(self.allow) or 'none: kedit serve --allow PATH adds some'})"
                )
        feeds_dir = params.get("feeds_dir")
        if feeds_dir is not None and str(Path(feeds_dir).resolve()) not in self.feed_dirs:
            served = ", ".join(self.feed_dirs)
            raise ParameterRefused(f"parameter feeds_dir={feeds_dir!r} is not a served feed directory ({served})")

    def write(self, path: Path) -> Path:
        """Atomically, readable by this user only."""
        from kedit.core.paths import write_atomic

        return write_atomic(path, json.dumps(asdict(self), indent=2), mode=0o600)

    @classmethod
    def read(cls, path: str | Path) -> ServePolicy:
        d = json.loads(Path(path).read_text())
        # a fixed parameter added to the flow after the file was written ran at its default when it was served
        since = {k: _normal(k, v) for k, v in _flow_defaults().items() if k in FIXED and k not in d["fixed"]}
        return cls(tuple(d["feed_dirs"]), since | d["fixed"], d["files"], tuple(d["allow"]), d.get("signing_key_id"))


def _flow_defaults() -> dict[str, Any]:
    """``process_feeds``' parameters that have a default, with it."""
    import inspect

    sig = inspect.signature(process_feeds.fn)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _normal(key: str, value: Any) -> Any:
    """A parameter as JSON would carry it, so that a served value and the same value from the API compare equal."""
    if key == "overrides" and not value:
        value = {}
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def active_policy() -> ServePolicy | None:
    """The serving policy this process inherited from ``kedit serve``, or None when the flow is called
    directly (tests, scripts). It fails closed: a policy named but unreadable, or a run of a deployment
    with no policy at all (a worker's job variables can rewrite the environment: emptying
    ``KEDIT_SERVE_POLICY`` must not lift the confinement), refuses to run."""
    from prefect.runtime import deployment

    path = os.environ.get(POLICY_ENV)
    if not path:
        if deployment.id:
            raise ParameterRefused(
                f"a deployment's flow run needs kedit serve's policy and {POLICY_ENV} is not set; refusing to run "
                "(workers: `kedit serve --write-policy FILE` writes one; set the variable in the worker's own environment)"
            )
        return None
    try:
        policy = ServePolicy.read(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ParameterRefused(f"{POLICY_ENV}={path}: the serving policy cannot be read ({e}); refusing to run") from None
    policy.check_environment()
    return policy


def refused_sha(path: str | Path) -> str:
    """The ledger key of a refused feed: never a content hash (it is not read), so it never marks content as processed."""
    return f"{REFUSED}:{hashlib.sha256(str(path).encode()).hexdigest()}"


@task(name="record-refused", cache_policy=NO_CACHE, persist_result=False)
def record_refused(refused: list[tuple[str, str]], model: str, tracking_uri: str | None, client: str | None = None) -> None:
    """One ledger entry per refused feed path (in the ``client``'s ledger in a federation): status ``refused``, the
    reason, and no content (the file was never opened). A path refused before is not recorded again: a cron tick
    or a repeated event cannot grow the ledger without bound."""
    from kedit.store.naming import for_client, identify
    from kedit.store.tracking import Tracker

    name = for_client(identify(model)[0], client)
    tracker = Tracker(tracking_uri)
    ledger = tracker.feed_ledger(name)
    for path, reason in refused:
        if refused_sha(path) in ledger:
            log.info("feed %s was refused before: not recorded again", path)
            continue
        run = tracker.record_feed(name, None, path, refused_sha(path), REFUSED, {}, [{"file": path, "reason": reason}])
        tracker.set_tags(run, {T_FEED_REASON: reason[:4000]})


@task(name="new-feeds", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=1)
def new_feeds(paths: list[str], model: str, tracking_uri: str | None, client: str | None = None) -> list[str]:
    """The feeds whose content hash is not in the ledger of the model (of its ``client``'s registered model in a
    federation: another client's, or the base's, ledger says nothing about this one) yet, hashed as the loader
    reads them: no link followed, no FIFO blocked on. One that cannot be read as a feed goes on to the stream,
    which records it as invalid with the reason."""
    from kedit.core.facts import FactFileError, feed_sha256
    from kedit.store.naming import for_client, identify
    from kedit.store.tracking import Tracker

    name = for_client(identify(model)[0], client)
    ledger = Tracker(tracking_uri).feed_ledger(name)
    fresh = []
    for p in paths:
        try:
            seen = feed_sha256(p) in ledger
        except FactFileError as e:
            log.warning("feed %s", e)
            seen = False
        if seen:
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
    limits: dict[str, Any] | None = None,
    client: str | None = None,
    mkv: str | None = None,
    mkv_threshold: float = 0.99,
    mkv_refine: bool = False,
) -> dict:
    """Run the stream on one arrived feed, or on every new feed of a directory (as federated client ``client``,
    sharing target vectors through the MKV store ``mkv``, when given).

    Under ``kedit serve``'s policy (see the module's docstring) a parameter other than the served one
    fails the run, and a feed outside the feed directories is refused; a refused feed is recorded,
    never read.
    """
    from kedit.core.config import from_mapping
    from kedit.core.facts import Limits
    from kedit.pipeline.config import StreamConfig

    from .stream import stream

    settings = dict(
        model=model,
        editor=editor,
        batch_size=batch_size,
        gates=gates,
        tracking_uri=tracking_uri,
        corpus=corpus,
        overrides=overrides or {},
        device=device,
        client=client,
        mkv=mkv,
        mkv_threshold=mkv_threshold,
        mkv_refine=mkv_refine,
    )
    policy = active_policy()
    if policy is not None:
        policy.check({**settings, "feeds_dir": feeds_dir, "work_dir": work_dir, "limits": limits})
    candidates = [feed] if feed else list_feeds(feeds_dir or (policy.feed_dirs[0] if policy else "."))
    paths, refused = [], []
    for p in candidates:
        try:
            paths.append(str(confine(p, policy.feed_dirs if policy else None)))
        except FeedRefused as e:
            log.warning("feed refused, not read: %s", e)
            refused.append((str(p), str(e)))
    if refused:
        record_refused(refused, model, tracking_uri, client)
    fresh = new_feeds(paths, model, tracking_uri, client) if paths else []
    if not fresh:
        return {"feeds": [], "skipped": paths, "refused": [r for r, _ in refused]}
    checked = from_mapping(Limits, limits or {}, "the flow run's limits")
    return stream(StreamConfig(feeds=tuple(fresh), work_dir=str(run_dir(work_dir)), limits=checked, **settings))


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
        # resolved once: the paths passed on are the directory's own entries, absolute, never a link's target
        self.directory, self.on_feed, self.interval, self.settle = Path(directory).resolve(), on_feed, interval, settle
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
        """Call ``on_feed`` unless this content of this path was fired on before, or the path is not a regular
        file inside the directory (a symlink out of it, a FIFO): those are never read, and passed on as they are named."""
        from kedit.core.facts import FactFileError, feed_sha256

        try:
            sha = feed_sha256(confine(path, [self.directory]))
        except FileNotFoundError:
            self.gone(path)
            return False
        except (FeedRefused, FactFileError) as e:
            if not os.path.lexists(path):
                self.gone(path)
            else:
                log.warning("feed watcher: skipped, not read: %s", e)
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
    except OSError:  # gone, a dangling link, a link loop
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
            payload={"path": str(path.absolute()), "sha256": sha},  # the directory's entry, not where a link points
        )
        log.info("feed arrived: %s (sha256 %s…) → event %s", path, sha[:12], FEED_EVENT)

    return emit


# ----------------------------------------------------------------------------- deployments


def _on_feed(target: str):
    """The trigger of a target's event deployment: a feed arrived for it, its path becomes the run's ``feed``."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"{target}: feed arrived",
        expect={FEED_EVENT},
        match={"kedit.target": target},
        parameters={"feed": "{{ event.payload.path }}"},
    )


def build_deployments(target: str, params: dict[str, Any], cron: str | None):
    """The event-triggered deployment and, with ``cron``, the scheduled one; both run ``kedit-feeds``."""
    tags = ["kedit", target]
    deps = [process_feeds.to_deployment(name=f"{target}-on-feed", parameters=params, triggers=[_on_feed(target)], tags=tags)]
    if cron:
        deps.append(process_feeds.to_deployment(name=f"{target}-cron", cron=cron, parameters=params, tags=tags))
    return deps


SOURCE = Path(__file__).resolve().parents[1]  # where workers find flows/serve.py (the same path on their machines)


def deploy_to_pool(target: str, params: dict[str, Any], cron: str | None, pool: str) -> list[str]:
    """The same deployments on the process work pool ``pool`` (created if missing), for workers to run
    (``prefect worker start --pool POOL`` with ``KEDIT_SERVE_POLICY`` set): a federated client on its own pool
    is a worker wherever that pool's workers are. Returns the deployment ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
    flow = process_feeds.from_source(source=str(SOURCE), entrypoint="flows/serve.py:process_feeds")
    common = dict(work_pool_name=pool, build=False, push=False, parameters=params, tags=["kedit", target], print_next_steps=False)
    ids = [str(flow.deploy(name=f"{target}-on-feed", triggers=[_on_feed(target)], **common))]
    if cron:
        ids.append(str(flow.deploy(name=f"{target}-cron", cron=cron, **common)))
    return ids


def served_policy(
    feeds_dir: Path, model: str, editor: str, params: dict[str, Any], allow: Iterable[Path] = ()
) -> tuple[dict[str, Any], ServePolicy]:
    """The deployments' full parameters and the policy that fixes them (``kedit serve``, ``--write-policy``)."""
    full = {"model": model, "editor": editor, "feeds_dir": str(feeds_dir.resolve()), **params}
    return full, ServePolicy.served([feeds_dir], full, allow)


def serve(
    feeds_dir: Path,
    model: str,
    editor: str,
    cron: str | None,
    target: str,
    params: dict[str, Any],
    limit: int = 2,
    allow: Iterable[Path] = (),
    pool: str | None = None,
) -> None:
    """Register the deployments, start the watcher, and execute flow runs here until interrupted; with ``pool``,
    the deployments go to that work pool and its workers execute the runs (this process only watches).

    The flow runs are confined by a ``ServePolicy`` of the served parameters (``allow``: paths under
    which the gates, corpus and work dir parameters may also name files), written next to the work
    dir and passed to every flow run through the environment, which Prefect's runner hands on (a pool's
    workers set it in their own environment)."""
    import time

    from prefect import serve as prefect_serve

    feeds_dir.mkdir(parents=True, exist_ok=True)
    full, policy = served_policy(feeds_dir, model, editor, params, allow)
    written = policy.write(Path(full["work_dir"]) / "serve-policy.json")
    os.environ[POLICY_ENV] = str(written)
    watcher = FeedWatcher(feeds_dir, emit_feed_event(target))
    try:
        if pool:
            deploy_to_pool(target, full, cron, pool)
            log.info("deployed %s to work pool %s: run workers with %s=%s", target, pool, POLICY_ENV, written)
        else:
            deps = build_deployments(target, full, cron)
        watcher.start()
        log.info("watching %s for feeds (target %s)%s", feeds_dir, target, f", schedule {cron!r}" if cron else "")
        if pool:
            while True:
                time.sleep(1.0)
        prefect_serve(*deps, limit=limit)
    finally:
        watcher.stop()
        os.environ.pop(POLICY_ENV, None)
