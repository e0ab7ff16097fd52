"""``kedit bench scaleout``: the multi-host layout for real, on one machine.

PostgreSQL (Debian's package, started on 127.0.0.1 by ``scripts/postgres.sh``) backs both the Prefect server and
the MLflow tracking server, which ``kedit up`` starts. A process work pool gets the feed flow
(``flows/serve.py:process_feeds``) as a deployment, as ``kedit serve --pool`` deploys it, and ``workers``
Prefect workers pull from it under ``KEDIT_LOCK=prefect`` (the stream lock is then the Prefect server's, as it
must be across machines). Then:

1. **concurrent feeds**: flow runs for several feeds (one of them the same content under another name) are
   created at once, for the workers to take in parallel;
2. **a worker killed mid-stream**: a longer feed's run is started, and once its first version is in production,
   the run's process and its worker are killed with SIGKILL (a machine that dies); the feed is sent again and a
   surviving worker finishes it.

Checked afterwards, from the stores themselves: each feed content processed exactly once; no two streams of the
model overlapped; the production chain is linear, names each fact once, and rebuilds from the PostgreSQL-backed
registry with every hash verified; every fact of every feed is in the chain or quarantined; and both servers'
tables really are in PostgreSQL (row counts read with psql).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kedit.core.errors import KeditError

from .bench import machine, save_json
from .servers import free_port, group_members, rest_call, stop_group, wait_for

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
POSTGRES = REPO / "scripts" / "postgres.sh"
POOL = "kedit-scaleout"
TARGET = "scaleout"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# facts over the tiny model's vocabulary (kedit.app.tiny.WORDS): (subject, prompt) slots, each edited once
SUBJECTS = ("alice", "bob", "carol", "dave", "eve")
PROMPTS = (("{} was born in", "asia"), ("{} speaks", "german"), ("{} leads the", "company"), ("{} is located in", "africa"))


class ScaleoutError(KeditError):
    pass


def facts(first: int, n: int, tag: str) -> list[dict]:
    """n distinct facts from slot ``first`` on (20 slots in all)."""
    slots = [(s, p, new) for p, new in PROMPTS for s in SUBJECTS]
    if first + n > len(slots):
        raise ScaleoutError(f"only {len(slots)} distinct facts over the tiny vocabulary")
    return [
        {"id": f"{tag}-{i}", "subject": s, "prompt": p, "target_new": new, "timestamp": f"2025-01-{i + 1:02d}"}
        for i, (s, p, new) in enumerate(slots[first : first + n])
    ]


class Stack:
    """PostgreSQL, both servers, the work pool and its workers under one temporary root; ``close`` stops all."""

    def __init__(self, root: Path):
        self.root = root
        self.pg = root / "pg"
        self.pg_port, self.prefect_port, self.mlflow_port = free_port(), free_port(), free_port()
        self.workers: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}
        self.urls: dict[str, str] = {}
        self.up = False

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def start(self) -> None:
        out = subprocess.run([str(POSTGRES), "start", str(self.pg), str(self.pg_port)], capture_output=True, text=True)
        if out.returncode:
            raise ScaleoutError(f"scripts/postgres.sh start failed: {out.stderr or out.stdout}")
        self.urls = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.root / "prefect"),
            "PREFECT_API_URL": self.api,
            "PREFECT_API_DATABASE_CONNECTION_URL": self.urls["prefect"],
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "KEDIT_HOME": str(self.root / "home"),
            "KEDIT_LOCK": "prefect",
            "TQDM_DISABLE": "1",
        }
        kedit = str(Path(sys.executable).parent / "kedit")
        cmd = [kedit, "up", "--prefect-port", str(self.prefect_port), "--mlflow-port", str(self.mlflow_port)]
        up = subprocess.run([*cmd, "--tracking-uri", self.urls["mlflow"]], env=self.env, cwd=self.root, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
        self.up = True
        if up.returncode:
            raise ScaleoutError(f"kedit up failed: {up.stdout}{up.stderr}")

    def prefect(self, *args: str) -> str:
        out = subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], env=self.env, cwd=self.root,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        if out.returncode:
            raise ScaleoutError(f"prefect {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout

    def deploy(self, params: dict[str, Any]) -> str:
        """``kedit serve --pool``'s deployment of the feed flow (its event trigger unused here), in the stack's env."""
        script = f"from flows.serve import deploy_to_pool\ndeploy_to_pool({TARGET!r}, {params!r}, None, {POOL!r})\n"
        out = subprocess.run([sys.executable, "-c", script], env=self.env, cwd=self.root, capture_output=True, text=True,
                             timeout=180)  # fmt: skip
        if out.returncode:
            raise ScaleoutError(f"deploying the feed flow failed: {out.stdout}{out.stderr}")
        return next(d["id"] for d in self.call("POST", "/deployments/filter", {}) if d["name"] == f"{TARGET}-on-feed")

    def start_worker(self, name: str, policy: Path) -> None:
        from flows.serve import POLICY_ENV

        logf = (self.root / f"worker-{name}.log").open("wb")
        self.workers[name] = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
             "--name", name, "--limit", "1"],  # one run at a time each: two runs in flight means two workers
            env={**self.env, POLICY_ENV: str(policy)}, cwd=self.root, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        return rest_call(self.api, method, path, body)

    def run_feed(self, deployment: str, feed: Path) -> str:
        return self.call("POST", f"/deployments/{deployment}/create_flow_run", {"parameters": {"feed": str(feed)}})["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.call("GET", f"/flow_runs/{run_id}")

    def psql(self, db: str, query: str) -> str:
        cmd = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        binary = sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))
        cmd += [str(binary[-1]) if binary else "psql", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "kedit", "-d", db,
                "-tAc", query]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    def close(self) -> None:
        for proc in self.workers.values():
            stop_group(proc.pid, grace=10)
        if self.up:
            kedit = str(Path(sys.executable).parent / "kedit")
            subprocess.run([kedit, "down"], env=self.env, cwd=self.root, capture_output=True, timeout=120)
        if (self.pg / "data").is_dir():
            subprocess.run([str(POSTGRES), "stop", str(self.pg)], capture_output=True, timeout=120)


def wait_runs(stack: Stack, run_ids: list[str], timeout: float, took: dict[str, str]) -> dict[str, dict]:
    """Poll until every run has ended; ``took`` gets, per run seen running, the worker whose process runs it."""

    def done():
        runs = {r: stack.flow_run(r) for r in run_ids}
        for r, v in runs.items():
            if v["state_type"] == "RUNNING" and r not in took and (w := worker_of(stack, v)):
                took[r] = w
        return runs if all(v["state_type"] in TERMINAL for v in runs.values()) else None

    return wait_for(done, timeout, f"{len(run_ids)} flow run(s) to end", interval=1.0)


def worker_of(stack: Stack, run: dict) -> str | None:
    """The worker whose process tree holds the run's process (a process worker records it as host:pid)."""
    if not run.get("infrastructure_pid"):
        return None
    pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])
    return next((w for w, proc in stack.workers.items() if pid in _descendants(proc.pid)), None)


