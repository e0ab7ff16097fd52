"""``kedit bench watch``: the feed watcher alone, from a complete feed file to the ``on_feed`` call.

One process, three watchers of ``flows.serve.FeedWatcher``'s rules, each on its own directory:

- ``polling-loop``: the watcher as it was before watchdog: a thread calling ``scan()`` every
  ``interval`` seconds (first sight, then ``settle`` seconds unchanged);
- ``inotify``: watchdog's native observer (events; a renamed file fires at once);
- ``watchdog-polling``: watchdog's polling observer, the fallback where inotify is unavailable.

Two ways of writing: ``rename`` (write ``.x.tmp``, rename it to ``x.jsonl``; the clock starts at the
rename) and ``in_place`` (one write to ``x.jsonl``; the clock starts when the file is closed). Feeds
are dropped one at a time, at a random phase against the polling interval.

Run: ``kedit bench watch --n 10 --json docs/bench_watch.json``.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

WATCHERS = ("polling-loop", "inotify", "watchdog-polling")
WRITES = ("rename", "in_place")


class Arrivals:
    """The ``on_feed`` callback: records when each file fired."""

    def __init__(self) -> None:
        self.fired: dict[str, list[float]] = {}
        self._cond = threading.Condition()

    def __call__(self, path: Path, sha: str) -> None:
        with self._cond:
            self.fired.setdefault(path.name, []).append(time.monotonic())
            self._cond.notify_all()

    def wait(self, name: str, timeout: float) -> float | None:
        with self._cond:
            self._cond.wait_for(lambda: name in self.fired, timeout)
            return self.fired[name][0] if name in self.fired else None


def _write(directory: Path, name: str, how: str, body: str) -> float:
    """Write a complete feed; the time it became complete (rename, or close of the in-place write)."""
    if how == "rename":
        tmp = directory / f".{name}.tmp"
        tmp.write_text(body)
        tmp.rename(directory / name)
    else:
        (directory / name).write_text(body)
    return time.monotonic()


def _start(kind: str, directory: Path, on_feed: Callable, interval: float, settle: float) -> Callable[[], None]:
    """Start a watcher of ``kind``; return its stop function."""
    from flows.serve import FeedWatcher

    w = FeedWatcher(directory, on_feed, interval=interval, settle=settle, polling=kind == "watchdog-polling")
    if kind != "polling-loop":
        w.start()
        if kind == "inotify" and w.kind != "inotify":
            log.warning("no inotify here: the 'inotify' row measured %s", w.kind)
        return w.stop

    stop = threading.Event()

    def loop() -> None:  # the pre-watchdog FeedWatcher.run
        while not stop.is_set():
            w.scan()
            stop.wait(interval)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return lambda: (stop.set(), t.join())


def _measure(kind: str, how: str, n: int, interval: float, settle: float, timeout: float) -> list[float]:
    with tempfile.TemporaryDirectory(prefix=f"kedit-bench-watch-{kind}-") as tmp:
        directory, arrivals = Path(tmp), Arrivals()
        stop = _start(kind, directory, arrivals, interval, settle)
        rng = random.Random(0)
        out = []
        try:
            for i in range(n):
                time.sleep(rng.uniform(0, interval))  # a random phase against the polling interval
                name = f"feed-{i}.jsonl"
                t0 = _write(directory, name, how, json.dumps({"id": f"w{i}", "subject": "dave"}) + "\n")
                fired = arrivals.wait(name, timeout)
                if fired is None:
                    raise TimeoutError(f"{kind}/{how}: {name} did not fire within {timeout} s")
                out.append(fired - t0)
            time.sleep(settle + 2 * interval)  # late duplicates would show here
            doubles = {k: len(v) for k, v in arrivals.fired.items() if len(v) > 1}
            if doubles:
                raise AssertionError(f"{kind}/{how}: fired more than once: {doubles}")
        finally:
            stop()
    return out


def _stats(xs: list[float]) -> dict:
    return {"median_s": round(statistics.median(xs), 4), "min_s": round(min(xs), 4), "max_s": round(max(xs), 4)}


def bench_watch(n: int = 10, settle: float = 1.0, interval: float = 0.5, timeout: float = 30.0) -> dict:
    import watchdog.version

    results: dict[str, dict] = {}
    for kind in WATCHERS:
        for how in WRITES:
            xs = _measure(kind, how, n, interval, settle, timeout)
            results.setdefault(kind, {})[how] = {**_stats(xs), "samples_s": [round(x, 4) for x in xs]}
            log.info("%s, %s: median %.3f s, max %.3f s", kind, how, statistics.median(xs), max(xs))
    return {
        "what": "complete feed file (rename, or close of an in-place write) -> FeedWatcher on_feed call, one process",
        "n_per_cell": n,
        "settle_s": settle,
        "interval_s": interval,
        "watchdog": watchdog.version.VERSION_STRING,
        "platform": platform.platform(),
        "summary": {
            kind: {how: {k: v for k, v in r.items() if k != "samples_s"} for how, r in rows.items()}
            for kind, rows in results.items()
        },
        "results": results,
    }
