"""``kedit bench ui``: the MLflow UI in a real headless Chromium, on a store written by a short stream.

1. A short stream on the tiny trained model of ``kedit.app.tiny`` (four good facts and one harmful one,
   batches of 5, editor ft-m), as in ``tests/test_flow.py``: one batch is rejected, the rest accepted,
   versions registered and the ``production`` alias moved; Prefect runs against a throw-away test server.
2. ``mlflow server`` on that store, on 127.0.0.1, in its own process group (``kedit.app.servers``).
3. The links ``Tracker.ui_links`` prints (runs table, the stream run's charts, the registered model) and the
   run page of a rejected attempt, each opened in Chromium driven by Playwright: the page load must answer
   200 and an expected text must become visible; then a screenshot.

Chromium is the system's (``executable_path``): Playwright's own browser download is not needed.
Run: ``kedit bench ui --out docs/ui --json docs/ui/bench_ui.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kedit.core.errors import KeditError

log = logging.getLogger(__name__)

DEFAULT_CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1400, "height": 900}
INSTALL_HINT = 'install them with: pip install -e ".[ui]" and (Debian) apt-get install chromium, or pass --chromium PATH'
# a plain launch() gets a fresh throw-away profile (Playwright refuses --user-data-dir there); nothing reaches the network
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# MLflow's UI keeps its settings in localStorage as JSON under `<key>_v<version>`: keep the assistant panel shut
NO_ASSISTANT = (
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
)
# the "+" in the run-name cell of a parent run, which shows its nested runs
EXPAND_CHILDREN = 'button[data-component-id$="runnamecellrenderer.tsx_46"]'
PLOT = ".js-plotly-plot"  # a drawn chart (MLflow loads its chart library lazily: on 2 cores ~15 s after the page)
SETTLE_S = 2.0  # after the expected text shows: charts and the grid finish drawing (the page polls: never network-idle)
TEXT_TIMEOUT_S = 60.0


class UIError(KeditError):
    pass


@dataclass
class Check:
    """One page of the UI: what to open, what must show, and what happened."""

    name: str
    url: str
    expect: list[str]
    screenshot: str
    ready: str | None = None  # a CSS selector that must also become visible (the charts drawn, not their spinners)
    children: str | None = None  # runs table: expand the nested runs and wait for this run name among them
    children_shown: bool | None = None
    status: int | None = None
    found: bool = False
    missing: list[str] = field(default_factory=list)
    seconds: float | None = None
    size: list[int] | None = None
    error: str | None = None
    final_url: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.found and self.error is None


def missing_requirements(chromium: Path, has_module=lambda name: importlib.util.find_spec(name) is not None) -> str | None:
    """One line saying what is missing to drive the browser and how to install it, or None."""
    missing = []
    if not has_module("playwright"):
        missing.append("the Python package playwright")
    if not (chromium.is_file() and os.access(chromium, os.X_OK)):
        missing.append(f"Chromium at {chromium}")
    if not missing:
        return None
    return f"kedit bench ui needs {' and '.join(missing)}: {INSTALL_HINT}"


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a PNG file from its IHDR chunk; None if it is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def result(checks: list[Check], **extra) -> dict:
    """The JSON of the run: every check with its outcome, and whether all passed."""
    return {
        "ok": bool(checks) and all(c.ok for c in checks),
        "checks": [{**asdict(c), "ok": c.ok} for c in checks],
        **extra,
    }


def _write(path: Path | None, obj: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n")


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_store(root: Path) -> dict:
    """The tiny model, trained, and a short stream with one rejected batch into ``root/mlruns``: the stream's summary."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.stream import stream
    from kedit.app.tiny import CORPUS, FTM, GOOD, HARMFUL, train_tiny, write_gates, write_jsonl
    from kedit.pipeline.config import StreamConfig

    ck = train_tiny(root / "model")
    (root / "corpus.txt").write_text("\n".join(CORPUS))
    cfg = StreamConfig(
        feeds=(str(write_jsonl(root / "feed.jsonl", GOOD + [HARMFUL])),),
        model=str(ck),
        editor="ft-m",
        batch_size=5,
        gates=str(write_gates(root / "gates.yaml")),
        tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db",
        corpus=str(root / "corpus.txt"),
        overrides=FTM,
        device="cpu",
        work_dir=str(root / "work"),
    )
    with prefect_test_harness(server_startup_timeout=120):
        summary = stream(cfg)
    return {**summary, "tracking_uri": cfg.tracking_uri}