def kill_mid_stream(stack: Stack, run_id: str, tracker, name: str, before: str | None, timeout: float) -> dict:
    """Once the run's stream has put a new version in production, SIGKILL the run's process and its worker."""
    wait_for(lambda: (p := tracker.production(name)) is not None and p.version != before, timeout,
             "the long feed's first version", interval=0.5)  # fmt: skip
    run = stack.flow_run(run_id)
    pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])
    worker = worker_of(stack, run)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    os.killpg(stack.workers[worker].pid, signal.SIGKILL)
    wait_for(lambda: not group_members(stack.workers[worker].pid), 30, "the killed worker's processes to go")
    del stack.workers[worker]
    production = tracker.production(name).version
    return {"worker": worker, "flow_run_pid": pid, "killed_at": killed_at, "production_when_killed": production}


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def invariants(stack: Stack, ck: Path, feeds: dict[str, list[dict]]) -> dict:
    """What must hold after the runs, read back from the stores; raises ScaleoutError naming what does not."""
    from kedit.core.facts import EditRequest
    from kedit.core.models import load_model
    from kedit.core.paths import sha256_file
    from kedit.store.tracking import Tracker
    from kedit.store.versions import rebuild

    tracker = Tracker(stack.tracking_uri)
    name = tracker.client.search_registered_models()[0].name
    problems = []
    # exactly once per feed content
    shas = [r.data.tags.get("kedit.feed_sha256") for r in tracker.runs(name, "feed")]
    contents = {sha256_file(Path(f)) for f in feeds}
    once = {s: shas.count(s) for s in contents}
    if any(n != 1 for n in once.values()):
        problems.append(f"feed contents recorded other than once: {once}")
    # one stream at a time: finished streams' [start, end] do not overlap
    streams = sorted((r.info.start_time, r.info.end_time or 0, r.info.status) for r in tracker.runs(name, "stream"))
    finished = [(s, e) for s, e, status in streams if status == "FINISHED"]
    overlaps = sum(1 for (_, e1), (s2, _) in zip(finished, finished[1:]) if s2 < e1)
    if overlaps:
        problems.append(f"{overlaps} pair(s) of streams of {name} overlapped")
    # the chain: linear from the base, each fact once, every fact of every feed in it or quarantined
    prod = tracker.production(name)
    chain = tracker.chain(name, prod.version)
    base, _ = load_model(str(ck), "cpu")
    rebuilt = rebuild(base, tracker, name, prod.version, None)
    keys = [r.key for r in rebuilt.requests]
    if len(keys) != len(set(keys)):
        problems.append("a fact appears in two versions of the chain")
    quarantined = tracker.quarantined(name, rebuilt.lineage)
    every = {EditRequest.from_dict(r).key for records in feeds.values() for r in records}
    lost = every - set(keys) - set(quarantined)
    if lost:
        problems.append(f"{len(lost)} fact(s) neither in the chain nor quarantined")
    orphans = [v.version for v in tracker.versions(name) if v.version not in {c.version for c in chain}]
    counts = {
        "prefect_flow_runs_in_postgres": int(stack.psql("prefect", "SELECT count(*) FROM flow_run")),
        "mlflow_model_versions_in_postgres": int(stack.psql("mlflow", "SELECT count(*) FROM model_versions")),
        "mlflow_runs_in_postgres": int(stack.psql("mlflow", "SELECT count(*) FROM runs")),
    }
    if counts["mlflow_model_versions_in_postgres"] != len(tracker.versions(name)):
        problems.append("the MLflow registry's versions are not the rows in PostgreSQL")
    if problems:
        raise ScaleoutError("; ".join(problems))
    return {
        "feed_contents_once": len(once),
        "streams": len(streams),
        "streams_finished": len(finished),
        "streams_killed": sum(1 for *_, status in streams if status == "KILLED"),
        "production": prod.version,
        "chain_versions": len(chain),
        "orphan_versions": orphans,  # registered by a stream killed before it moved the alias: never in production
        "facts": len(every),
        "facts_in_chain": len(set(keys) & every),
        "facts_quarantined": len(set(quarantined) & every),
        **counts,
    }


