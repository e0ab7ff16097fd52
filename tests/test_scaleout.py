"""Scale-out on real backends: Prefect and MLflow servers on PostgreSQL, two workers on one pool, one killed mid-stream.

Runs ``kedit bench scaleout`` (about 4 minutes on 2 cores), whose ``invariants`` raise on any violation: each feed
content processed once, no two streams of the model overlapping, a linear chain that names each fact once and
rebuilds verified from the PostgreSQL-backed registry, every fact in the chain or quarantined, the servers' rows
in PostgreSQL. Needs Debian's ``postgresql`` package (and ``runuser`` when run as root); skipped without it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kedit.app.bench_scaleout import ScaleoutError, facts


def _postgres() -> bool:
    found = any(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb")
    return bool(found) and (os.geteuid() != 0 or shutil.which("runuser") is not None)


def test_the_tiny_facts_are_distinct_and_bounded():
    every = facts(0, 20, "x")
    assert len({(f["subject"], f["prompt"]) for f in every}) == 20
    with pytest.raises(ScaleoutError, match="only 20 distinct facts"):
        facts(15, 6, "x")


@pytest.mark.skipif(not _postgres(), reason="needs Debian's postgresql package")
def test_postgres_servers_two_workers_and_a_worker_killed_mid_stream_lose_nothing(tmp_path):
    from kedit.app.bench_scaleout import bench_scaleout

    out = bench_scaleout(workers=2, json_out=tmp_path / "scaleout.json")
    assert out["concurrent"]["states"] == ["COMPLETED"] * 5
    assert out["kill"]["resent_state"] == "COMPLETED"
    inv = out["invariants"]
    assert inv["feed_contents_once"] == 5 and inv["streams_killed"] == 1
    assert inv["facts"] == 20 == inv["facts_in_chain"] + inv["facts_quarantined"]
    assert inv["chain_versions"] >= 2 and inv["mlflow_model_versions_in_postgres"] == inv["chain_versions"] + len(
        inv["orphan_versions"]
    )
    assert inv["prefect_flow_runs_in_postgres"] >= 7  # the 5 concurrent, the killed one and the one sent again