def copy_drawdown(summary: dict, out: Path) -> Path:
    """The stream run's drawdown.png, copied beside the screenshots (the README shows it)."""
    import shutil

    from kedit.store.tracking import Tracker

    out.mkdir(parents=True, exist_ok=True)
    got = Tracker(summary["tracking_uri"]).download(summary["run_id"], "drawdown.png", out / ".download")
    target = shutil.copyfile(got, out / "drawdown.png")
    shutil.rmtree(out / ".download", ignore_errors=True)
    return Path(target)


def start_mlflow(uri: str, artifacts: Path, port: int = 0, timeout: float = 120.0):
    """``mlflow server`` on 127.0.0.1 in its own process group, healthy; its ``Server`` record."""
    from kedit.app.servers import ServerError, _alive, _bin, _healthy, _start, free_port, wait_for

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", uri]
    cmd += ["--artifacts-destination", str(artifacts.resolve()), "--workers", "1"]
    server = _start("mlflow", cmd, url, f"{url}/health", dict(os.environ))

    def ready() -> bool:
        if not _alive(server.pid):
            raise ServerError(f"mlflow server exited during start-up; see {server.log}")
        return _healthy(server.health)

    try:
        wait_for(ready, timeout, f"mlflow at {server.health}", interval=0.5)
    except BaseException as e:
        stop_server(server)
        tail = Path(server.log).read_text(errors="replace").splitlines()[-20:]  # the log goes with the temporary store
        raise ServerError(f"{e}; the end of its log:\n" + "\n".join(tail)) from e
    return server


def stop_server(server) -> None:
    from kedit.app.servers import group_members, stop_group

    stop_group(server.pid, grace=10)
    deadline = time.monotonic() + 5  # killed processes take a moment to go on a loaded machine
    while (left := group_members(server.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        log.warning("mlflow server: processes %s of group %d survived", left, server.pid)


def plan(uri: str, summary: dict, out: Path, suffix: str = ".png") -> list[Check]:
    """The pages to check, from the links ``Tracker.ui_links`` gives (the UI base from $KEDIT_UI_URL)."""
    from kedit.store.tracking import ML_VIEW, T_VERDICT, Tracker

    tracker = Tracker(uri)
    name, run_id = summary["registered_model"], summary["run_id"]
    links = tracker.ui_links(name, run_id)
    stream_run = tracker.client.get_run(run_id).info.run_name
    rejected = _rejected_attempt(tracker, name, run_id, T_VERDICT)
    experiment = links["runs"].split("/runs", 1)[0]
    child = rejected.info.run_name if rejected is not None else None
    checks = [
        Check("runs_table", links["runs"], ["Runs", stream_run], str(out / f"01_runs_table{suffix}"), children=child),
        Check(
            "stream_charts", links["stream"], [stream_run, "drawdown_base"], str(out / f"02_stream_charts{suffix}"), ready=PLOT
        ),
    ]
    if rejected is None:
        missing = Check("rejected_attempt", "", [], str(out / f"03_rejected_attempt{suffix}"), error="no rejected attempt run")
        checks.append(missing)
    else:
        url = f"{experiment}/runs/{rejected.info.run_id}{ML_VIEW}"
        checks.append(Check("rejected_attempt", url, [rejected.info.run_name], str(out / f"03_rejected_attempt{suffix}")))
    checks.append(Check("registered_model", links["model"], [name, "production"], str(out / f"04_registered_model{suffix}")))
    return checks


def _rejected_attempt(tracker, name: str, stream_run_id: str, verdict_tag: str):
    """A nested run of the stream whose verdict is not "accepted": the one with the fewest facts (the isolated one)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id(name)],
        filter_string=f"tags.`{verdict_tag}` != 'accepted' and tags.`mlflow.parentRunId` = '{stream_run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )

    def n_facts(r) -> int:
        try:
            return int(r.data.tags.get("kedit.n_facts", "1000000"))
        except ValueError:
            return 1_000_000

    return min(runs, key=n_facts) if runs else None


def shoot(checks: list[Check], chromium: Path, on_check=None) -> str:
    """Open each check's URL in a fresh page of one headless Chromium; fill in its outcome; the browser's version."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            version = browser.version
            ctx = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
            ctx.add_init_script(NO_ASSISTANT)
            for check in checks:
                if check.url:
                    page = ctx.new_page()  # a fresh document each time: goto on a hash-only change gives no response
                    try:
                        _visit(page, check)
                    finally:
                        page.close()
                log.info(
                    "%s: %s (HTTP %s, text %s, %.1f s)",
                    check.name,
                    "ok" if check.ok else f"FAILED {check.error or ''}".strip(),
                    check.status,
                    "found" if check.found else f"missing {check.missing}",
                    check.seconds or 0.0,
                )
                if on_check:
                    on_check(check)
            ctx.close()
        finally:
            browser.close()
    return version


def _visit(page, check: Check) -> None:
    t0 = time.perf_counter()
    try:
        response = page.goto(check.url, wait_until="domcontentloaded", timeout=60_000)
        check.status = response.status if response else None
        check.missing = []
        for text in check.expect:
            try:
                page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=TEXT_TIMEOUT_S * 1000)
            except Exception:
                check.missing.append(text)
        if check.ready:
            try:
                page.locator(check.ready).first.wait_for(state="visible", timeout=TEXT_TIMEOUT_S * 1000)
            except Exception:
                check.missing.append(f"selector {check.ready}")
        check.found = not check.missing
        if check.children and check.found:
            check.children_shown = _expand_children(page, check.children)
        time.sleep(SETTLE_S)
        check.final_url = page.url
        Path(check.screenshot).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=check.screenshot, type="jpeg" if check.screenshot.endswith(".jpg") else "png")
        size = png_size(Path(check.screenshot))
        check.size = list(size) if size else None
    except Exception as e:
        check.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    check.seconds = round(time.perf_counter() - t0, 2)


