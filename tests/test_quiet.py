"""Output: progress, verdicts and results by default; Prefect's and the HTTP clients' chatter only with -v."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kedit.app.quiet import OwnInfo, output_env, set_defaults
from kedit.app.tiny import CORPUS, GOOD, train_tiny, write_gates, write_jsonl

REPO = Path(__file__).resolve().parents[1]
VERDICT = re.compile(r"INFO kedit\.pipeline\.attempt: batch-000 \(1 facts\): accepted")

# configure_output first, as the CLI's group callback does; then the stream flow on the tiny model,
# or (verbose: only Prefect's own lines are looked at) a one-task flow, which starts faster
DRIVER = textwrap.dedent(
    """
    import json, sys
    from kedit.app.quiet import configure_output

    configure_output(verbose=sys.argv[1] == "-v")
    if sys.argv[2] == "stream":
        from flows.stream import stream
        from kedit.pipeline.config import StreamConfig

        summary = stream(StreamConfig(**json.loads(sys.argv[3])))
        print("accepted:", summary["accepted"])
    else:
        from prefect import flow, task

        one = task(lambda: 1, name="one")
        print("result:", flow(lambda: one(), name="one-task")())
    """
)


def test_defaults_never_override_the_users_settings():
    environ = {"PREFECT_SERVER_ANALYTICS_ENABLED": "true", "MLFLOW_LOGGING_LEVEL": "DEBUG"}
    added = set_defaults(output_env(False, environ), environ)
    assert environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true" and environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"
    assert added == {
        "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "WARNING",
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
    }
    # a user who chose Prefect's logging level keeps it for the run loggers; analytics stay off with -v
    assert "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL" not in output_env(False, {"PREFECT_LOGGING_LEVEL": "INFO"})
    assert output_env(True, {}) == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def test_console_filter_keeps_kedits_info_and_anyones_warnings():
    f = OwnInfo()

    def rec(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "m", None, None)

    assert f.filter(rec("kedit.pipeline.attempt", logging.INFO)) and f.filter(rec("flows.locks", logging.INFO))
    assert not f.filter(rec("httpx", logging.INFO)) and not f.filter(rec("prefect.task_runs", logging.INFO))
    assert not f.filter(rec("keditor", logging.INFO))
    assert f.filter(rec("prefect.flow_runs", logging.ERROR))


@pytest.fixture(scope="module")
def tiny_stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    (root / "corpus.txt").write_text("\n".join(CORPUS))
    cfg = {
        "feeds": [str(write_jsonl(root / "feed.jsonl", GOOD[:1]))],
        "model": str(train_tiny(root / "model")),
        "editor": "ft-m",
        "batch_size": 1,
        "gates": str(write_gates(root / "gates.yaml")),
        "tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db",
        "corpus": str(root / "corpus.txt"),
        "overrides": {"layers": [2], "lr": 0.02},
        "device": "cpu",
    }
    keep = ("PREFECT_", "MLFLOW_")  # the test's own environment must not decide what is shown
    env = {k: v for k, v in os.environ.items() if not k.startswith(keep)}
    env |= {
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "KEDIT_HOME": str(root / "home"),
        "TQDM_DISABLE": "1",
    }

    def run(flag: str, what: str) -> str:
        args = [sys.executable, "-c", DRIVER, flag, what, json.dumps({**cfg, "work_dir": str(root / "work")})]
        done = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=300)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        return out

    return run


def test_quiet_by_default_verbose_on_request(tiny_stream):
    quiet = tiny_stream("-q", "stream")
    assert VERDICT.search(quiet), quiet
    assert "accepted: 1" in quiet
    assert "HTTP Request:" not in quiet and "httpx" not in quiet
    assert not re.search(r"ERROR.*telemetry", quiet, re.IGNORECASE)
    assert "Finished in state" not in quiet

    verbose = tiny_stream("-v", "flow")
    assert "result: 1" in verbose
    assert "Finished in state Completed()" in verbose
    assert "HTTP Request:" in verbose
