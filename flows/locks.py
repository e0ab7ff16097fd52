"""One stream per model: a lock held from reading the production version to the stream's last version.

Two kinds, chosen by ``KEDIT_LOCK``:

- ``file`` (default): an OS advisory lock on ``$KEDIT_HOME/locks/<model>.lock``. Every stream of a
  model on this machine (the CLI, ``kedit serve``'s flow runs, tests) takes it; the kernel frees it
  the instant its holder dies, ``kill -9`` included, so a killed stream never blocks the next one.
  A local SQLite store is part of the lock's name (its resolved path, hashed): streams of one base model
  in two such stores (a benchmark's work dir and the project's) have nothing to wait for. Any other store
  (a server, which other URLs may name too) locks by the model alone.
- ``prefect``: a Prefect global concurrency limit of one slot per model, for workers on several
  machines sharing one Prefect server. The slot is a lease renewed while the stream lives; a stream
  killed with ``kill -9`` frees it when the lease expires (60 s, Prefect's minimum) and the server's
  repossessor service runs (every 15 s; it runs in ``prefect server start``, not in ephemeral servers).

A second stream waits, then continues from the version the first left in production.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def limit_name(registered: str) -> str:
    return f"kedit-stream-{registered}"


def lock_kind() -> str:
    kind = os.environ.get("KEDIT_LOCK", "file")
    if kind not in ("file", "prefect"):
        from kedit.core.errors import KeditError

        raise KeditError(f"KEDIT_LOCK must be 'file' or 'prefect', not {kind!r}")
    return kind


def ensure_limit(name: str) -> None:
    """Create the one-slot limit if it does not exist (Prefect requires limits to exist before use)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:  # created by a concurrent stream
            pass


def lease_seconds() -> float:
    return max(60.0, float(os.environ.get("KEDIT_LOCK_LEASE_S", "60")))


def file_lock_name(registered: str, store: str | None) -> str:
    """The file lock's name: the model's, and a local SQLite store's resolved path (hashed) when there is one."""
    from kedit.store.tracking import sqlite_path

    db = sqlite_path(store)
    if db is None:
        return limit_name(registered)
    return f"{limit_name(registered)}-{hashlib.sha256(str(db).encode()).hexdigest()[:12]}"


@contextmanager
def one_stream_per_model(registered: str, store: str | None = None) -> Iterator[None]:
    """Held while a stream (or a rollback or squash) of ``registered`` in the store at ``store`` (a tracking URI,
    resolved) works on its production chain."""
    name = limit_name(registered)
    log.info("waiting for the model's stream lock %s (%s)", name, lock_kind())
    if lock_kind() == "prefect":
        from prefect.concurrency.sync import concurrency

        ensure_limit(name)
        with concurrency(name, occupy=1, strict=True, lease_duration=lease_seconds()):
            log.info("holding %s", name)
            yield
        return
    from filelock import FileLock

    from kedit.core.paths import kedit_home

    path = kedit_home() / "locks" / f"{file_lock_name(registered, store)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        log.info("holding %s", path)
        yield
