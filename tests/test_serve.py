"""Integration: a real Prefect server and ``kedit serve`` on 127.0.0.1; feeds dropped in a directory become versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.serve import FeedWatcher, run_dir
from kedit.app.servers import free_port, group_members, rest_call, stop_group, wait_for
from kedit.app.tiny import CORPUS, GOOD, HARMFUL, train_tiny, write_gates, write_jsonl
from kedit.core.facts import is_feed_name
from kedit.core.paths import sha256_file
from kedit.store.tracking import Tracker

KEDIT = [str(Path(sys.executable).parent / "kedit")]


def drop(directory: Path, name: str, records: list[dict]) -> Path:
    """Write-then-rename: the watcher never sees a partial file."""
    tmp = write_jsonl(directory / f".{name}.tmp", records)
    final = directory / name
    tmp.rename(final)
    return final


# ----------------------------------------------------------------------------- the watcher alone


def test_watcher_fires_once_per_complete_content(tmp_path):
    fired = []
    w = FeedWatcher(tmp_path, lambda p, sha: fired.append((p.name, sha)), settle=1.0)
    (tmp_path / "a.jsonl.part").write_text("{}")  # still being written: never read
    (tmp_path / ".b.jsonl").write_text("{}")  # hidden: the writer's temporary name
    (tmp_path / "c.jsonl").write_text('{"x": 1}\n')
    assert w.scan(now=0.0) == []  # first sight: not yet known to be stable
    assert w.scan(now=0.5) == []  # unchanged, but not for `settle` seconds
    assert [p.name for p in w.scan(now=1.6)] == ["c.jsonl"]
    assert w.scan(now=5.0) == []  # same content: once
    (tmp_path / "c.jsonl").write_text('{"x": 2}\n')  # changed content under the same name: a new feed
    w.scan(now=6.0)
    assert [p.name for p in w.scan(now=7.5)] == ["c.jsonl"]
    assert len(fired) == 2 and fired[0][1] != fired[1][1]
    assert not is_feed_name(Path("x.jsonl.tmp")) and is_feed_name(Path("x.csv"))


def started_watcher(tmp_path, settle: float = 0.6, polling: bool = False) -> tuple[FeedWatcher, list]:
    fired: list = []

    def on_feed(path: Path, sha: str) -> None:
        fired.append((path.name, sha, time.monotonic()))

    w = FeedWatcher(tmp_path, on_feed, interval=0.1, settle=settle, polling=polling)
    w.start()
    return w, fired


def wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_watcher_fires_once_on_write_then_rename(tmp_path, polling):
    w, fired = started_watcher(tmp_path, polling=polling)
    try:
        assert w.kind == ("polling" if polling else "inotify")
        t0 = time.monotonic()
        drop(tmp_path, "x.jsonl", GOOD[:2])
        assert wait_until(lambda: fired), "the renamed feed never fired"
        time.sleep(w.settle + 0.5)  # no second call for the same write (later events, the settle check)
        assert [f[0] for f in fired] == ["x.jsonl"]
        if not polling:
            assert fired[0][2] - t0 < w.settle, "a renamed file is complete at once: no settle wait"
    finally:
        w.stop()


def test_watcher_fires_on_a_growing_file_once_after_it_settles(tmp_path):
    w, fired = started_watcher(tmp_path, settle=0.6)
    try:
        with (tmp_path / "grow.jsonl").open("w") as f:  # a writer that cannot rename: in place, in pieces
            for r in GOOD:
                f.write(json.dumps(r) + "\n")
                f.flush()
                time.sleep(0.3)
                assert fired == [], "fired while the file was still being written"
        last_write = time.monotonic()
        assert wait_until(lambda: fired), "the settled file never fired"
        assert fired[0][2] - last_write >= w.settle - 0.35  # the last write was <= 0.3 s before `last_write`
        time.sleep(w.settle + 0.5)
        assert len(fired) == 1
        assert fired[0][1] == sha256_file(tmp_path / "grow.jsonl")  # the complete content
    finally:
        w.stop()


def test_watcher_never_fires_on_hidden_or_partial_files(tmp_path):
    w, fired = started_watcher(tmp_path, settle=0.3)
    try:
        for name in (".hidden.jsonl", "a.jsonl.tmp", "b.jsonl.part", ".c.jsonl.tmp"):
            write_jsonl(tmp_path / name, GOOD[:1])
        (tmp_path / "a.jsonl.tmp").rename(tmp_path / "a2.jsonl.part")  # renamed, but to another partial name
        time.sleep(1.2)
        assert fired == []
    finally:
        w.stop()


# ----------------------------------------------------------------------------- servers and kedit serve


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    port, mport = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "KEDIT_HOME": str(root / "home"),
        "TQDM_DISABLE": "1",
        "KEDIT_LOCK": "prefect",  # streams in separate processes share the Prefect server's per-model slot
    }
    groups = []
    try:
        # kedit up: both servers, health-checked, with the stores under root
        up = subprocess.run(
            [
                *KEDIT,
                "up",
                "--prefect-port",
                str(port),
                "--mlflow-port",
                str(mport),
                "--tracking-uri",
                f"sqlite:///{root}/mlruns/mlflow.db",
            ],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{port}" in up.stdout and f"http://127.0.0.1:{mport}" in up.stdout
        servers = json.loads((root / "home" / "servers.json").read_text())
        groups += [s["pid"] for s in servers.values()]
        ck = train_tiny(root / "model")
        (root / "corpus.txt").write_text("\n".join(CORPUS))
        feeds = root / "feeds"
        feeds.mkdir()
        uri = f"http://127.0.0.1:{mport}"
        slog = (root / "serve.log").open("wb")
        serve = subprocess.Popen(
            [
                *KEDIT,
                "serve",
                "--feeds",
                str(feeds),
                "--model",
                str(ck),
                "--editor",
                "ft-m",
                "--set",
                "layers=[2]",
                "--set",
                "lr=0.02",
                "--batch-size",
                "5",
                "--gates",
                str(write_gates(root / "gates.yaml")),
                "--tracking-uri",
                uri,
                "--corpus",
                str(root / "corpus.txt"),
                "--device",
                "cpu",
                "--cron",
                "0 3 * * *",
                "--name",
                "tiny",
            ],
            env=env,
            cwd=root,
            stdout=slog,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        groups.append(serve.pid)
        params = {
            "model": str(ck),
            "editor": "ft-m",
            "batch_size": 5,
            "gates": str(root / "gates.yaml"),
            "tracking_uri": uri,
            "corpus": str(root / "corpus.txt"),
            "overrides": {"layers": [2], "lr": 0.02},
            "device": "cpu",
            "work_dir": str(root / "pool-work"),
        }
        yield {
            "root": root,
            "feeds": feeds,
            "uri": uri,
            "env": env,
            "api": env["PREFECT_API_URL"],
            "serve": serve,
            "params": params,
        }
    finally:
        down = subprocess.run([*KEDIT, "down"], env=env, cwd=root, capture_output=True, text=True, timeout=120)
        for pgid in groups:
            stop_group(pgid, grace=10)  # kedit serve, and anything `down` missed (then the assertion below fails)
        assert down.returncode == 0, down.stdout + down.stderr
        for pgid in groups:
            assert group_members(pgid) == [], f"processes left in group {pgid}"


def api(stack, method: str, path: str, body: dict | None = None):
    return rest_call(stack["api"], method, path, body)


def deployments(stack) -> dict[str, dict]:
    return {d["name"]: d for d in api(stack, "POST", "/deployments/filter", {})}


def flow_runs(stack) -> list[dict]:
    return api(stack, "POST", "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}}})


def production(stack) -> str | None:
    t = Tracker(stack["uri"])
    names = [rm.name for rm in t.client.search_registered_models()]
    if not names:
        return None
    prod = t.production(names[0])
    return prod.version if prod else None


def finished_feed_runs(stack) -> list[dict]:
    return [r for r in flow_runs(stack) if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED") and r["parameters"].get("feed")]


def test_serve_registers_deployments_and_processes_dropped_feeds_exactly_once(stack):
    deps = wait_for(lambda: (d := deployments(stack)) and len(d) >= 2 and d, 180, "the two deployments")
    cron = deps["tiny-cron"]
    assert [s["schedule"]["cron"] for s in cron["schedules"]] == ["0 3 * * *"]
    assert deps["tiny-on-feed"]["parameters"]["feeds_dir"] == str(stack["feeds"].resolve())

    drop(stack["feeds"], "first.jsonl", GOOD[:2])
    assert wait_for(lambda: production(stack), 180, "a production version after the first feed") == "1"
    runs = wait_for(lambda: (r := finished_feed_runs(stack)) and r, 60, "the first flow run to finish")
    assert [r["state_type"] for r in runs] == ["COMPLETED"]

    # the same content again (under another name): processed once, so nothing happens
    drop(stack["feeds"], "first-again.jsonl", GOOD[:2])
    wait_for(lambda: len(finished_feed_runs(stack)) == 2, 120, "the duplicate feed's flow run")
    assert production(stack) == "1"
    t = Tracker(stack["uri"])
    name = t.client.search_registered_models()[0].name
    assert len(t.feed_ledger(name)) == 1

    # two feeds at once: both processed, one stream after the other (the model's slot); the harmful fact is stopped
    drop(stack["feeds"], "second.jsonl", [GOOD[2]])
    drop(stack["feeds"], "third.jsonl", [HARMFUL])
    wait_for(lambda: len(finished_feed_runs(stack)) == 4, 240, "both feeds' flow runs")
    assert all(r["state_type"] == "COMPLETED" for r in finished_feed_runs(stack))
    assert production(stack) == "2"
    streams = sorted(t.runs(name, "stream"), key=lambda r: r.info.start_time)
    assert len(streams) == 3  # the duplicate feed never opened a stream
    for a, b in zip(streams, streams[1:]):
        assert a.info.end_time <= b.info.start_time, "streams of one model never overlap"
    assert len(t.feed_ledger(name)) == 3

    # the metric history the streams wrote, read through the MLflow server's REST API: drawdown over edits
    import urllib.request

    curves = []
    for run in sorted(streams, key=lambda r: r.info.start_time):
        url = f"{stack['uri']}/api/2.0/mlflow/metrics/get-history?run_id={run.info.run_id}&metric_key=drawdown_base"
        with urllib.request.urlopen(url, timeout=10) as r:
            history = json.loads(r.read()).get("metrics", [])
        assert all(0 <= m["value"] <= 0.2 for m in history)
        curves.append(sorted(int(m["step"]) for m in history))
    # each stream run shows the curve from 0 edits through the chain it started on, then its own versions:
    # a prefix of the model's whole history, one point per step; the last one all of it
    assert all(c == [0, 2, 3][: len(c)] and len(c) >= 2 for c in curves) and curves[-1] == [0, 2, 3]

    # a feed that fails validation is recorded as invalid, with its quarantine, and not retried
    bad = drop(stack["feeds"], "broken.jsonl", [{"subject": "dave", "prompt": "no placeholder", "target_new": ""}])
    wait_for(lambda: len(finished_feed_runs(stack)) == 5, 120, "the broken feed's flow run")
    entry = wait_for(lambda: [e for e in t.feed_ledger(name).values() if e["feed"] == bad.name], 30, "the ledger entry")[0]
    assert entry["status"] == "invalid"
    quarantine = json.loads(Path(t.client.download_artifacts(entry["run_id"], "quarantine.json")).read_text())
    assert quarantine and quarantine[0]["file"] == str(bad.resolve()) and quarantine[0]["field"] == "prompt"
    assert production(stack) == "2"

    # confinement: the watcher never fires on a link out of the directory; a flow run sent to it (as any
    # client of the API could) records it as refused without reading it; another configuration fails the run
    outside = write_jsonl(stack["root"] / "outside.jsonl", [{**GOOD[0], "id": "never-read"}])
    link = stack["feeds"] / "link-out.jsonl"
    link.symlink_to(outside)
    on_feed = deployments(stack)["tiny-on-feed"]["id"]
    sent = api(stack, "POST", f"/deployments/{on_feed}/create_flow_run", {"parameters": {"feed": str(link)}})
    other = str(stack["root"] / "lenient-gates.yaml")
    overridden = api(stack, "POST", f"/deployments/{on_feed}/create_flow_run", {"parameters": {"feed": str(bad), "gates": other}})
    runs = wait_for(lambda: (f := finished_feed_runs(stack)) and len(f) >= 7 and f, 120, "the two confined flow runs")
    states = {r["id"]: r["state_type"] for r in runs}
    assert states[sent["id"]] == "COMPLETED" and states[overridden["id"]] == "FAILED"
    refused = [r for r in t.runs(name, "feed") if r.info.run_name == link.name]
    assert [r.data.tags["kedit.feed_status"] for r in refused] == ["refused"]
    assert "outside the feed directories" in refused[0].data.tags["kedit.feed_reason"]
    time.sleep(2)
    assert len(finished_feed_runs(stack)) == 7 and production(stack) == "2"  # no run of the watcher's for the link


def test_the_flow_runs_on_a_process_work_pool_worker(stack):
    """Scale-out mechanism: a deployment on a process work pool, executed by a separate worker process."""
    pool = "kedit-test-pool"
    env = stack["env"]
    prefect = str(Path(sys.executable).parent / "prefect")
    made = subprocess.run([prefect, "work-pool", "create", pool, "--type", "process"], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    root = stack["root"]
    repo = Path(__file__).resolve().parents[1]
    script = f"""
