"""End to end: the Prefect stream flow on a tiny trained model, a real Prefect test server and a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

from editing import PatchIntegrityError
from flows.stream import stream
from kedit.app.tiny import CORPUS, FTM, GOOD, HARMFUL, good, train_tiny, write_gates, write_jsonl
from kedit.core.facts import EditRequest
from kedit.core.models import load_model
from kedit.pipeline import session as sessions
from kedit.pipeline.config import StreamConfig
from kedit.store.tracking import T_VERDICT, T_VERSION, Tracker
from kedit.store.versions import export_version, fetch, rebuild, rollback_to


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def env(tmp_path, checkpoint, monkeypatch, prefect_server):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
    kept: list[sessions.Session] = []
    close = sessions.close_session

    def keep(session_id: str) -> None:  # keep the closed session's model so the test can compare it with a rebuilt one
        kept.append(sessions.get_session(session_id))
        close(session_id)

    monkeypatch.setattr(sessions, "close_session", keep)

    def config(records, batch_size=5, store="mlruns", overrides=FTM, editor="ft-m", **gates) -> StreamConfig:
        feed = write_jsonl(tmp_path / f"feed-{len(kept)}-{len(records)}.jsonl", records)
        return StreamConfig(
            feeds=(str(feed),),
            model=str(checkpoint),
            editor=editor,
            batch_size=batch_size,
            gates=str(write_gates(tmp_path / "gates.yaml", **gates)),
            tracking_uri=f"sqlite:///{tmp_path}/{store}/mlflow.db",
            corpus=str(tmp_path / "corpus.txt"),
            overrides=overrides,
            device="cpu",
            work_dir=str(tmp_path / "work"),
        )

    return tmp_path, config, kept


def key(record: dict) -> str:
    return EditRequest.from_dict(record).key


def fresh_base(checkpoint):
    return load_model(str(checkpoint), "cpu")[0]


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_harmful_edit_is_isolated_the_rest_accepted_and_tracked(env, checkpoint):
    tmp, config, kept = env
    summary = stream(config(GOOD + [HARMFUL]))

    # every fact ends somewhere: the harmful one quarantined by the drawdown gate, the rest accepted
    assert summary["records"] == 5 and summary["accepted"] == 4 and summary["quarantined"] == 1
    q = [json.loads(line) for line in (tmp / "work" / "stream_quarantine.jsonl").read_text().splitlines()]
    assert [r["id"] for r in q] == ["harmful"]
    assert {c["gate"] for c in q[0]["failed"]} & {"drawdown_prev", "drawdown_base"}
    accepted = json.loads((tmp / "work" / "accepted.json").read_text())
    assert sorted(accepted) == sorted(key(r) for r in GOOD)

    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    name = summary["registered_model"]
    versions = tracker.versions(name)
    prod = tracker.production(name)
    assert prod is not None and prod.version == versions[-1].version == summary["production"]
    chain = tracker.chain(name, prod.version)
    assert [v.version for v in chain] == [v.version for v in versions]  # each version's parent is the one before
    assert int(prod.tags["kedit.n_edits"]) == 4

    # attempts: the first batch and the harmful singleton were rolled back and made no version
    attempts = tracker.runs(name, "attempt")
    verdicts = {r.info.run_name.split()[1]: r.data.tags[T_VERDICT] for r in attempts}
    assert verdicts["batch-000"] == "rolled_back"
    for r in attempts:
        accepted = r.data.tags[T_VERDICT] == "accepted"
        assert (T_VERSION in r.data.tags) == accepted
        assert r.data.tags["mlflow.parentRunId"] == summary["run_id"]
        # the verdict stands out in the runs table: in the name, and a FAILED (red) status for a rejection
        assert r.info.status == ("FINISHED" if accepted else "FAILED")
        assert r.info.run_name.startswith("accepted " if accepted else "REJECTED ")
    assert sum(v == "accepted" for v in verdicts.values()) == len(versions)

    # the stream run's series over the global edit count, from 0 edits: drawdown, retention and the gates' limits
    run = summary["run_id"]
    steps = sorted(int(v.tags["kedit.n_edits"]) for v in versions)
    for series in ("drawdown_base", "drawdown_prev", "limit.drawdown_base", "limit.drawdown_prev", "limit.retention"):
        hist = tracker.metric_history(run, series)
        assert [step for step, _ in hist] == [0, *steps], series  # one point per step, none twice
    retention = tracker.metric_history(run, "retention")  # none at the first version: no earlier edit to retain
    assert retention[0] == (0, 1.0) and [s for s, _ in retention] == [0, *steps[1:]]
    assert tracker.metric_history(run, "drawdown_base")[0] == (0, 0.0)
    assert all(0 <= value <= 0.2 for _, value in tracker.metric_history(run, "drawdown_base"))
    assert {v for _, v in tracker.metric_history(run, "limit.drawdown_base")} == {0.2}  # the gates file's base_max
    assert {v for _, v in tracker.metric_history(run, "limit.retention")} == {0.5}
    assert [step for step, _ in tracker.metric_history(run, "n_edits")] == steps  # no step twice
    assert tracker.client.get_run(run).data.tags["kedit.limit.drawdown_base"] == "max 0.2"
    # the rejected attempts are on the stream run too: their drawdown at the edit count they would have reached
    rejected_base = [v for _, v in tracker.metric_history(run, "rejected.drawdown_base")]
    rejected_prev = [v for _, v in tracker.metric_history(run, "rejected.drawdown_prev")]
    assert len(rejected_base) == sum(v != "accepted" for v in verdicts.values())
    assert max(rejected_base) > 0.2 or max(rejected_prev) > 0.1  # what made them fail is on the chart
    # the versions belong to the stream run (its page lists them), their artifacts to the attempts
    for v in versions:
        assert v.run_id == run and tracker.client.get_run(v.tags["kedit.attempt_run"]).data.tags[T_VERDICT] == "accepted"
        assert all(value != "nan" for value in v.tags.values())
    assert set(summary["links"]) == {"runs", "stream", "model"} and run in summary["links"]["stream"]
    assert all("workflowType=machine_learning" in url for url in summary["links"].values())
    artifacts = {a.path for a in tracker.client.list_artifacts(run)}
    assert {"drawdown.png", "summary.json", "quarantine_gates.json"} <= artifacts

    # the in-memory model equals the base plus the verified delta chain, bit for bit
    base = fresh_base(checkpoint)
    rebuild(base, tracker, name, prod.version, kept[0].fingerprint)
    assert_same_weights(base, kept[0].model)


def test_tampered_or_missing_delta_is_refused(env, checkpoint):
    tmp, config, kept = env
    summary = stream(config(GOOD[:2], batch_size=1))
    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    name = summary["registered_model"]
    first = tracker.versions(name)[0]
    delta_file = Path(first.source) / "delta.safetensors"
    raw = bytearray(delta_file.read_bytes())
    raw[-1] ^= 0x01
    delta_file.write_bytes(bytes(raw))

    base = fresh_base(checkpoint)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PatchIntegrityError, match="sha256"):
        rebuild(base, tracker, name, summary["production"], kept[0].fingerprint)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "nothing applied from a bad chain"

    delta_file.unlink()
    with pytest.raises(PatchIntegrityError, match="missing"):
        rebuild(base, tracker, name, summary["production"], kept[0].fingerprint)
    # a stream cannot continue from a broken production chain either
    with pytest.raises(PatchIntegrityError):
        stream(config(GOOD[2:], batch_size=1))


def test_crash_mid_stream_resumes_without_loss_or_double(env, checkpoint, monkeypatch):
    tmp, config, kept = env
    calls = {"n": 0}
    real = Tracker.set_production

    def crash_on_third(self, name, version):
        calls["n"] += 1
        if calls["n"] == 3:  # the version is registered, the alias not yet moved: the worst moment
            raise KeyboardInterrupt("simulated crash")
        return real(self, name, version)

    monkeypatch.setattr(Tracker, "set_production", crash_on_third)
    cfg = config(GOOD + [HARMFUL], batch_size=1)
    with pytest.raises(BaseException, match="simulated crash"):
        stream(cfg)
    monkeypatch.setattr(Tracker, "set_production", real)

    summary = stream(cfg)
    tracker = Tracker(cfg.tracking_uri)
    name = summary["registered_model"]
    applied = [r.key for r in rebuild(fresh_base(checkpoint), tracker, name, summary["production"], None).requests]
    assert len(applied) == len(set(applied)), "no fact applied twice"
    assert summary["skipped"] >= 3  # two versions and the quarantined harmful fact survived the crash
    quarantined = set(tracker.quarantined(name, [v.version for v in tracker.chain(name, summary["production"])]))
    assert set(applied) | quarantined == {key(r) for r in GOOD + [HARMFUL]} and not set(applied) & quarantined
    interrupted = [r for r in tracker.runs(name, "attempt") if r.data.tags.get(T_VERDICT) == "interrupted"]
    assert interrupted and all(r.info.status == "KILLED" for r in interrupted)
    orphan = [
        v for v in tracker.versions(name) if v.version not in {c.version for c in tracker.chain(name, summary["production"])}
    ]
    assert len(orphan) == 1, "the version registered just before the crash is left out of the chain"

    # the resumed stream ends exactly where an uninterrupted one does: same facts, same weights
    reference = stream(config(GOOD + [HARMFUL], batch_size=1, store="reference"))
    ref_tracker = Tracker(f"sqlite:///{tmp}/reference/mlflow.db")
    ref_applied = [r.key for r in rebuild(fresh_base(checkpoint), ref_tracker, name, reference["production"], None).requests]
    assert applied == ref_applied
    assert_same_weights(kept[-1].model, kept[-2].model)


def test_rollback_moves_production_and_later_streams_continue_from_there(env, checkpoint, tmp_path):
    tmp, config, kept = env
    summary = stream(config(GOOD[:3], batch_size=1))
    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    name = summary["registered_model"]
    assert summary["production"] == "3"
    assert rollback_to(tracker, name, "1") == "3"
    assert tracker.production(name).version == "1"

    summary = stream(config([GOOD[3]], batch_size=1))
    v = tracker.production(name)
    assert v.version == "4" and v.parent == "1"
    assert [r.id for r in rebuild(fresh_base(checkpoint), tracker, name, "4", None).requests] == ["good-1", "good-4"]

    # the same operations from the command line
    from click.testing import CliRunner

    from kedit.app.cli import cli

    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    out = CliRunner().invoke(cli, ["status", "--model", str(checkpoint), "--tracking-uri", uri, "--feeds", str(tmp)])
    assert out.exit_code == 0, out.output
    assert "production: v4" in out.output and "accepted" in out.output and "drawdown vs base" in out.output
    table = out.output.split("drawdown history")[1].splitlines()
    assert "limits: drawdown_base max 0.2, drawdown_prev max 0.1, retention min 0.5" in table[0]
    assert [line.split()[0] for line in table[2:5]] == ["base", "v1", "v4"]  # the production chain, from 0 edits
    assert "/#/experiments/" in out.output and "workflowType=machine_learning" in out.output
    assert "pending: 0" not in out.output  # gates.yaml and other files in tmp were never fed
    out = CliRunner().invoke(cli, ["rollback", "--model", str(checkpoint), "--to", "2", "--tracking-uri", uri])
    assert out.exit_code == 0 and "from v4 to v2" in out.output
    assert tracker.production(name).version == "2"

    # export writes a plain checkpoint equal to the rebuilt version
    base, tok = load_model(str(checkpoint), "cpu")
    out = export_version(base, tok, tracker, name, "4", kept[-1].fingerprint, tmp_path / "export")
    exported = load_model(str(out), "cpu")[0]
    assert_same_weights(exported, kept[-1].model)
    assert json.loads((out / "kedit_version.json").read_text())["chain"] == ["1", "4"]


# single FT-M edits on the tiny model, measured: COSTLY alone loses 5 of the 8 known facts; NEAR_BUDGET loses
# one (0.125 of the 0.2 drawdown budget: more than half of it); OVER_BUDGET on top of it loses a second (0.25)
COSTLY = good(11, "spain", "the capital of {} is", "london", None, "2023-12-01")
NEAR_BUDGET = good(12, "italy", "{} is located in", "europe", None, "2023-12-02")
OVER_BUDGET = good(13, "france", "{} was born in", "asia", None, "2023-12-03")


def test_a_spent_budget_stops_the_stream_and_holds_back_the_rest_for_a_later_stream(env, checkpoint):
    tmp, config, kept = env
    feed = [COSTLY, NEAR_BUDGET, OVER_BUDGET, GOOD[0], GOOD[1]]
    budget = {"drawdown": {"step_max": None}, "spent_at": 0.5}
    summary = stream(config(feed, batch_size=1, **budget))

    # COSTLY fails the budget with none of it used: its own fault, quarantined. NEAR_BUDGET is accepted and
    # uses 0.125 of 0.2; OVER_BUDGET fails nothing but that budget: the stream stops there
    assert (summary["accepted"], summary["quarantined"], summary["held_back"]) == (1, 1, 3)
    assert summary["stopped"] == (
        "budget spent: drawdown_base is at 0.125 on production, 0.25 with this fact (limit 0.2 over 8 known facts)"
    )
    q = [json.loads(line) for line in (tmp / "work" / "stream_quarantine.jsonl").read_text().splitlines()]
    assert [r["id"] for r in q] == ["good-11"]
    held = [json.loads(line) for line in (tmp / "work" / "held_back.jsonl").read_text().splitlines()]
    assert [EditRequest.from_dict(r).key for r in held] == [key(r) for r in (OVER_BUDGET, GOOD[0], GOOD[1])]
    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    name = summary["registered_model"]
    # GOOD[0] and GOOD[1] were never tried
    assert sorted(r.info.run_name for r in tracker.runs(name, "attempt")) == [
        "REJECTED batch-000 (quarantined)",
        "REJECTED batch-002 (budget spent: stream stopped)",
        "accepted batch-001 → v1",
    ]
    stop = next(r for r in tracker.runs(name, "attempt") if "budget spent" in r.info.run_name)
    assert stop.data.tags["kedit.n_held_back"] == "1" and stop.data.tags[T_VERDICT] == "rolled_back"
    ledger = tracker.feed_ledger(name)
    assert [e["status"] for e in ledger.values()] == ["held_back"]
    from click.testing import CliRunner

    from kedit.app.cli import cli

    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    out = CliRunner().invoke(cli, ["status", "--model", str(checkpoint), "--tracking-uri", uri, "--feeds", str(tmp)])
    assert "facts held back by a spent budget (send again with kedit stream): feed-0-5.jsonl" in out.output, out.output

    # with a larger budget, the same feed sent again retries only the facts held back
    summary = stream(config(feed, batch_size=1, drawdown={"step_max": None, "base_max": 0.3}, spent_at=0.5))
    assert summary["held_back"] == 0 and summary["stopped"] is None
    assert summary["skipped"] == 2 and summary["accepted"] == 3  # COSTLY quarantined and NEAR_BUDGET applied before
    assert [e["status"] for e in tracker.feed_ledger(name).values()] == ["processed"]  # the newest entry
    assert stream(config(feed, batch_size=1, **budget))["skipped"] == 5  # and now the feed is done


def test_a_budget_spent_inside_a_bisection_holds_back_the_untried_half(env):
    """The stop can come from a bisection's first half: the second half is never tried, and held back."""
    tmp, config, _ = env
    budget = {"drawdown": {"step_max": None}, "spent_at": 0.5}
    assert stream(config([NEAR_BUDGET], batch_size=1, **budget))["accepted"] == 1  # 0.125 of the 0.2 budget used
    summary = stream(config([OVER_BUDGET, GOOD[1]], batch_size=2, **budget))
    # [OVER, GOOD1] fails the budget and is bisected; OVER alone fails nothing but the budget production already
    # half uses: the stream stops, and GOOD1's half is never tried
    assert (summary["accepted"], summary["quarantined"], summary["held_back"]) == (0, 0, 2), summary
    held = [json.loads(line) for line in (tmp / "work" / "held_back.jsonl").read_text().splitlines()]
    assert [EditRequest.from_dict(r).key for r in held] == [key(r) for r in (OVER_BUDGET, GOOD[1])]
    name = summary["registered_model"]
    runs = sorted(r.info.run_name for r in Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db").runs(name, "attempt"))
    assert runs == [
        "REJECTED batch-000 (bisected)",
        "REJECTED batch-000.1 (budget spent: stream stopped)",
        "accepted batch-000 → v1",
    ]


def test_a_squashed_chain_is_production_and_the_next_stream_skips_what_the_old_versions_settled(env, checkpoint):
    tmp, config, kept = env
    summary = stream(config(GOOD + [HARMFUL], batch_size=1))
    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    name = summary["registered_model"]
    old = [v.version for v in tracker.chain(name, summary["production"])]
    assert len(old) >= 3 and summary["quarantined"] >= 1, summary
    live = kept[0].model

    from click.testing import CliRunner

    from kedit.app.cli import cli

    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    out = CliRunner().invoke(cli, ["squash", "--model", str(checkpoint), "--upto", old[-2], "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    prod = tracker.production(name)
    new = [v.version for v in tracker.chain(name, prod.version)]
    assert len(new) == 2 and f"squashed into v{new[0]}" in out.output and f"production moved to v{new[1]}" in out.output
    base = fresh_base(checkpoint)
    rebuild(base, tracker, name, prod.version, None)
    assert_same_weights(base, live)

    # the same facts again, in another feed: applied ones and the one quarantined on an old version are skipped
    again = stream(config(GOOD[::-1] + [HARMFUL], batch_size=1))
    assert (again["skipped"], again["accepted"], again["quarantined"]) == (5, 0, 0)
    assert again["production"] == prod.version
    out = CliRunner().invoke(cli, ["status", "--model", str(checkpoint), "--tracking-uri", uri])
    assert out.exit_code == 0 and f"production: v{prod.version}" in out.output, out.output


def test_kill_9_mid_stream_then_resume(env, checkpoint):
    """A real `kedit stream` process is SIGKILLed after its second version; the next stream finishes the job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    tmp, config, kept = env
    cfg = config(GOOD + [HARMFUL], batch_size=1)
    cmd = [str(Path(sys.executable).parent / "kedit"), "stream", "--model", cfg.model, "--editor", "ft-m", "--batch-size", "1"]
    cmd += ["--feed", cfg.feeds[0], "--gates", cfg.gates, "--tracking-uri", cfg.tracking_uri, "--corpus", cfg.corpus]
    cmd += ["--device", "cpu", "--work-dir", str(tmp / "killed"), "--threads", "1"]
    for k, v in FTM.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    env_vars = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env_vars, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tracker = Tracker(cfg.tracking_uri)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            names = [m.name for m in tracker.client.search_registered_models()]
            prod = tracker.production(names[0]) if names else None
            if prod is not None and int(prod.version) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the stream finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    summary = stream(cfg)  # the dead stream's lock died with it
    name = summary["registered_model"]
    applied = [r.key for r in rebuild(fresh_base(checkpoint), tracker, name, summary["production"], None).requests]
    quarantined = set(tracker.quarantined(name, [v.version for v in tracker.chain(name, summary["production"])]))
    assert len(applied) == len(set(applied)), "no fact applied twice"
    assert set(applied) | quarantined == {key(r) for r in GOOD + [HARMFUL]} and not set(applied) & quarantined
    assert summary["skipped"] >= 2


def test_a_producer_that_numbers_every_feed_from_one_has_its_new_facts_applied(env, checkpoint):
    tmp, config, kept = env
    first = stream(config([dict(GOOD[0], id="1"), dict(GOOD[1], id="2")], batch_size=4))
    assert first["accepted"] == 2
    # the next feed numbers from 1 again: ids repeat, content differs; and one old fact is re-sent under a new id
    again = [dict(GOOD[2], id="1"), dict(GOOD[3], id="2"), dict(GOOD[0], id="3")]
    second = stream(config(again, batch_size=4))
    assert second["accepted"] == 2 and second["skipped"] == 1  # only the same content counts as already applied
    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    applied = rebuild(fresh_base(checkpoint), tracker, second["registered_model"], second["production"], None).requests
    assert sorted(r.subject for r in applied) == ["dave", "eve", "frank", "grace"]
    assert sorted(r.id for r in applied) == ["1", "1", "2", "2"]  # the producers' ids, kept as provenance


def test_a_fact_edited_twice_supersedes_its_first_value_and_rolls_back_bit_for_bit(env, checkpoint):
    tmp, config, kept = env
    first = stream(config([GOOD[0]], batch_size=1))  # dave was born in asia
    assert first["production"] == "1" and first["accepted"] == 1
    update = dict(GOOD[0], id="dave-again", target_new="africa", timestamp="2024-03-01")
    second = stream(config([update], batch_size=1))
    assert second["production"] == "2" and second["accepted"] == 1
    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    name = second["registered_model"]

    # the re-edit's old value is the one the chain wrote, and its run names the version it supersedes
    (reedit,) = second["reedits"].values()
    assert reedit["supersedes_version"] == "1" and reedit["supersedes_key"] == key(GOOD[0])
    assert reedit["target_true"] == "asia" and reedit["feed_target_true"] is None
    (run,) = [
        r for r in tracker.runs(name, "attempt") if r.data.tags[T_VERDICT] == "accepted" and r.info.run_id != first["run_id"]
    ][:1]
    assert run.data.tags["kedit.supersedes"] == "v1"
    facts = json.loads(Path(tracker.client.download_artifacts(run.info.run_id, "facts.json")).read_text())
    assert facts[0]["target_true"] == "asia" and facts[0]["target_true_from"] == "v1" and facts[0]["held"]
    assert facts[0]["p_new"] > facts[0]["p_old"]  # the efficacy check compared africa with the edited asia
    v2 = tracker.version(name, "2")
    assert v2.tags["kedit.supersedes"] == "v1"
    chain = rebuild(fresh_base(checkpoint), tracker, name, "2", None)
    assert chain.requests[0].target_true is not None  # the model's own answer, read before the first edit
    assert chain.requests[1].target_true == "asia"  # stored with the request
    assert [(r.target_new, v) for r, v in chain.applied] == [("asia", "1"), ("africa", "2")]

    # the same value again is a no-op, quarantined naming the version that holds it
    third = stream(config([dict(update, id="dave-3", timestamp="2024-04-01")], batch_size=1))
    assert third["production"] == "2" and third["quarantined_noop"] == 1 and third["accepted"] == 0
    q = [json.loads(line) for line in (tmp / "work" / "stream_quarantine.jsonl").read_text().splitlines()]
    assert "no-op: v2 already holds 'africa'" in q[-1]["reason"]

    # the first record sent again is not a re-edit back to asia: it was applied on this chain
    fourth = stream(config([dict(GOOD[0], id="dave-resent")], batch_size=1))
    assert fourth["skipped"] == 1 and fourth["production"] == "2"
    assert list(kept[-1].skipped.values()) == ["already applied"]

    # rolling the re-edit back restores the first edit's model bit for bit
    assert rollback_to(tracker, name, "1") == "2"
    base = fresh_base(checkpoint)
    rebuild(base, tracker, name, "1", None)
    assert_same_weights(base, kept[0].model)


def test_a_fact_that_does_not_hold_in_an_accepted_batch_is_retried_alone_then_did_not_hold(env, checkpoint):
    tmp, config, kept = env
    # a learning rate of 0 changes nothing; with efficacy not enforced the batch passes its gates all the same
    inert = dict(FTM, lr=0.0)
    summary = stream(config(GOOD[:2], batch_size=2, overrides=inert, edits={"efficacy_min": None}))
    assert summary["production"] == "1"  # the batch became a version ...
    assert summary["accepted"] == 0 and summary["did_not_hold"] == 2  # ... but the model states neither fact
    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    name = summary["registered_model"]
    runs = sorted((r.data.tags[T_VERDICT], r.info.run_name) for r in tracker.runs(name, "attempt"))
    assert [v for v, _ in runs] == ["accepted", "did_not_hold", "did_not_hold"]
    assert runs[0][1] == "accepted batch-000 → v1" and runs[1][1].startswith("DID NOT HOLD batch-000.retry-")
    q = [json.loads(line) for line in (tmp / "work" / "stream_quarantine.jsonl").read_text().splitlines()]
    assert {r["gate"] for r in q} == {"held"} and {r["key"] for r in q} == {key(r) for r in GOOD[:2]}
    assert "after batch-000 (v1); retried alone" in q[0]["reason"] and q[0]["after_batch"]["held"] is False
    from click.testing import CliRunner

    from kedit.app.cli import cli

    out = CliRunner().invoke(cli, ["status", "--model", str(checkpoint), "--tracking-uri", f"sqlite:///{tmp}/mlruns/mlflow.db"])
    assert out.exit_code == 0 and "(2 did not hold: retried alone)" in out.output and "did_not_hold" in out.output
    manifest = rebuild(fresh_base(checkpoint), tracker, name, "1", None)
    assert manifest.applied == []  # the version's facts are not the model's facts
    # the same facts in a new feed are not tried again: their verdict stands
    again = stream(config([dict(GOOD[0], id="x")], batch_size=1, overrides=inert, edits={"efficacy_min": None}))
    assert again["skipped"] == 1 and again["production"] == "1"


MEMORY_EDITORS = {
    "grace": {"layer": 2, "codebook.radius": 0.5},
    # the tiny model knows no question frames or prefixes: the value trains on the prompt alone, as GRACE's, and
    # needs a value far beyond ROME's norm bound to move its answer (the preset's bound is SmolLM2's)
    "balancedit": {
        "layer": 2,
        "value_layer": None,  # the whole prompt is the subject: no block above 2 but the last, which no later token reads
        "templates.count": 0,
        "frames": [],
        "value.kl_factor": 0.0,
        "value.steps": 100,
        "value.lr": 1.0,
        "value.clamp_norm": 1000.0,
    },
    # margins at the tiny model's scale; a shard per batch of two, three shards: the re-edit opens the third
    # (merges and their chains are tested in tests/test_wise.py)
    "wise": {
        "layer": 2,
        "memory.shard_edits": 2,
        "memory.shards": 3,
        "router.irrelevant_max": 0.05,
        "router.edit_min": 0.5,
        "router.gap": 0.2,
        "train.optimizer": "adam",
        "train.lr": 0.5,
        "templates.count": 0,
        "irrelevant.length": 4,
        "irrelevant.passages": 4,
    },
}
# WISE writes a fact at the prompt's last token: two of GOOD's facts end "was born in", whose state carries
# little of the subject in the tiny model, so one written value cannot state both (and "is located in" is
# beyond what one token's write moves it to); its stream edits facts whose prompts end apart
WISE_FACTS = [
    good(1, "eve", "{} speaks", "german", None, "2024-01-01"),
    good(2, "dave", "{} was born in", "asia", None, "2024-01-02"),
    good(3, "frank", "{} leads the", "company", None, "2024-01-03"),
    good(4, "carol", "{} leads the", "company", None, "2024-01-04"),
]
ENTRIES = {"grace": [2.0, 4.0, 4.0], "balancedit": [2.0, 4.0, 4.0], "wise": [2.0, 4.0, 5.0]}


def as_asked(records: list[dict], editor: str) -> list[dict]:
    """BalancEdit keys a fact at its subject's last token. The tiny model carries little from a subject to the
    end of a prompt (a value trained at "dave" leaves P(asia) near 0.01), so its facts name the whole prompt
    as the subject: the flow's plumbing is under test here, the method's quality in docs/benchmarks.md."""
    if editor != "balancedit":
        return records
    return [dict(r, subject=r["prompt"].replace("{}", r["subject"]), prompt="{}") for r in records]


@pytest.mark.parametrize("editor", sorted(MEMORY_EDITORS))
def test_a_memory_editor_streams_like_any_editor_and_a_reedit_replaces_its_codebook_entry(env, checkpoint, editor):
    """A memory editor through the flow: its memory travels in module patches (a codebook's entries' facts in
    the editor state of each version); a later stream resumes it, and a re-edit replaces a codebook's entry."""
    from kedit.core.routing import routers

    def entries(model) -> float:
        return float(sum(m.n_entries() for m in routers(model).values()))

    tmp, config, kept = env
    grace = MEMORY_EDITORS[editor]
    facts = WISE_FACTS if editor == "wise" else GOOD
    first = stream(config(as_asked(facts, editor), batch_size=2, editor=editor, overrides=grace))
    assert first["accepted"] == 4 and first["production"] == "2"
    assert entries(kept[-1].model) == ENTRIES[editor][1]
    update = dict(facts[0], id="first-again", target_new="english" if editor == "wise" else "africa", timestamp="2024-03-01")
    second = stream(config(as_asked([update], editor), batch_size=1, editor=editor, overrides=grace))
    assert second["accepted"] == 1 and second["production"] == "3"
    model = kept[-1].model
    assert entries(model) == ENTRIES[editor][2]  # a codebook's entry replaced, not stacked

    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    name = second["registered_model"]
    # the memory gate's series on the stream runs: the codebook's size at each accepted step
    sizes = tracker.metric_history(first["run_id"], "memory_entries") + tracker.metric_history(second["run_id"], "memory_entries")
    assert [(step, v) for step, v in sizes] == list(zip([2, 4, 5], ENTRIES[editor]))
    assert tracker.metric_history(second["run_id"], "memory_retain_hit_rate")
    base = fresh_base(checkpoint)
    rebuild(base, tracker, name, "3", None)
    assert_same_weights(base, model)
    assert rollback_to(tracker, name, "2") == "3"
    base = fresh_base(checkpoint)
    rebuild(base, tracker, name, "2", None)
    assert_same_weights(base, kept[0].model)


ALPHAEDIT_TINY = {
    "layers": [1, 2],
    "solve.l2": 1e-6,
    "solve.nullspace_threshold": 1e-3,
    **{"statistics.samples": 40, "statistics.length": 16, "templates.count": 2, "templates.length": 3},
}


def test_alphaedit_versions_hold_their_keys_and_the_chain_rebuilds_its_key_sums_bit_for_bit(env, checkpoint):
    tmp, config, kept = env
    gates = {"edits": {"efficacy_min": None}, "drawdown": None, "retention": None}  # every batch accepted
    summary = stream(config(GOOD, batch_size=1, editor="alphaedit", overrides=ALPHAEDIT_TINY, **gates))
    tracker = Tracker(f"sqlite:///{tmp}/mlruns/mlflow.db")
    name = summary["registered_model"]
    live = {k: v for k, v in kept[-1].editor.state_dict().items()}
    assert sorted(live) == ["key_cache.1", "key_cache.2"]
    chain = rebuild(fresh_base(checkpoint), tracker, name, summary["production"], None)
    assert len(chain.versions) == 4 and chain.state.keys() == live.keys()
    assert all(torch.equal(chain.state[k], live[k]) for k in live)
    for info in chain.versions:  # each version stored its fact's keys, one per layer, not the sums
        stored = fetch(tracker, info, tmp / f"fetched-{info.version}", None).state
        assert sorted(stored) == ["keys.1.0", "keys.2.0"] and stored["keys.1.0"].shape[0] == 1

    # a squash stores the sums at its head; the copy after it adds its keys to them
    from click.testing import CliRunner

    from kedit.app.cli import cli

    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    out = CliRunner().invoke(
        cli, ["squash", "--model", str(checkpoint), "--upto", chain.versions[1].version, "--tracking-uri", uri]
    )
    assert out.exit_code == 0, out.output
    squashed = rebuild(fresh_base(checkpoint), tracker, name, tracker.production(name).version, None)
    assert [v.version for v in squashed.versions] != [v.version for v in chain.versions]
    assert all(torch.equal(squashed.state[k], live[k]) for k in live)


MEND_TINY = {"layers": [2, 3], "network.rank": 16, "edit_lr": 0.01}
MEND_TRAIN = {"train.batch": 2, "train.lr": 1e-3, "train.lr_lr": 1e-2, "train.val_facts": 6, "train.val_every": 10}


def test_mend_trains_as_a_tracked_flow_publishes_and_a_stream_edits_with_it(env, checkpoint):
    """kedit train mend on the tiny model: held-out records never trained on, one run with loss curves and
    validations (a resumed sitting logs no step twice), the network registered for the base with alias
    production; then a stream edits with it and its versions name the network."""
    from flows.train import train
    from kedit.app.tiny import training_facts
    from kedit.pipeline.training import TrainConfig
    from kedit.store.naming import identify

    tmp, config, kept = env
    records = training_facts()
    data = write_jsonl(tmp / "train.jsonl", records)
    holdout = write_jsonl(tmp / "holdout.jsonl", records[:3])  # a benchmark's records: by id and by subject
    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    cfg = dict(model=str(checkpoint), data=(str(data),), holdout=(str(holdout),), out=str(tmp / "train"), tracking_uri=uri)
    over = {**MEND_TINY, **MEND_TRAIN, "train.steps": 20, "train.checkpoint_every": 5}
    first = train(TrainConfig(**cfg, overrides=over, max_minutes=1e-9))  # a sitting cut short before its first step
    assert first["stopped"] == "time" and first["published"] is None  # nothing validated: nothing published
    done = train(TrainConfig(**cfg, overrides=over))  # the same training, resumed: same run
    assert done["run_id"] == first["run_id"] and done["stopped"] == "steps" and done["step"] == 20
    held_subjects = {r["subject"] for r in records[:3]}
    trained_ids = json.loads((tmp / "train" / "split.json").read_text())
    trained = {r["id"]: r for r in records if r["id"] in trained_ids["train"] + trained_ids["val"]}
    assert trained and not ({r["id"] for r in records[:3]} & set(trained))
    assert not held_subjects & {r["subject"] for r in trained.values()} and done["n_held_out"] == 9

    tracker = Tracker(uri)
    registered, fingerprint = identify(str(checkpoint))
    name = done["published"]
    assert name == f"{registered}-mend" and done["version"] == "1"
    prod = tracker.production(name)
    assert prod.version == "1" and prod.tags["kedit.base_fingerprint"] == fingerprint and prod.run_id == done["run_id"]
    for series in ("total_loss", "edit_loss", "loc_loss"):
        assert [s for s, _ in tracker.metric_history(done["run_id"], series)] == list(range(1, 21)), series
    assert [s for s, _ in tracker.metric_history(done["run_id"], "val_edit_success")] == [10, 20]
    params = tracker.client.get_run(done["run_id"]).data.params
    assert params["base_fingerprint"] == fingerprint and "data_sha256.train.jsonl" in params
    assert Path(done["plot"]).is_file() and "training.png" in {a.path for a in tracker.client.list_artifacts(done["run_id"])}
    again = train(TrainConfig(**cfg, overrides=over))  # finished: nothing trained or published twice
    assert again["version"] == "1" and len(tracker.versions(name)) == 1
    # a benchmark's scratch store gets the same network, verified on the way
    from kedit.store.networks import copy_network

    scratch = Tracker(f"sqlite:///{tmp}/scratch/mlflow.db")
    assert copy_network(tracker, scratch, registered, "mend", fingerprint, str(checkpoint)) == "1"
    assert scratch.production(name).tags["kedit.manifest_sha256"] == prod.tags["kedit.manifest_sha256"]

    # facts the tiny model does not know (its known capitals and languages stay out of the way): the gates here
    # check that the stream takes the editor, not the tiny network's quality
    feed = [{**r, "id": f"feed-{i}", "timestamp": f"2024-02-0{i + 1}"} for i, r in enumerate(records[20:22])]
    gates = {"edits": {"efficacy_min": None}, "drawdown": None, "retention": None}
    summary = stream(config(feed, batch_size=2, editor="mend", overrides=MEND_TINY, **gates))
    assert summary["records"] == 2 and summary["accepted"] + summary["did_not_hold"] == 2
    versions = tracker.versions(summary["registered_model"])
    assert versions, f"the stream made no version: {summary}"
    assert json.loads(versions[-1].tags["kedit.editor_assets"]) == {
        "network": name,
        "network_version": "1",
        "network_sha256": prod.tags["kedit.manifest_sha256"],
    }


MEMIT_TINY = {"layers": [1, 2], "solve.mom2_weight": 1.0, "statistics.samples": 40, "statistics.length": 16}
MEMIT_TINY |= {"templates.count": 2, "templates.length": 3}
# the gates are not what this test is about: every batch is accepted
LOOSE = {"edits": {"efficacy_min": 0.0}, "retention": {"min": 0.0}, "drawdown": {"base_max": 1.0, "step_max": 1.0}}


def test_federated_clients_stream_under_their_own_names_and_upload_each_version_once(env, monkeypatch):
    """Client a edits two facts; client b four, two of them a's: b reuses a's vectors for those and uploads the
    two it optimized, exactly once although it is killed between its version and the upload."""
    import dataclasses

    from kedit.pipeline import federation
    from kedit.store.mkv import MKVStore

    tmp, config, kept = env
    mkv = str(tmp / "mkv")

    def client(name, records, refine=False):
        cfg = config(records, batch_size=4, overrides=MEMIT_TINY, editor="memit", **LOOSE)
        return dataclasses.replace(cfg, client=name, mkv=mkv, mkv_refine=refine, work_dir=str(tmp / f"work-{name}"))

    a = stream(client("a", GOOD[:2]))
    assert a["registered_model"].endswith("@a") and a["production"] == "1"
    store = MKVStore(mkv)
    assert store.load(tmp / "mkv" / "a" / "slot-1").n == 2

    real = federation.publish

    def killed_before_upload(session, on_chain):
        if any(Path(session.cfg.work_dir).rglob("*.safetensors")) and session.attempt is not None:
            raise KeyboardInterrupt("simulated crash before the upload")
        return real(session, on_chain)

    monkeypatch.setattr(federation, "publish", killed_before_upload)
    with pytest.raises(BaseException, match="before the upload"):
        stream(client("b", GOOD, refine=True))  # a's vectors checked on b's model, stepped where they fall short
    b_session = next(s for s in [*kept, *sessions._SESSIONS.values()] if s.registered.endswith("@b"))
    assert b_session.editor.exchange.refine
    assert b_session.editor.diagnostics["target_reused"] == [1.0, 1.0, 0.0, 0.0]  # GOOD[:2] came from a
    assert b_session.editor.exchange.sources[:2] == ["a/slot-1#0", "a/slot-1#1"]
    assert not (tmp / "mkv" / "b").exists()  # the version is in production, its vectors still on b's disk
    tracker = Tracker(b_session.cfg.tracking_uri)
    run = tracker.runs(b_session.registered, "attempt")[0]
    assert (run.data.metrics["mkv_reused"], run.data.metrics["mkv_offered"]) == (2.0, 2.0)
    monkeypatch.setattr(federation, "publish", real)

    b = stream(client("b", GOOD, refine=True))  # the restart uploads them; what v1 holds is not edited again
    # (a fact of v1 whose edit did not hold on this tiny model is edited again: "accepted means held"; how many
    # hold depends on the tiny model's arithmetic, so the test counts, it does not fix the number)
    assert b["registered_model"].endswith("@b") and b["skipped"] + b["accepted"] + b["did_not_hold"] == 4
    assert b["skipped"] >= 1
    edited_again = {k for s in b["steps"] for k in s.get("keys", [])}
    assert len(edited_again) == 4 - b["skipped"]  # every fact v1 holds is skipped, never edited twice
    assert store.load(tmp / "mkv" / "b" / "slot-1").n == 2  # only what b optimized itself
    assert not list((tmp / "work-b").rglob("*.safetensors"))


def test_federate_runs_each_clients_slot_as_its_own_stream_and_resumes_by_running_again(env):
    """FLEKE's slots over one file: GOOD split by relation gives client0 dave and eve ("was born in"), client1
    grace and frank (one fact each of two relations). Slot 0: client0 dave, client1 grace; slot 1: each its next
    fact and the other's slot-0 fact, whose vector it reuses from the store instead of optimizing it."""
    import dataclasses

    from flows.federate import federate
    from kedit.pipeline.config import FederationConfig
    from kedit.store.mkv import MKVStore

    tmp, config, _ = env
    every = config(GOOD, batch_size=4, overrides=MEMIT_TINY, editor="memit", **LOOSE)
    every = dataclasses.replace(every, client="client", mkv=str(tmp / "mkv"), work_dir=str(tmp / "fed"))
    cfg = FederationConfig(every, clients=2, slots=2, own=1, shared=1, split="relation", seed=0)
    result = federate(cfg)

    feeds = tmp / "fed" / "federation"
    subjects = {
        f"{p.parent.name}/{p.stem}": [json.loads(x)["subject"] for x in p.read_text().splitlines()]
        for p in feeds.rglob("*.jsonl")
    }
    assert subjects == {
        "slot-0/client0": ["dave"],
        "slot-0/client1": ["grace"],
        "slot-1/client0": ["eve", "grace"],
        "slot-1/client1": ["frank", "dave"],
    }
    rows = {(r["slot"], r["client"]): r for r in result["slots"]}
    assert [rows[t, c]["facts"] for t in (0, 1) for c in ("client0", "client1")] == [1, 1, 2, 2]
    assert [rows[t, c]["reused"] for t in (0, 1) for c in ("client0", "client1")] == [0, 0, 1, 1]
    assert result["totals"]["reused_share_after_slot_0"] == 0.5
    # every fact dealt ends in an accepted version (the gates are loose): held, or did not hold on the tiny model
    assert all(r["accepted"] + r["did_not_hold"] == r["facts"] for r in result["slots"])
    # each client is a registered model of its own, with its own production
    assert sorted(name.rsplit("@", 1)[1] for name in result["production"]) == ["client0", "client1"]
    assert all(result["production"].values())
    # what a client uploaded is what its accepted attempts optimized, once (a retry alone optimizes again), and
    # never a vector it reused: at least its own two facts, and the store holds exactly what was offered
    store = MKVStore(tmp / "mkv")
    uploaded = {c: sum(store.load(d).n for d in (tmp / "mkv" / c).iterdir()) for c in ("client0", "client1")}
    assert uploaded == {c: sum(r["offered"] for r in result["slots"] if r["client"] == c) for c in uploaded}
    assert min(uploaded.values()) >= 2

    again = federate(cfg)  # the same feeds: every client's stream finds its facts on its chain
    assert again["production"] == result["production"]
    assert again["totals"]["accepted"] == 0 and again["totals"]["reused"] == 0
    assert again["totals"]["skipped"] == result["totals"]["facts"] == 6  # each fact its chain settled, edited never again
    assert {c: sum(store.load(d).n for d in (tmp / "mkv" / c).iterdir()) for c in ("client0", "client1")} == uploaded