def bench_scaleout(workers: int = 2, json_out: Path | None = None, keep: bool = False) -> dict:
    from flows.serve import ServePolicy
    from kedit.app.tiny import CORPUS, train_tiny, write_gates, write_jsonl
    from kedit.store.tracking import Tracker

    if not POSTGRES.is_file() or not shutil.which("runuser") and os.geteuid() == 0:
        raise ScaleoutError("needs scripts/postgres.sh and runuser")
    root = Path(tempfile.mkdtemp(prefix="kedit-scaleout-"))
    root.chmod(0o711)  # the postgres user (the cluster's owner) must reach root/pg; it can list nothing here
    stack = Stack(root)
    out: dict[str, Any] = {"workers": workers, "machine": machine()}
    try:
        t0 = time.perf_counter()
        stack.start()
        out["start_s"] = time.perf_counter() - t0
        ck = train_tiny(root / "model")
        (root / "corpus.txt").write_text("\n".join(CORPUS))
        feeds_dir = root / "feeds"
        feeds_dir.mkdir()
        gates = write_gates(root / "gates.yaml", drawdown={"base_max": 0.5, "step_max": 0.3})  # the tiny model knows 8 facts
        params = {
            "model": str(ck), "editor": "ft-m", "batch_size": 2, "gates": str(gates),
            "tracking_uri": stack.tracking_uri, "corpus": str(root / "corpus.txt"),
            "overrides": {"layers": [2], "lr": 0.02}, "device": "cpu", "work_dir": str(root / "work"),
        }  # fmt: skip
        deployment = stack.deploy(params)
        policy = ServePolicy.served([feeds_dir], params).write(root / "serve-policy.json")
        for i in range(workers):
            stack.start_worker(f"worker-{i}", policy)
        feeds = {}
        for i in range(4):
            feeds[str(write_jsonl(feeds_dir / f"feed-{i}.jsonl", facts(3 * i, 3, f"f{i}")))] = facts(3 * i, 3, f"f{i}")
        dup = write_jsonl(feeds_dir / "feed-0-again.jsonl", facts(0, 3, "f0"))  # the same content under another name
        feeds[str(dup)] = facts(0, 3, "f0")

        # 1. concurrent feeds: every run created at once
        t0 = time.perf_counter()
        runs = [stack.run_feed(deployment, Path(f)) for f in feeds]
        took: dict[str, str] = {}
        ended = wait_runs(stack, runs, 900, took)
        out["concurrent"] = {
            "flow_runs": len(runs),
            "states": sorted(r["state_type"] for r in ended.values()),
            "runs_per_worker": {w: sum(v == w for v in took.values()) for w in stack.workers},
            "wall_s": time.perf_counter() - t0,
        }  # fmt: skip
        tracker = Tracker(stack.tracking_uri)
        name = tracker.client.search_registered_models()[0].name

        # 2. a worker killed mid-stream, the feed sent again
        long_facts = facts(12, 8, "long")
        long_feed = write_jsonl(feeds_dir / "long.jsonl", long_facts)
        feeds[str(long_feed)] = long_facts
        before = tracker.production(name).version
        first = stack.run_feed(deployment, long_feed)
        killed = kill_mid_stream(stack, first, tracker, name, before, 600)
        t0 = time.perf_counter()
        again = stack.run_feed(deployment, long_feed)
        ended = wait_runs(stack, [again], 900, took)
        out["kill"] = killed | {
            "resent_state": ended[again]["state_type"],
            "resent_on": took.get(again),
            "resent_to_done_s": time.perf_counter() - t0,  # includes waiting out the killed stream's lock lease
        }
        out["invariants"] = invariants(stack, ck, feeds)
        out["logs_tail"] = {w: (root / f"worker-{w}.log").read_text()[-500:] for w in stack.workers}
    finally:
        stack.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    save_json(json_out, out)
    return out
