"""The chain of versions is verified from the manifests themselves; optional manifest signing; paged ledger lookups."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_patches import PATH, adapter_patch, assert_same_bits, model, snapshot, weight_delta

from editing.patches import PatchIntegrityError, PatchSet
from kedit.store.tracking import T_KIND, T_MANIFEST_SHA, T_N_QUARANTINED, T_PARENT_VERSION, Tracker
from kedit.store.versions import (
    FORMAT,
    SIGNING_ALG,
    SIGNING_ENV,
    check_signature,
    export_version,
    fetch,
    key_id,
    model_fingerprint,
    rebuild,
    rollback_to,
    write_version,
)

NAME = "tiny"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema made once per module (copied per test: the migrations take seconds)."""
    root = tmp_path_factory.mktemp("template")
    Tracker(f"sqlite:///{root}/mlflow.db")
    return root / "mlflow.db"


def fresh_tracker(tmp_path, monkeypatch, empty_db, **kwargs) -> Tracker:
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under the working directory
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(empty_db, tmp_path / "mlruns" / "mlflow.db")
    return Tracker(f"sqlite:///{tmp_path}/mlruns/mlflow.db", **kwargs)


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db):
    monkeypatch.delenv(SIGNING_ENV, raising=False)
    return fresh_tracker(tmp_path, monkeypatch, empty_db)


def add_version(tracker, parent, parent_sha, patches, fp, work):
    """What commit_version does: the manifest names the parent's manifest sha256; the registry gets tags."""
    run = tracker.start_run(NAME, f"v-after-{parent}", {})
    info = {"registered_model": NAME, "base_fingerprint": fp, "parent_version": parent, "editor": "test"}
    sha = write_version(work, patches, {}, [], {**info, "parent_manifest_sha256": parent_sha})
    version = tracker.register_version(NAME, run, work, {T_PARENT_VERSION: parent or "", T_MANIFEST_SHA: sha})
    tracker.end_run(run)
    return version, sha


def build_chain(tracker, tmp_path, n=3):
    """v1: a weight delta; v2: an adapter; v3: a delta at layer 0. Returns the live model, the versions and their shas."""
    live, _ = model()
    fp = model_fingerprint(None, live)
    tracker.ensure_registered(NAME, fp, "tiny")
    makers = [
        lambda: PatchSet([weight_delta(live, f"{PATH}.weight")]),
        lambda: PatchSet([adapter_patch(live)]),
        lambda: PatchSet([weight_delta(live, "model.layers.0.mlp.down_proj.weight", seed=9)]),
    ]
    versions, shas, parent, parent_sha = [], [], None, None
    for i, make in enumerate(makers[:n]):
        patches = make()
        patches.apply(live)
        parent, parent_sha = add_version(tracker, parent, parent_sha, patches, fp, tmp_path / f"work{i}")
        versions.append(parent)
        shas.append(parent_sha)
    tracker.set_production(NAME, parent)
    return live, fp, versions, shas


def manifest_of(tracker, version) -> Path:
    return Path(tracker.version(NAME, version).source.removeprefix("file://")) / "manifest.json"


def test_a_linked_chain_rebuilds_and_names_each_parent_manifest(store, tmp_path):
    live, fp, versions, shas = build_chain(store, tmp_path)
    manifests = [json.loads(manifest_of(store, v).read_text()) for v in versions]
    assert [m["format"] for m in manifests] == [FORMAT] * 3
    assert [m["parent_manifest_sha256"] for m in manifests] == [None, shas[0], shas[1]]
    assert all("signature" not in m for m in manifests)  # no key set

    base, _ = model()
    chain = rebuild(base, store, NAME, versions[-1], fp)
    assert [c.version for c in chain.versions] == versions
    assert chain.head_manifest_sha == shas[-1]
    assert_same_bits(snapshot(base), snapshot(live))
    assert rebuild(model()[0], store, NAME, None, fp).head_manifest_sha is None

    assert rollback_to(store, NAME, versions[0], fp) == versions[-1]
    assert store.production(NAME).version == versions[0]


