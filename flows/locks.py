"""One stream per model: a Prefect global concurrency limit of one slot per registered model.

Every stream of a model, whoever starts it (the CLI, a schedule, a feed event, a worker on
another machine), takes the model's slot before touching its production version; a second
stream waits, then continues from the version the first one left in production.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def limit_name(registered: str) -> str:
    return f"kedit-stream-{registered}"


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
    """How long a slot outlives a holder that died without releasing it (kill -9); renewed while alive.

    Prefect's server accepts 60 s at least, and revokes expired leases every 15 s by default.
    """
    return max(60.0, float(os.environ.get("KEDIT_LOCK_LEASE_S", "60")))


@contextmanager
def one_stream_per_model(registered: str) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    name = limit_name(registered)
    ensure_limit(name)
    log.info("waiting for the model's stream slot %s", name)
    with concurrency(name, occupy=1, strict=True, lease_duration=lease_seconds()):
        log.info("holding %s", name)
        yield
