"""A federation over one data file (FLEKE's time slots): deal the facts to clients and slots → per slot, per
client: that client's stream on its slot feed (``flows.stream``, as a subflow), sharing target vectors through
the MKV store → the slots' table.

Each client is a stream like any other (its registered model ``<model>@<client>``, versions, production alias,
gates); what makes it a federation is only the shared MKV store. Clients run one after another here, on one
machine; clients on machines of their own run ``kedit serve --client`` instead, each on its own work pool. A
stream uploads when its version is in production, so within a slot a client also finds what the clients before
it uploaded in that slot (one order of what concurrent clients would see; FLEKE's slots upload at their end). Run
again, the same data and settings write the same slot feeds, and every client's stream skips what its chain
already holds: a federation killed mid-slot is resumed by running it again (its report is then the rerun's).
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from kedit.pipeline import slots
from kedit.pipeline.config import FederationConfig

from .stream import stream

QUICK = {"cache_policy": NO_CACHE, "persist_result": False, "retries": 0}
# reads tracking only: safe to repeat when the tracking server drops a request
READ = {"cache_policy": NO_CACHE, "persist_result": False, "retries": 2, "retry_delay_seconds": 1}


@task(name="deal-slot-feeds", **QUICK)
def deal_slot_feeds(cfg: FederationConfig) -> list[list[str]]:
    return slots.slot_feeds(cfg)


@task(name="slot-row", **READ)
def slot_row(cfg: FederationConfig, t: int, c: int, summary: dict) -> dict:
    return slots.slot_row(cfg, t, c, summary)


@task(name="summarize-federation", **QUICK)
def summarize_federation(rows: list[dict]) -> dict:
    return slots.federation_summary(rows)


@flow(name="kedit-federate", log_prints=False)
def federate(cfg: FederationConfig) -> dict:
    feeds = deal_slot_feeds(cfg)
    rows = []
    for t, row in enumerate(feeds):
        for c, feed in enumerate(row):
            summary = stream(cfg.client_stream(c, feed))
            # a stream's per-attempt steps stay in its own run: a task's parameters are hashed and stored
            rows.append(slot_row(cfg, t, c, {k: v for k, v in summary.items() if k != "steps"}))
    return summarize_federation(rows)