def test_write_version_refuses_an_inconsistent_parent_link(tmp_path):
    m, _ = model()
    patches = PatchSet([weight_delta(m, f"{PATH}.weight")])
    info = {"registered_model": NAME, "base_fingerprint": "fp", "editor": "test"}
    with pytest.raises(ValueError, match="empty"):
        write_version(tmp_path / "a", patches, {}, [], {**info, "parent_version": "1", "parent_manifest_sha256": None})
    with pytest.raises(ValueError, match="on the base"):
        write_version(tmp_path / "b", patches, {}, [], {**info, "parent_version": None, "parent_manifest_sha256": "ab" * 32})


def _splice_head(tracker, versions, shas):
    """A new version whose source and manifest tag are v2's, on top of v3: v2's adapter would install twice."""
    v2 = tracker.version(NAME, versions[1])
    tags = {T_PARENT_VERSION: versions[2], T_MANIFEST_SHA: shas[1]}
    mv = tracker.client.create_model_version(NAME, source=v2.source, run_id=v2.run_id, tags=tags)
    tracker.set_production(NAME, str(mv.version))
    return str(mv.version), "parent tag says v3, its manifest says v1"


def _splice_middle(tracker, versions, shas):
    """The registry rebuilt with the same numbers, v2 now pointing (source and tag) at v1's artifact:
    every version's hash still matches its tag, and the old walk would apply v1's delta twice and skip v2."""
    old = [tracker.version(NAME, v) for v in versions]
    rm = tracker.client.get_registered_model(NAME)
    tracker.client.delete_registered_model(NAME)
    tracker.client.create_registered_model(NAME, tags=rm.tags)
    for info, source in zip(old, [old[0], old[0], old[2]]):
        tags = {**info.tags, T_MANIFEST_SHA: source.tags[T_MANIFEST_SHA]}
        tracker.client.create_model_version(NAME, source=source.source, run_id=source.run_id, tags=tags)
    tracker.set_production(NAME, versions[2])
    return versions[2], "not the .* that v3's manifest names"


