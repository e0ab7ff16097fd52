"""Feeds are read only from the served directories, and a flow run of ``kedit serve`` keeps the served configuration."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.serve import (
    POLICY_ENV,
    REFUSED,
    T_FEED_REASON,
    FeedRefused,
    FeedWatcher,
    ParameterRefused,
    ServePolicy,
    active_policy,
    confine,
    emit_feed_event,
)
from kedit.core.errors import KeditError

SECRET = "root:x:0:0:secret-line-never-read"


@pytest.fixture
def tree(tmp_path):
    """feeds/ (the served directory) beside a file outside it."""
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    (feeds / "ok.jsonl").write_text("{}\n")
    outside = tmp_path / "passwd.jsonl"
    outside.write_text(SECRET + "\n")
    return feeds.resolve(), outside


# ----------------------------------------------------------------------------- confine


def test_a_regular_feed_inside_the_directory_is_read_from_its_real_path(tree):
    feeds, _ = tree
    assert confine(feeds / "ok.jsonl", [feeds]) == feeds / "ok.jsonl"
    (feeds / "alias.jsonl").symlink_to(feeds / "ok.jsonl")  # a link that stays inside: fine, its target is read
    assert confine(feeds / "alias.jsonl", [feeds]) == feeds / "ok.jsonl"


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda feeds, out: out, "outside the feed directories"),
        (lambda feeds, out: feeds / ".." / out.name, "outside the feed directories"),
        (lambda feeds, out: _link(feeds / "x.jsonl", out), "a symlink to"),
        (lambda feeds, out: _link(feeds / "etc.jsonl", Path("/etc/passwd")), "a symlink to /etc/passwd"),
        (lambda feeds, out: _link(feeds / "dangling.jsonl", feeds / "nowhere"), "does not resolve"),
        (lambda feeds, out: _link(feeds / "loop.jsonl", feeds / "loop.jsonl"), "does not resolve"),
        (lambda feeds, out: _fifo(feeds / "pipe.jsonl"), "a FIFO, not a regular file"),
        (lambda feeds, out: _link(feeds / "null.jsonl", Path("/dev/null")), "a symlink to /dev/null"),
        (lambda feeds, out: _mkdir(feeds / "d.jsonl"), "a directory, not a regular file"),
        (lambda feeds, out: _touch(feeds / ".hidden.jsonl"), "not a feed's name"),
        (lambda feeds, out: _touch(feeds / "half.jsonl.part"), "not a feed's name"),
        (lambda feeds, out: feeds / "missing.jsonl", "no such file"),
    ],
)
def test_refused_paths_say_why_and_never_what_they_hold(tree, make, reason):
    feeds, outside = tree
    path = make(feeds, outside)
    with pytest.raises(FeedRefused) as e:
        confine(path, [feeds])
    assert reason in str(e.value) and SECRET not in str(e.value)
    assert isinstance(e.value, KeditError)


def test_without_directories_any_regular_file_but_only_a_regular_file(tree):
    feeds, outside = tree
    assert confine(outside) == outside
    assert confine(_link(feeds / "x.jsonl", outside)) == outside
    with pytest.raises(FeedRefused, match="FIFO"):
        confine(_fifo(feeds / "p.jsonl"))
    with pytest.raises(FeedRefused, match="device"):
        confine(Path("/dev/null"))


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _touch(path: Path) -> Path:
    path.write_text("{}\n")
    return path


# ----------------------------------------------------------------------------- the serving policy


def served(tmp_path) -> dict:
    (tmp_path / "gates.yaml").write_text("{}")
    return {
        "model": str(tmp_path / "model"),
        "editor": "ft-m",
        "feeds_dir": str(tmp_path / "feeds"),
        "batch_size": 5,
        "gates": str(tmp_path / "gates.yaml"),
        "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
        "corpus": None,
        "overrides": {"layers": [2], "lr": 0.02},
        "device": "cpu",
        "work_dir": str(tmp_path / "work"),
    }


def test_the_served_parameters_pass_and_any_other_configuration_fails(tmp_path):
    params = served(tmp_path)
    policy = ServePolicy.served([tmp_path / "feeds"], params, allow=[tmp_path / "vetted"])
    policy.check(params)
    policy.check({**params, "overrides": {"lr": 0.02, "layers": [2]}, "batch_size": 5})  # the same values, reordered
    policy.check({**params, "feeds_dir": None})
    policy.check({**params, "gates": str(tmp_path / "vetted" / "strict.yaml")})  # under an --allow path
    policy.check({**params, "work_dir": str(tmp_path / "vetted" / "w")})
    changed = {
        "model": "/elsewhere/model",
        "editor": "memit",
        "tracking_uri": "http://attacker:5000",
        "overrides": {"lr": 10.0},
        "device": "cuda",
        "batch_size": 1000,
        "gates": "/tmp/task-with-function-tags.yaml",
        "corpus": "/etc/shadow",
        "work_dir": "/tmp",
        "feeds_dir": "/etc",
        "client": "another-tenant",  # a federated client's run cannot act as another client
        "mkv": "/tmp/other-federation",
        "mkv_threshold": 0.1,
        "mkv_refine": True,
    }
    for key, value in changed.items():
        with pytest.raises(ParameterRefused, match=key):
            policy.check({**params, key: value})
    with pytest.raises(ParameterRefused, match="gates"):  # dropping the served gates for the defaults is a change too
        policy.check({**params, "gates": None})
    with pytest.raises(ParameterRefused, match="gates"):  # a file in the served work dir is not a gates file
        policy.check({**params, "gates": str(tmp_path / "work" / "plan.yaml")})
    with pytest.raises(ParameterRefused, match="gates"):
        policy.check({**params, "gates": str(tmp_path / "vetted" / ".." / "evil.yaml")})


def test_the_policy_reaches_a_flow_run_through_the_environment_only(tmp_path, monkeypatch):
    params = served(tmp_path)
    policy = ServePolicy.served([tmp_path / "feeds"], params)
    path = policy.write(tmp_path / "work" / "serve-policy.json")
    assert oct(path.stat().st_mode & 0o777) == "0o600" and not list(path.parent.glob(".*tmp"))
    monkeypatch.delenv(POLICY_ENV, raising=False)
    assert active_policy() is None
    monkeypatch.setenv(POLICY_ENV, str(path))
    assert active_policy() == policy
    path.write_text("{not json")
    with pytest.raises(KeditError, match="cannot be read"):  # named but unreadable: no run, rather than an unconfined one
        active_policy()


def test_a_policy_written_before_a_fixed_parameter_existed_holds_it_at_the_default_it_was_served_with(tmp_path):
    import json

    params = served(tmp_path)
    path = ServePolicy.served([tmp_path / "feeds"], params).write(tmp_path / "p.json")
    old = json.loads(path.read_text())
    del old["fixed"]["mkv_refine"]  # the file of a `kedit serve` from before the option
    path.write_text(json.dumps(old))
    policy = ServePolicy.read(path)
    policy.check(params)  # left out: the flow's default, as served
    policy.check({**params, "mkv_refine": False})
    with pytest.raises(ParameterRefused, match="mkv_refine"):
        policy.check({**params, "mkv_refine": True})


def test_a_deployment_run_without_the_policy_or_with_another_signing_key_is_refused(tmp_path, monkeypatch):
    # a worker's job variables can rewrite a run's environment: emptying the policy variable must not unconfine it
    monkeypatch.delenv(POLICY_ENV, raising=False)
    monkeypatch.delenv("KEDIT_SIGNING_KEY", raising=False)
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "a-deployment")
    with pytest.raises(ParameterRefused, match="needs kedit serve's policy"):
        active_policy()
    monkeypatch.setenv("KEDIT_SIGNING_KEY", "the-operators-key")
    policy = ServePolicy.served([tmp_path / "feeds"], served(tmp_path))
    monkeypatch.setenv(POLICY_ENV, str(policy.write(tmp_path / "p.json")))
    assert active_policy() == policy
    for key in ("", "another-key"):  # dropped, or swapped for one whose signatures the operator's hosts refuse
        monkeypatch.setenv("KEDIT_SIGNING_KEY", key)
        with pytest.raises(ParameterRefused, match="signing key"):
            active_policy()


def test_a_nul_in_a_path_is_a_refusal_not_a_traceback(tree, tmp_path):
    feeds, _ = tree
    with pytest.raises(FeedRefused, match="not a path"):
        confine(str(feeds / "a\x00.jsonl"), [feeds])
    policy = ServePolicy.served([tmp_path / "feeds"], served(tmp_path))
    for key in ("gates", "corpus", "work_dir"):
        with pytest.raises(ParameterRefused, match=key):
            policy.check({**served(tmp_path), key: str(tmp_path / "x\x00.yaml")})


# ----------------------------------------------------------------------------- the watcher


def test_the_watcher_skips_links_out_and_fifos_and_emits_the_directory_entry(tree, monkeypatch):
    feeds, outside = tree
    (feeds / "evil.jsonl").symlink_to(outside)
    (feeds / "alias.jsonl").symlink_to(feeds / "ok.jsonl")
    os.mkfifo(feeds / "pipe.jsonl")  # hashing it would block the watcher for ever
    fired = []
    w = FeedWatcher(feeds, lambda p, sha: fired.append(p))
    for p in (feeds / "evil.jsonl", feeds / "alias.jsonl", feeds / "pipe.jsonl", feeds / "ok.jsonl"):
        w.changed(p, now=0.0)
        w.changed(p, now=5.0)
    assert sorted(p.name for p in fired) == ["alias.jsonl", "ok.jsonl"]
    assert feeds / "alias.jsonl" in fired  # the entry, not the target it resolves to

    import prefect.events

    sent = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(kw))
    emit_feed_event("tiny")(feeds / "alias.jsonl", "0" * 64)
    assert sent[0]["payload"]["path"] == str(feeds / "alias.jsonl")


# ----------------------------------------------------------------------------- the flow, under a policy


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_flow_run_refuses_feeds_outside_and_any_other_configuration(tmp_path, monkeypatch, prefect_server):
    from flows.serve import process_feeds
    from kedit.store.naming import identify
    from kedit.store.tracking import T_FEED_STATUS, Tracker

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # enough to name the model in the store: it is never loaded
    (model / "model.safetensors").write_bytes(b"weights")
    params = served(tmp_path)
    feeds = Path(params["feeds_dir"])
    feeds.mkdir()
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"subject": SECRET, "prompt": "{} is", "target_new": "x"}) + "\n")
    (feeds / "x.jsonl").symlink_to(secret)
    policy = ServePolicy.served([feeds], params)
    monkeypatch.setenv(POLICY_ENV, str(policy.write(tmp_path / "work" / "serve-policy.json")))
    run = {k: v for k, v in params.items() if k != "feeds_dir"} | {"feeds_dir": str(feeds)}

    out = process_feeds(**run, feed=str(feeds / "x.jsonl"))  # what the watcher once sent, resolved: now refused
    assert out["feeds"] == [] and out["refused"] == [str(feeds / "x.jsonl")]
    out = process_feeds(**run, feed=str(secret))  # an event pointing outside
    assert out["refused"] == [str(secret)]
    assert process_feeds(**run, feed=str(secret))["refused"] == [str(secret)]  # sent again: refused, recorded once

    tracker = Tracker(params["tracking_uri"])
    name, _ = identify(params["model"])
    entries = {r.info.run_name: r for r in tracker.runs(name, "feed")}
    assert set(entries) == {"x.jsonl", "secret.jsonl"}
    for entry in entries.values():
        assert entry.data.tags[T_FEED_STATUS] == REFUSED
        assert "outside the feed directories" in entry.data.tags[T_FEED_REASON]
        recorded = Path(tracker.client.download_artifacts(entry.info.run_id, "quarantine.json", str(tmp_path))).read_text()
        assert SECRET not in recorded and "outside the feed directories" in recorded
    assert not any(sha in tracker.feed_ledger(name) for sha in ("", _sha(secret)))  # its content was never marked processed

    for key, value in {"gates": str(tmp_path / "other.yaml"), "model": "smollm2-135m", "corpus": str(secret)}.items():
        with pytest.raises(ParameterRefused, match=key):
            process_feeds(**{**run, key: value}, feed=str(feeds / "x.jsonl"))
    assert len(tracker.runs(name, "feed")) == 2  # a refused configuration records nothing


def _sha(path: Path) -> str:
    from kedit.core.paths import sha256_file

    return sha256_file(path)
