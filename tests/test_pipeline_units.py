"""The pipeline's bookkeeping, without a model: run parameters from feed names, and a retried record-attempt."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from evaluation.gates import GateReport, GateSuite
from kedit.core.facts import EditRequest
from kedit.pipeline.attempt import Attempt, record_attempt
from kedit.pipeline.session import _SESSIONS, Session, feed_params

MLFLOW_KEY = re.compile(r"^[A-Za-z0-9_.\- /]+$")  # what MLflow accepts in a parameter key


def test_feed_names_become_valid_distinct_parameter_keys():
    params = feed_params({"/f/feed(1).jsonl": "a", "/g/feed(1).jsonl": "b", "/h/feed[1].jsonl": "c", "/i/ok.jsonl": "d"})
    assert sorted(params.values()) == ["a", "b", "c", "d"]  # nothing lost when names meet
    assert all(MLFLOW_KEY.match(k) for k in params), params
    assert params["feed_sha256.ok.jsonl"] == "d"


class FlakyTracker:
    """Fails once at the end of the attempt's writes, like a tracking server that drops a request."""

    def __init__(self):
        self.failures_left = 1
        self.logged: list[tuple] = []

    def log_metrics(self, run_id, metrics, step):
        self.logged.append(("metrics", run_id))

    def log_dict(self, run_id, obj, name):
        self.logged.append(("dict", name))

    def set_tags(self, run_id, tags):
        self.logged.append(("tags", tags))

    def rename_run(self, run_id, name):
        self.logged.append(("name", name))

    def log_figure(self, run_id, figure, name):
        self.logged.append(("figure", name))

    def end_run(self, run_id, status="FINISHED"):
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("tracking server went away")
        self.logged.append(("end", run_id))


@pytest.fixture
def session():
    reqs = [EditRequest("1", s, "{} is in", "Asia") for s in ("Paris", "Rome")]
    s = Session("s1", SimpleNamespace(mkv=None), GateSuite([], bisect=True), FlakyTracker(), "m", "fp", None, None, None)
    s.requests = {r.key: r for r in reqs}
    s.progress = SimpleNamespace(update=lambda n: None)
    s.attempt = Attempt("batch-000", list(s.requests), "run-1", None, {}, seconds={"tracking": 0.0})
    _SESSIONS[s.id] = s
    yield s
    _SESSIONS.pop(s.id, None)


def test_a_retried_record_attempt_quarantines_each_fact_once(session):
    report = GateReport([], {}, {}, [])
    with pytest.raises(ConnectionError):
        record_attempt(session.id, report, "rolled_back", quarantine=True)
    assert session.quarantined == []  # the failed try left the session as it was
    first = record_attempt(session.id, report, "rolled_back", quarantine=True)
    again = record_attempt(session.id, report, "rolled_back", quarantine=True)  # a retry after success: nothing twice
    assert first == again == {"verdict": "rolled_back", "quarantined": 2, "retry": [], "stopped": None}
    assert sorted(q["key"] for q in session.quarantined) == sorted(session.requests)
    assert [q["id"] for q in session.quarantined] == ["1", "1"]  # one producer id, two facts
    assert sum(1 for kind, _ in session.tracker.logged if kind == "end") == 1
    assert ("name", "REJECTED batch-000 (quarantined)") in session.tracker.logged
    assert len(session.rejected) == 1  # the rejected point is kept once, by the try that succeeded


class StartTracker:
    """A store that drops the first log_params request: the start is retried after its run was opened."""

    def __init__(self):
        self.runs: list[str] = []
        self.failures_left = 1

    def quarantined(self, name, chain):
        return {}

    def feed_ledger(self, name):
        return {}

    def start_run(self, registered, name, tags, parent_run_id=None):
        self.runs.append(name)
        return f"run-{len(self.runs)}"

    def log_params(self, run_id, params):
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("tracking server went away")

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        pass

    def log_dict(self, run_id, obj, name):
        pass

    def set_tags(self, run_id, tags):
        pass

    def end_run(self, run_id, status="FINISHED"):
        pass