from flows.serve import process_feeds
process_feeds.from_source(source={str(repo)!r}, entrypoint="flows/serve.py:process_feeds").deploy(
    name="on-pool", work_pool_name={pool!r}, build=False, push=False,
    parameters={json.dumps(stack["params"])})
"""
    deployed = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    wlog = (root / "worker.log").open("wb")
    # a worker runs deployments under kedit serve's policy, set in its own environment
    from flows.serve import POLICY_ENV, ServePolicy

    policy = ServePolicy.served([root], stack["params"]).write(root / "serve-policy.json")
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", pool, "--type", "process"],
        env={**env, POLICY_ENV: str(policy)},
        cwd=root,
        stdout=wlog,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        feed = write_jsonl(root / "pool-feed.jsonl", [GOOD[3]])
        run = api(
            stack,
            "POST",
            f"/deployments/{deployments(stack)['on-pool']['id']}/create_flow_run",
            {"parameters": {"feed": str(feed)}},
        )
        done = wait_for(
            lambda: (r := api(stack, "GET", f"/flow_runs/{run['id']}"))["state_type"] in ("COMPLETED", "FAILED", "CRASHED") and r,
            240,
            "the worker to run the flow",
        )
        assert done["state_type"] == "COMPLETED", (root / "worker.log").read_text()[-3000:]
        t = Tracker(stack["uri"])
        name = t.client.search_registered_models()[0].name
        assert any(Path(e["feed"]).name == feed.name for e in t.feed_ledger(name).values())
        # a run whose job variables empty the policy variable (any API client can ask for that) refuses to start
        unconfined = api(
            stack,
            "POST",
            f"/deployments/{deployments(stack)['on-pool']['id']}/create_flow_run",
            {"parameters": {"feed": str(feed)}, "job_variables": {"env": {POLICY_ENV: ""}}},
        )
        done = wait_for(
            lambda: (
                (r := api(stack, "GET", f"/flow_runs/{unconfined['id']}"))["state_type"] in ("COMPLETED", "FAILED", "CRASHED")
                and r
            ),
            240,
            "the worker to refuse the unconfined run",
        )
        assert done["state_type"] == "FAILED"
        assert "needs kedit serve's policy" in (root / "worker.log").read_text()
    finally:
        stop_group(worker.pid, grace=10)
        assert group_members(worker.pid) == []


MEMIT_TINY = ["layers=[1, 2]", "solve.mom2_weight=1.0", "statistics.samples=40", "statistics.length=16", "templates.count=2",
              "templates.length=3"]  # fmt: skip


def test_federated_clients_run_as_deployments_on_their_own_work_pools(stack):
    """FLEKE clients as `kedit serve --client C --pool P`: each client's deployment on its own pool, run by that
    pool's worker; client b reuses the target vectors client a uploaded to the shared MKV store."""
    root, env = stack["root"], {**stack["env"], "PREFECT_WORKER_QUERY_SECONDS": "2"}
    ck, mkv = stack["params"]["model"], root / "mkv"
    gates = write_gates(root / "gates-loose.yaml", edits={"efficacy_min": 0.0}, retention={"min": 0.0},
                        drawdown={"base_max": 1.0, "step_max": 1.0})  # fmt: skip
    prefect = str(Path(sys.executable).parent / "prefect")
    from flows.serve import POLICY_ENV

    groups = []
    try:
        for c in ("a", "b"):
            sets = [a for kv in MEMIT_TINY for a in ("--set", kv)]
            cmd = [*KEDIT, "serve", "--feeds", str(root / f"feeds-{c}"), "--model", ck, "--editor", "memit", *sets,
                   "--batch-size", "4", "--gates", str(gates), "--tracking-uri", stack["uri"], "--corpus",
                   str(root / "corpus.txt"), "--device", "cpu", "--client", c, "--mkv", str(mkv),
                   "--pool", f"kedit-{c}"]  # fmt: skip
            log = (root / f"serve-{c}.log").open("wb")
            proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            groups.append(proc.pid)
        policies = {c: root / "out" / "serve" / f"model-{c}" / "serve-policy.json" for c in ("a", "b")}
        wait_for(lambda: all(p.is_file() for p in policies.values()), 120, "both clients' policies")
        both = ("model-a-on-feed", "model-b-on-feed")
        deps = wait_for(lambda: (d := deployments(stack)) and all(n in d for n in both) and d, 180, "both deployments")
        for c in ("a", "b"):
            assert deps[f"model-{c}-on-feed"]["work_pool_name"] == f"kedit-{c}"
            log = (root / f"worker-{c}.log").open("wb")
            worker = subprocess.Popen([prefect, "worker", "start", "--pool", f"kedit-{c}", "--type", "process"],
                                      env={**env, POLICY_ENV: str(policies[c])}, cwd=root, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            groups.append(worker.pid)
        t = Tracker(stack["uri"])

        def production_of(c):
            names = [rm.name for rm in t.client.search_registered_models() if rm.name.endswith(f"@{c}")]
            return names and t.production(names[0])

        # the runs are asked for directly (the feed event's path to a run is the test above's; an event sent just
        # after a deployment is made can reach the server before its trigger does)
        def run(c, records):
            feed = drop(root / f"feeds-{c}", f"{c}.jsonl", records)
            dep = deps[f"model-{c}-on-feed"]["id"]
            api(stack, "POST", f"/deployments/{dep}/create_flow_run", {"parameters": {"feed": str(feed)}})
            wait_for(lambda: production_of(c), 300, f"client {c}'s first version", interval=1.0)

        run("a", GOOD[:2])
        run("b", GOOD)
        name_b = production_of("b").name
        attempt = t.runs(name_b, "attempt")[-1]
        assert attempt.data.metrics["mkv_reused"] == 2.0  # the two facts a edited first
        for c in ("a", "b"):  # each client's runs went to its own pool
            runs = [r for r in flow_runs(stack) if r["deployment_id"] == deps[f"model-{c}-on-feed"]["id"]]
            assert runs and {r["work_pool_name"] for r in runs} == {f"kedit-{c}"}
    finally:
        for pgid in groups:
            stop_group(pgid, grace=10)


def test_flow_runs_started_in_the_same_second_get_their_own_work_dirs(tmp_path):
    """Two feeds arriving together once shared a work dir named by the second, and one stream read the other's plan."""
    dirs = {run_dir(tmp_path) for _ in range(5)}
    assert len(dirs) == 5 and all(d.parent == tmp_path for d in dirs)


# ----------------------------------------------------------------------------- kedit down, servers.json, kedit rollback


def test_servers_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from kedit.app import servers

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))
    servers._write_state({"prefect": {"pid": 1}})
    monkeypatch.setattr(servers.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        servers._write_state({"prefect": {"pid": 2}, "mlflow": {"pid": 3}})
    assert json.loads((tmp_path / "servers.json").read_text()) == {"prefect": {"pid": 1}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["servers.json"]  # no temporary file left behind


@pytest.mark.parametrize("same_process", [False, True], ids=["pid-reused", "the-server"])
def test_down_signals_a_saved_group_only_while_its_leader_is_the_process_up_started(tmp_path, monkeypatch, same_process):
    from kedit.app import servers

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)  # a live process leading its own group
    try:
        identity = servers.process_identity(other.pid)
        assert identity
        if not same_process:  # the record of a server that died, whose pid another program got since
            boot, ticks = identity.rsplit(":", 1)
            identity = f"{boot}:{int(ticks) - 100}"
        servers._write_state(
            {"prefect": {"name": "prefect", "url": "u", "health": "h", "pid": other.pid, "log": "l", "identity": identity}}
        )
        outcome = servers.down()
        if same_process:
            assert outcome == {"prefect": "stopped"} and other.wait(timeout=10) is not None
        else:
            assert "another program" in outcome["prefect"]
            time.sleep(0.3)
            assert other.poll() is None, "down killed a process that is not the server"
        assert json.loads((tmp_path / "servers.json").read_text()) == {}  # the entry is forgotten either way
    finally:
        other.kill()
        other.wait()


def test_rollback_waits_for_the_running_stream_of_the_model(tmp_path, monkeypatch):
    """The stream's next commit would overwrite a rollback made under it: rollback takes the same lock."""
    import threading

    import kedit.store.naming
    import kedit.store.tracking
    import kedit.store.versions
    from flows.locks import one_stream_per_model
    from kedit.app.cli import cli

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))
    monkeypatch.setenv("KEDIT_LOCK", "file")
    monkeypatch.setattr(kedit.store.naming, "identify", lambda ref: ("kedit-m", "fp"))
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setattr(kedit.store.tracking, "Tracker", lambda uri: SimpleNamespace(uri=uri))
    moved = threading.Event()
    monkeypatch.setattr(kedit.store.versions, "rollback_to", lambda tracker, name, version, fp: moved.set() or "3")
    with one_stream_per_model("kedit-m", store):  # a stream of the model is running in that store
        argv = ["rollback", "--model", "m", "--to", "1", "--tracking-uri", store]
        t = threading.Thread(target=cli.main, args=(argv,), kwargs={"standalone_mode": False})
        t.start()
        assert not moved.wait(1.0), "rollback moved production under a running stream"
    assert moved.wait(10.0)
    t.join(timeout=10)


