"""``kedit bench trigger``: from a completed feed file to the flow starting, and to its version in production.

A real stack on 127.0.0.1: a Prefect server (``kedit up``), ``kedit serve`` watching a directory, the
tiny trained model of ``kedit.app.tiny`` and a SQLite MLflow store. Feeds are dropped one at a time
(write-then-rename); for each, the flow run's start time comes from the Prefect API and the
version's arrival from polling the registry.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


def _post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def bench_trigger(n_feeds: int = 10, timeout: float = 300.0) -> dict:
    from datetime import datetime

    from kedit.app.servers import free_port, stop_group, up, wait_for
    from kedit.app.tiny import CORPUS, FTM, train_tiny, write_gates, write_jsonl
    from kedit.store.tracking import Tracker

    kedit = str(Path(sys.executable).parent / "kedit")
    with tempfile.TemporaryDirectory(prefix="kedit-bench-trigger-") as tmp:
        root = Path(tmp)
        port, mport = free_port(), free_port()
        os.environ.update(
            {
                "KEDIT_HOME": str(root / "home"),
                "PREFECT_HOME": str(root / "prefect"),
                "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "TQDM_DISABLE": "1",
            }
        )
        api = os.environ["PREFECT_API_URL"]
        uri = f"sqlite:///{root}/mlruns/mlflow.db"
        groups = [s.pid for s in up(port, mport, uri, root / "mlruns")]
        try:
            ck = train_tiny(root / "model")
            (root / "corpus.txt").write_text("\n".join(CORPUS))
            # permissive gates: this measures the trigger path, not edit quality
            gates = write_gates(
                root / "gates.yaml",
                edits={"efficacy_min": None},
                retention={"min": None},
                drawdown={"base_max": None, "step_max": None},
            )
            feeds = root / "feeds"
            feeds.mkdir()
            cmd = [kedit, "serve", "--feeds", str(feeds), "--model", str(ck), "--editor", "ft-m", "--gates", str(gates)]
            cmd += ["--tracking-uri", uri, "--corpus", str(root / "corpus.txt"), "--device", "cpu", "--name", "bench"]
            cmd += [arg for k, v in FTM.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
            with (root / "serve.log").open("wb") as out:
                serve = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            groups.append(serve.pid)
            wait_for(lambda: len(_post(f"{api}/deployments/filter", {})) >= 1, 180, "the deployment")
            tracker = Tracker(uri)
            rows = []
            for i in range(n_feeds):
                record = {
                    "id": f"bench-{i}",
                    "subject": "dave",
                    "prompt": "{} was born in",
                    "target_new": ["asia", "africa", "europe"][i % 3],
                    "timestamp": f"2025-01-{i + 1:02d}",
                }
                before = _production(tracker)
                tmp_file = write_jsonl(feeds / f".feed-{i}.jsonl.tmp", [record])
                final = feeds / f"feed-{i}.jsonl"
                tmp_file.rename(final)
                t_done = time.time()
                run = wait_for(lambda f=final: _flow_run(api, str(f.resolve())), timeout, f"the flow run of {final.name}")
                started = datetime.fromisoformat(run["start_time"].replace("Z", "+00:00")).timestamp()
                wait_for(lambda b=before: _production(tracker) not in (b, None), timeout, f"the version of {final.name}")
                t_version = time.time()
                rows.append({"feed": final.name, "to_flow_start_s": started - t_done, "to_production_s": t_version - t_done})
                log.info("%s: flow started after %.1f s, in production after %.1f s", final.name, *list(rows[-1].values())[1:])
        finally:
            for pgid in reversed(groups):
                stop_group(pgid, grace=10)
    starts = [r["to_flow_start_s"] for r in rows]
    prods = [r["to_production_s"] for r in rows]
    return {
        "feeds": rows,
        "to_flow_start": {"median_s": statistics.median(starts), "max_s": max(starts)},
        "to_production": {"median_s": statistics.median(prods), "max_s": max(prods)},
    }


def _production(tracker) -> str | None:
    names = [m.name for m in tracker.client.search_registered_models()]
    prod = tracker.production(names[0]) if names else None
    return prod.version if prod else None


def _flow_run(api: str, feed: str) -> dict | None:
    runs = _post(f"{api}/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}}})
    found = [r for r in runs if (r.get("parameters") or {}).get("feed") == feed and r.get("start_time")]
    return found[0] if found else None