def test_a_retried_start_opens_one_stream_run_and_refuses_each_fact_once(tmp_path):
    import json

    import torch

    from editing import EditError
    from kedit.core.config import StrictConfig
    from kedit.pipeline.config import StreamConfig
    from kedit.pipeline.plan import Plan
    from kedit.pipeline.session import start_stream

    # with their old value given: nothing to read from a model (this test has none)
    reqs = [EditRequest("1", s, "{} is in", "Asia", "Europe") for s in ("Paris", "Rome", "Oslo")]
    (tmp_path / "plan.json").write_text(json.dumps([r.to_dict() for r in reqs]))
    keys = [r.key for r in reqs]
    plan = Plan(str(tmp_path / "plan.json"), keys, 3, 0, 0, {"f.jsonl": "sha"}, dict.fromkeys(keys, "f.jsonl"), {})

    class Editor:
        hparams = StrictConfig()

        def require_supported(self, batch):
            if batch[0].subject == "Oslo":
                raise EditError("no target_true")

    gates = SimpleNamespace(source="gates.yaml", params=lambda: {})
    cfg = StreamConfig(feeds=("f.jsonl",), model="m", editor="ft-m", batch_size=2)
    s = Session("s2", cfg, gates, StartTracker(), "m", "fp", torch.nn.Linear(1, 1), None, Editor())
    _SESSIONS[s.id] = s
    try:
        with pytest.raises(ConnectionError):
            start_stream(s.id, plan)
        batches = start_stream(s.id, plan)
        assert start_stream(s.id, plan) == batches == [keys[:2]]
    finally:
        _SESSIONS.pop(s.id, None)
    assert [n for n in s.tracker.runs if n.startswith("stream-")] == [s.tracker.runs[0]]  # one parent run
    assert [n for n in s.tracker.runs if n.startswith("refused-")] == ["refused-1"]  # Oslo refused once
    assert [q["key"] for q in s.quarantined] == [keys[2]]


def test_drawdown_png_shows_every_series_its_limit_and_the_rejected_attempts():
    from kedit.pipeline.monitor import plot_drawdown

    figures = []
    tracker = SimpleNamespace(log_figure=lambda run, fig, name: figures.append((name, fig)))
    history = [
        {"n_edits": 0, "drawdown_base": 0.0, "drawdown_prev": 0.0, "retention": 1.0},
        {"n_edits": 4, "drawdown_base": 0.02, "drawdown_prev": 0.02},
        {"n_edits": 8, "drawdown_base": 0.04, "drawdown_prev": 0.02, "retention": 0.9},
    ]
    rejected = [{"n_edits": 12, "drawdown_base": 0.116, "drawdown_prev": 0.073, "retention": 1.0}]
    limits = {"drawdown_base": 0.1, "drawdown_prev": 0.05, "retention": 0.8}
    session = SimpleNamespace(registered="m", run_id="r", tracker=tracker, history=history, rejected=rejected, limits=limits)
    plot_drawdown(session)
    ((name, fig),) = figures
    top, bottom = fig.axes[0], fig.axes[1]
    labels = top.get_legend_handles_labels()[1] + bottom.get_legend_handles_labels()[1]
    for wanted in ("drawdown vs base", "drawdown vs previous version", "retention of earlier edits"):
        assert wanted in labels and f"rejected attempt ({wanted})" in labels
    assert {"limit: drawdown_base 0.1", "limit: drawdown_prev 0.05", "limit: retention 0.8"} <= set(labels)
    lines = {line.get_label(): line for line in top.get_lines()}
    base, prev = lines["drawdown vs base"], lines["drawdown vs previous version"]
    assert list(base.get_xdata()) == [0, 4, 8]  # from 0 edits
    # lines that lie on each other both show: other style, other marker
    assert (base.get_linestyle(), base.get_marker()) != (prev.get_linestyle(), prev.get_marker())
    assert name == "drawdown.png" and top.get_xlabel() == "" and bottom.get_xlabel() == "edits applied to the model"