def test_streams_of_one_model_in_two_local_stores_do_not_wait_for_each_other(tmp_path, monkeypatch):
    """The file lock names a local SQLite store (resolved): one store's stream excludes another stream of the
    model in that store, however its path is written, and not one in another store; a server store locks by
    the model alone (two URLs may name one server)."""
    import threading

    from flows.locks import file_lock_name, one_stream_per_model

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))
    monkeypatch.setenv("KEDIT_LOCK", "file")
    monkeypatch.chdir(tmp_path)
    a, b = "sqlite:///a/mlflow.db", "sqlite:///b/mlflow.db"
    assert file_lock_name("kedit-m", a) == file_lock_name("kedit-m", f"sqlite:///{tmp_path}/x/../a/mlflow.db")
    assert file_lock_name("kedit-m", "http://127.0.0.1:5000") == file_lock_name("kedit-m", None) == "kedit-stream-kedit-m"

    def enters(store) -> bool:
        entered = threading.Event()

        def other():
            with one_stream_per_model("kedit-m", store):
                entered.set()

        t = threading.Thread(target=other, daemon=True)
        t.start()
        return entered.wait(1.0)

    with one_stream_per_model("kedit-m", a):
        assert enters(b)  # another store: no wait
        assert not enters(f"sqlite:///{tmp_path}/a/mlflow.db")  # the same store, written otherwise: waits