@pytest.mark.parametrize("splice", [_splice_head, _splice_middle], ids=["head", "middle"])
def test_a_chain_spliced_through_the_registry_alone_is_refused(store, tmp_path, splice):
    _, fp, versions, shas = build_chain(store, tmp_path)
    head, why = splice(store, versions, shas)
    # each version, checked against the registry's own tag as before, passes: only the manifests' links tell
    for i, info in enumerate(store.chain(NAME, head)):
        fetch(store, info, tmp_path / "each" / str(i), fp)

    base, tok = model()
    before, objs = snapshot(base), dict(base.named_modules())
    with pytest.raises(PatchIntegrityError, match=why):
        rebuild(base, store, NAME, head, fp)
    assert_same_bits(snapshot(base), before)
    assert all(base.get_submodule(k) is o for k, o in objs.items() if k)
    with pytest.raises(PatchIntegrityError, match=why):
        export_version(base, tok, store, NAME, head, fp, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    production = store.production(NAME).version
    with pytest.raises(PatchIntegrityError, match=why):
        rollback_to(store, NAME, head, fp)
    assert store.production(NAME).version == production


def test_a_manifest_of_another_registered_model_is_refused(store, tmp_path):
    """Same base, another registered model's version placed under this name through the registry."""
    live, fp, versions, shas = build_chain(store, tmp_path, n=1)
    run = store.start_run("other", "v", {})
    store.ensure_registered("other", fp, "tiny")
    info = {"registered_model": "other", "base_fingerprint": fp, "parent_version": None, "editor": "test"}
    sha = write_version(tmp_path / "o", PatchSet([weight_delta(live, f"{PATH}.weight", seed=5)]), {}, [], info)
    source = store.version("other", store.register_version("other", run, tmp_path / "o", {T_MANIFEST_SHA: sha})).source
    mv = store.client.create_model_version(NAME, source=source, run_id=run, tags={T_MANIFEST_SHA: sha})
    with pytest.raises(PatchIntegrityError, match="registered model 'other'"):
        rebuild(model()[0], store, NAME, str(mv.version), fp)


def test_signed_manifests(store, tmp_path, monkeypatch):
    monkeypatch.setenv(SIGNING_ENV, "k" * 32)
    live, fp, versions, shas = build_chain(store, tmp_path, n=2)
    sig = json.loads(manifest_of(store, versions[-1]).read_text())["signature"]
    assert sig["alg"] == "hmac-sha256" and sig["key_id"] == key_id(b"k" * 32) and len(sig["hmac"]) == 64
    base, _ = model()
    rebuild(base, store, NAME, versions[-1], fp)
    assert_same_bits(snapshot(base), snapshot(live))

    # someone with write access to the artifacts and the registry edits the head and re-hashes it
    path = manifest_of(store, versions[-1])
    manifest = json.loads(path.read_text())
    manifest["editor"] = "someone-else"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    from kedit.core.paths import sha256_file

    store.client.set_model_version_tag(NAME, versions[-1], T_MANIFEST_SHA, sha256_file(path))
    base, _ = model()
    before = snapshot(base)
    with pytest.raises(PatchIntegrityError, match="bad signature: the manifest changed"):
        rebuild(base, store, NAME, versions[-1], fp)
    assert_same_bits(snapshot(base), before)

    monkeypatch.delenv(SIGNING_ENV)  # the hashes alone cannot tell: the edited chain reads without a key
    assert rebuild(model()[0], store, NAME, versions[-1], fp).editor == "someone-else"

    monkeypatch.setenv(SIGNING_ENV, "another key")  # a rotated key: named in the error
    with pytest.raises(PatchIntegrityError, match=f"bad signature: signed with key id '{key_id(b'k' * 32)}'"):
        rebuild(model()[0], store, NAME, versions[0], fp)


def test_an_unsigned_version_is_refused_when_a_key_is_set(store, tmp_path, monkeypatch):
    _, fp, versions, _ = build_chain(store, tmp_path, n=1)
    monkeypatch.setenv(SIGNING_ENV, "k" * 32)
    with pytest.raises(PatchIntegrityError, match="unsigned manifest"):
        rebuild(model()[0], store, NAME, versions[0], fp)


def test_ledger_and_quarantine_lookups_page_through_every_run(tmp_path, monkeypatch, empty_db):
    tracker = fresh_tracker(tmp_path, monkeypatch, empty_db, page_size=2)
    calls = []
    search = tracker.client.search_runs

    def counted(*args, **kwargs):
        calls.append(kwargs.get("page_token"))
        return search(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "search_runs", counted)
    n = 5
    for i in range(n):
        tracker.record_feed(NAME, None, f"feeds/f{i}.jsonl", f"{i:064x}", "processed", {"facts": 1}, [])
        run = tracker.start_run(NAME, f"a{i}", {T_KIND: "attempt", T_PARENT_VERSION: "", T_N_QUARANTINED: "1"})
        tracker.log_dict(run, [{"id": f"fact-{i}", "reason": "test"}], "quarantine.json")
        tracker.end_run(run)

    calls.clear()
    assert len(tracker.feed_ledger(NAME)) == n
    assert len(calls) == 3 and calls[0] is None and all(calls[1:])  # 2 + 2 + 1
    assert set(tracker.quarantined(NAME, [])) == {f"fact-{i}" for i in range(n)}
    newest = tracker.runs(NAME, "feed", max_results=3)  # a limit still stops early, across pages
    assert len({r.info.run_id for r in newest}) == 3


@pytest.mark.parametrize("planted", ["é" * 64, "\udcff" * 64, 7, None])
def test_a_planted_signature_value_is_refused_never_a_crash(monkeypatch, planted):
    monkeypatch.setenv(SIGNING_ENV, "k")
    manifest = {"format": FORMAT, "signature": {"alg": SIGNING_ALG, "key_id": key_id(b"k"), "hmac": planted}}
    with pytest.raises(PatchIntegrityError, match="bad signature"):
        check_signature(manifest, "planted/manifest.json")


def test_quarantine_records_from_before_fact_keys_are_keyed_by_their_request():
    from kedit.core.facts import EditRequest
    from kedit.store.tracking import _fact_key

    request = {"id": "7", "subject": "Paris", "prompt": "{} is in", "target_new": "Asia"}
    assert _fact_key({"id": "7", "request": request}) == EditRequest.from_dict(request).key
    assert _fact_key({"key": "k-1", "id": "7", "request": request}) == "k-1"
    assert _fact_key({"id": "7"}) == "7"  # nothing else kept: the id is all there is