def test_a_resumed_stream_shows_the_attempts_rejected_on_its_chain_before():
    from kedit.pipeline.monitor import BASE_POINT, earlier_rejections, start_series

    logged = []
    found = [
        ("", 4, "REJECTED batch-000 (bisected)", {"drawdown_base": 0.3}),
        ("1", 1, "REJECTED b (quarantined)", {"retention": 0.2}),
    ]
    tracker = SimpleNamespace(
        rejected_attempts=lambda name, parents: [f for f in found if f[0] in parents],
        log_metrics=lambda run, metrics, step: logged.append((step, metrics)),
    )
    history = [dict(BASE_POINT), {"n_edits": 2.0, "drawdown_base": 0.01}]
    session = SimpleNamespace(registered="m", run_id="r", tracker=tracker, chain=["1"], history=history, limits={}, logged=set())
    session.rejected = earlier_rejections(session)
    assert [(p["n_edits"], p["attempt"]) for p in session.rejected] == [(4.0, found[0][2]), (3.0, found[1][2])]
    start_series(session)
    start_series(session)  # a retried start logs nothing twice
    rejected = [(step, m) for step, m in logged if any(k.startswith("rejected.") for k in m)]
    assert rejected == [(4, {"rejected.drawdown_base": 0.3}), (3, {"rejected.retention": 0.2})]
    assert [step for step, m in logged if "drawdown_base" in m] == [0, 2]


def test_a_local_store_keeps_its_artifacts_beside_its_database_not_in_the_working_directory(tmp_path, monkeypatch):
    """MLflow's default artifact root is ./mlruns under the working directory, whichever SQLite store it is:
    a bench's work dir and the project's store would share one folder."""
    from kedit.store.tracking import Tracker

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tracker = Tracker(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    run = tracker.start_run("kedit-m@client", "r", {})
    tracker.log_dict(run, {"a": 1}, "x.json")
    tracker.end_run(run)
    assert not (cwd / "mlruns").exists()
    assert [p.name for p in (tmp_path / "store" / "artifacts").rglob("x.json")] == ["x.json"]


def test_a_federation_config_names_its_clients_and_refuses_what_cannot_be_a_federation(tmp_path):
    from kedit.pipeline.config import FederationConfig, StreamConfig, StreamError

    every = StreamConfig(feeds=("data.json",), model="m", client="tenant-", mkv=str(tmp_path / "mkv"), work_dir=str(tmp_path))
    plan = {"clients": 3, "slots": 2, "own": 1, "shared": 1, "split": "relation", "seed": 0}
    cfg = FederationConfig(every, **plan)
    one = cfg.client_stream(2, "slot-1/tenant-2.jsonl")
    assert (one.client, one.feeds, one.mkv, one.fmt) == ("tenant-2", ("slot-1/tenant-2.jsonl",), every.mkv, "feed")
    assert one.work_dir == str(tmp_path / "tenant-2")  # each client's lists and pending uploads in its own folder
    bad = [
        ({"stream": StreamConfig(feeds=("a.json", "b.json"), model="m", client="c", mkv="s")}, "one data file"),
        ({"stream": StreamConfig(feeds=("a.json",), model="m")}, "share an MKV store"),
        ({"stream": every, "clients": 1}, ">= 2 clients"),
        ({"stream": every, "split": "random"}, "split must be one of relation, cluster"),
    ]
    for kwargs, message in bad:
        with pytest.raises(StreamError, match=message):
            FederationConfig(**(plan | kwargs))


def test_kedit_federate_hands_the_flow_one_config_built_from_its_options(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import flows.federate
    from kedit.app.cli import cli

    seen = []

    def flow(cfg):
        seen.append(cfg)
        return {"slots": [], "totals": {"accepted": 0, "reused": 0, "reused_share_after_slot_0": 0.0}, "production": {}}

    monkeypatch.setattr(flows.federate, "federate", flow)
    data = tmp_path / "cf.json"
    data.write_text("[]")
    args = ["federate", "--data", str(data), "--model", "m", "--editor", "memit", "--format", "counterfact"]
    args += ["--clients", "3", "--slots", "4", "--own", "1", "--shared", "1", "--split", "cluster", "--seed", "7"]
    args += ["--clients-named", "tenant-", "--set", "layers=[1, 2]", "--work-dir", str(tmp_path / "w")]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    (cfg,) = seen
    assert (cfg.clients, cfg.slots, cfg.own, cfg.shared, cfg.split, cfg.seed) == (3, 4, 1, 1, "cluster", 7)
    every = cfg.stream
    assert (every.feeds, every.model, every.editor, every.fmt) == ((str(data),), "m", "memit", "counterfact")
    assert every.overrides == {"layers": [1, 2]} and every.mkv == str(tmp_path / "w" / "mkv")  # the store by default
    assert cfg.client_stream(1, "f.jsonl").client == "tenant-1"
