"""``kedit up`` / ``kedit down``: the Prefect server and the MLflow UI on 127.0.0.1, with the project's stores.

Each server starts in its own session (process group), so ``down`` can stop it together with
every process it spawned (MLflow's workers and job runner, Prefect's services) and check that
none is left. Their pids and URLs are kept in ``$KEDIT_HOME/servers.json``.
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
from kedit.core.paths import kedit_home
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


def state_file() -> Path:
    return kedit_home() / "servers.json"


def _read_state() -> dict[str, dict]:
    f = state_file()
    return json.loads(f.read_text()) if f.is_file() else {}


def _write_state(state: dict[str, dict]) -> None:
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps(state, indent=2))


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
    return Server(name, url, health, proc.pid, str(logf))


def up(
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    tracking_uri: str | None = None,
    artifacts: Path = Path("mlruns"),
    timeout: float = 120.0,
) -> list[Server]:
    """Start both servers (unless already up), wait for their health endpoints, return them."""
    state = _read_state()
    running = {n: s for n, s in state.items() if _alive(s["pid"])}
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


def down() -> list[str]:
    """Stop every server started by ``up`` and all their descendants; returns their names."""
    state = _read_state()
    stopped = []
    for name, s in state.items():
        stop_group(s["pid"])
        left = group_members(s["pid"])
        if left:
            raise ServerError(f"{name}: processes {left} survived SIGKILL")
        stopped.append(name)
    _write_state({})
    return stopped
