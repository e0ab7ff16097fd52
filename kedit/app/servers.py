"""``kedit up`` / ``kedit down``: the Prefect server and the MLflow UI on 127.0.0.1, with the project's stores.

Each server starts in its own session (process group), so ``down`` can stop it together with
every process it spawned (MLflow's workers and job runner, Prefect's services) and check that
none is left. Their pids and URLs are kept in ``$KEDIT_HOME/servers.json`` (replaced atomically), with
each process's identity (its start time since boot, and the boot): a pid that has since been reused
by another program is never signalled.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kedit.core.errors import KeditError
from kedit.core.paths import kedit_home, write_atomic
from kedit.store.tracking import resolve_uri

log = logging.getLogger(__name__)


class ServerError(KeditError):
    pass


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    health: str
    pid: int
    log: str
    identity: str | None = None  # process_identity(pid) when started; None in records written before it was kept


def state_file() -> Path:
    return kedit_home() / "servers.json"


def _read_state() -> dict[str, dict]:
    f = state_file()
    return json.loads(f.read_text()) if f.is_file() else {}


def _write_state(state: dict[str, dict]) -> None:
    """Write-then-rename: a reader (or a crash) never sees half a file."""
    write_atomic(state_file(), json.dumps(state, indent=2))


def process_identity(pid: int) -> str | None:
    """What tells this process from a later one given the same pid: the boot and its start time
    (/proc/<pid>/stat field 22, clock ticks since boot); None if there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{boot}:{fields[19]}"  # the fields after the name start at field 3


def is_ours(record: dict) -> bool:
    """The process of a ``servers.json`` record is still running and is the one ``up`` started."""
    return record.get("identity") is not None and process_identity(record["pid"]) == record["identity"]


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy (returned), or raise ServerError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise ServerError(f"timed out after {timeout:.0f} s waiting for {what}")


def rest_call(base: str, method: str, path: str, body: dict | None = None, attempts: int = 5):
    """One JSON call to a server's REST API (the Prefect server's, ``base`` ending in ``/api``). A busy server
    (503, a timeout, a refused or reset connection: seen on a loaded 2-core machine) is retried a few times,
    with a growing pause; any other HTTP error is the caller's."""
    import urllib.error

    data = json.dumps(body or {}).encode()
    for attempt in range(attempts):
        req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == attempts - 1:
                raise
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            if attempt == attempts - 1:
                raise
        time.sleep(1.0 + attempt)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _start(name: str, cmd: list[str], url: str, health: str, env: dict[str, str]) -> Server:
    logs = kedit_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logf = logs / f"{name}.log"
    with logf.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Server(name, url, health, proc.pid, str(logf), process_identity(proc.pid))


def up(
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    tracking_uri: str | None = None,
    artifacts: Path = Path("mlruns"),
    timeout: float = 120.0,
) -> list[Server]:
    """Start both servers (unless already up), wait for their health endpoints, return them."""
    state = _read_state()
    running = {n: s for n, s in state.items() if is_ours(s)}  # a live pid that is another program now is not a server
    env = {**os.environ, "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(kedit_home() / "prefect"))}
    wanted = {
        "prefect": (
            [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            f"http://127.0.0.1:{prefect_port}",
            f"http://127.0.0.1:{prefect_port}/api/health",
        ),
        "mlflow": (
            [
                _bin("mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                resolve_uri(tracking_uri),
                "--artifacts-destination",
                str(artifacts.resolve()),
                "--workers",
                "1",
            ],
            f"http://127.0.0.1:{mlflow_port}",
            f"http://127.0.0.1:{mlflow_port}/health",
        ),
    }
    servers = []
    for name, (cmd, url, health) in wanted.items():
        if name in running:
            s = Server(**running[name])
            log.info("%s already running (pid %d) at %s", name, s.pid, s.url)
        else:
            s = _start(name, cmd, url, health, env)
        servers.append(s)
        state[name] = s.__dict__
    _write_state(state)
    deadline = time.monotonic() + timeout
    for s in servers:

        def ready(s=s) -> bool:
            if not _alive(s.pid):
                raise ServerError(f"{s.name} exited during start-up; see {s.log}")
            return _healthy(s.health)

        wait_for(ready, max(0.0, deadline - time.monotonic()), f"{s.name} at {s.health} (log {s.log})", interval=0.5)
    return servers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Pids whose process group is ``pgid`` (read from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


def stop_group(pgid: int, grace: float = 15.0) -> None:
    """SIGTERM the whole process group, then SIGKILL whatever is left after ``grace`` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.2)


def down() -> dict[str, str]:
    """Stop every server started by ``up`` and all their descendants: name -> "stopped", or why it was not.

    A server's process group is signalled only while its leader is the process ``up`` started: a pid
    reused by another program, or a record without the identity, is left alone (and forgotten)."""
    state = _read_state()
    outcome = {}
    for name, s in list(state.items()):
        pid = s["pid"]
        if is_ours(s):
            stop_group(pid)
            left = group_members(pid)
            if left:
                _write_state(state)
                raise ServerError(f"{name}: processes {left} survived SIGKILL")
            outcome[name] = "stopped"
        elif process_identity(pid) is None:
            left = group_members(pid)
            outcome[name] = "was not running" + (
                f"; processes {left} of its group {pid} left alone (they cannot be told from a reused group): stop them by hand"
                if left
                else ""
            )
        elif s.get("identity"):
            outcome[name] = f"not stopped: pid {pid} is now another program, not the server `kedit up` started"
        else:
            outcome[name] = f"not stopped: pid {pid} cannot be confirmed as the server (recorded without its identity)"
        del state[name]
        _write_state(state)
    return outcome