def _expand_children(page, child: str) -> bool:
    """Show the stream run's nested runs (best effort: with another layout of runs there may be no "+", or no need)."""
    if page.get_by_text(child, exact=True).first.is_visible():
        return True
    try:
        page.locator(EXPAND_CHILDREN).first.click(timeout=10_000)
        page.get_by_text(child, exact=True).first.wait_for(state="visible", timeout=10_000)
        return True
    except Exception as e:
        log.warning("runs table: nested run %s not shown (%s; expand button %s)", child, type(e).__name__, EXPAND_CHILDREN)
        return False


def bench_ui(
    out: Path = Path("docs/ui"), json_path: Path | None = None, chromium: Path = DEFAULT_CHROMIUM, port: int = 0
) -> dict:
    """Write the store, serve it, check and screenshot the four pages; the result (also written to ``json_path`` as it goes)."""
    import mlflow

    problem = missing_requirements(chromium)
    if problem:
        raise UIError(problem)
    from importlib.metadata import version

    t_start = time.perf_counter()
    info = {
        "what": "MLflow UI pages that kedit prints, opened in headless Chromium: HTTP status of the page load, expected text",
        "mlflow": mlflow.__version__,
        "playwright": version("playwright"),
        "chromium_binary": str(chromium),
        "viewport": VIEWPORT,
    }
    checks: list[Check] = []
    timings: dict[str, float] = {}

    def save() -> dict:
        res = result(checks, **info, timings_s=timings)
        _write(json_path, res)
        return res

    with tempfile.TemporaryDirectory(prefix="kedit-bench-ui-") as tmp:
        root = Path(tmp)
        env = {"KEDIT_HOME": str(root / "home"), "PREFECT_HOME": str(root / "prefect"), "TQDM_DISABLE": "1"}
        with _environ(**env):
            t0 = time.perf_counter()
            log.info("writing the store: the tiny model and a short stream with a harmful fact")
            summary = write_store(root)
            timings["store"] = round(time.perf_counter() - t0, 2)
            info["stream"] = {k: summary.get(k) for k in ("registered_model", "run_id", "records", "accepted", "quarantined")}
            info["drawdown_png"] = str(copy_drawdown(summary, Path(out)))
            log.info("store written in %.1f s: %s", timings["store"], info["stream"])

            t0 = time.perf_counter()
            server = start_mlflow(summary["tracking_uri"], root / "mlruns", port)
            try:
                timings["server_start"] = round(time.perf_counter() - t0, 2)
                log.info("mlflow server at %s (healthy after %.1f s)", server.url, timings["server_start"])
                with _environ(KEDIT_UI_URL=server.url):
                    checks.extend(plan(summary["tracking_uri"], summary, Path(out)))
                for c in checks:
                    log.info("%s: %s", c.name, c.url)
                save()
                t0 = time.perf_counter()
                info["chromium"] = shoot(checks, chromium, on_check=lambda c: save())
                timings["browser"] = round(time.perf_counter() - t0, 2)
            finally:
                stop_server(server)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    return save()
