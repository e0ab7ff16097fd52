"""The module patch's contract (like the weight delta's), nested undo, and versions whose chain holds module patches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_llama

from editing.patches import (
    PATCH_KINDS,
    InstalledModule,
    LinearAdapter,
    LowRank,
    ModulePatch,
    PatchIntegrityError,
    PatchSet,
    WeightDelta,
    register_module_type,
    register_patch_kind,
)
from kedit.store.tracking import T_MANIFEST_SHA, T_PARENT_VERSION, Tracker
from kedit.store.versions import (
    export_version,
    load_export,
    load_model_or_export,
    model_fingerprint,
    read_version,
    rebuild,
    write_version,
)

PATH = "model.layers.1.mlp.down_proj"  # a Linear (64 -> 32) in the tiny Llama


def model(dtype=torch.float32, seed=0):
    tok = make_tokenizer()
    return tiny_llama(len(tok), seed=seed).to(dtype), tok


def adapter_patch(m, path=PATH, rank=2, seed=1, scale=0.5):
    """A module patch with a random adapter at ``path`` (built around what the path holds now, not installed)."""
    adapter = LinearAdapter(m.get_submodule(path), rank, scale)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.A.copy_(torch.randn(adapter.A.shape, generator=g))
        adapter.B.copy_(torch.randn(adapter.B.shape, generator=g))
    return ModulePatch([InstalledModule.snapshot(path, adapter)], {"editor": "test"})


def weight_delta(m, name, seed=2):
    g = torch.Generator().manual_seed(seed)
    shape = m.get_parameter(name).shape
    return WeightDelta({name: LowRank(torch.randn(shape[0], 1, generator=g), torch.randn(1, shape[1], generator=g))})


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def logits(m, tok):
    ids = tok(["the capital of france is paris"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return m(input_ids=ids).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_module_patch_contract(dtype, tmp_path):
    m, tok = model(dtype)
    before, modules_before, y0 = snapshot(m), dict(m.named_modules()), logits(m, tok)
    original = m.get_submodule(PATH)
    patch = adapter_patch(m)

    undo = patch.apply(m)
    installed = m.get_submodule(PATH)
    assert isinstance(installed, LinearAdapter) and installed.original is original
    assert installed.A.dtype == dtype and not torch.equal(logits(m, tok), y0)
    edited, y1 = snapshot(m), logits(m, tok)
    d = patch.describe()
    assert d["kind"] == "module-patch" and d["paths"] == [PATH] and d["modules"][0]["config"] == {"rank": 2, "scale": 0.5}
    json.dumps(d)

    # saved and loaded, it rebuilds the same model on a fresh base, bit for bit
    loaded = ModulePatch.load(patch.save(tmp_path / "p"))
    other, _ = model(dtype)
    loaded.apply(other)
    assert_same_bits(snapshot(other), edited)
    assert torch.equal(logits(other, tok), y1)

    # revert: the very module objects and every parameter's bytes
    undo.restore(m)
    assert m.get_submodule(PATH) is original
    after = dict(m.named_modules())
    assert after.keys() == modules_before.keys() and all(after[k] is modules_before[k] for k in after)
    assert_same_bits(snapshot(m), before)
    assert torch.equal(logits(m, tok), y0)


def test_tampered_or_missing_module_patch_is_refused(tmp_path):
    m, _ = model()
    d = adapter_patch(m).save(tmp_path / "p")
    good_tensors, good_manifest = (d / "modules.safetensors").read_bytes(), (d / "modules.json").read_bytes()

    blob = bytearray(good_tensors)
    blob[-1] ^= 1
    (d / "modules.safetensors").write_bytes(bytes(blob))
    with pytest.raises(PatchIntegrityError, match="does not match"):
        ModulePatch.load(d)
    (d / "modules.safetensors").write_bytes(good_tensors)

    # one byte of the manifest: the path now names another layer, and the JSON stays valid
    blob = bytearray(good_manifest)
    at = good_manifest.index(b"layers.1.mlp") + len("layers.")
    blob[at] ^= 0x03  # "1" -> "2"
    (d / "modules.json").write_bytes(bytes(blob))
    assert json.loads(blob)["modules"][0]["path"] == "model.layers.2.mlp.down_proj"
    with pytest.raises(PatchIntegrityError, match="own sha256"):
        ModulePatch.load(d)
    (d / "modules.json").write_bytes(good_manifest)
    ModulePatch.load(d)  # intact again

    (d / "modules.safetensors").unlink()
    with pytest.raises(PatchIntegrityError, match="no modules.safetensors"):
        ModulePatch.load(d)


def test_nested_patches_revert_in_lifo_order():
    """A delta on the Linear, an adapter around it, a delta on the adapter, a second adapter around the first."""
    m, tok = model()
    states, objects = [snapshot(m)], [dict(m.named_modules())]
    steps = [
        lambda: weight_delta(m, f"{PATH}.weight"),
        lambda: adapter_patch(m, seed=3),
        lambda: weight_delta(m, f"{PATH}.B", seed=4),
        lambda: adapter_patch(m, seed=5),
    ]
    undos = []
    for make in steps:
        undos.append(make().apply(m))
        states.append(snapshot(m))
        objects.append(dict(m.named_modules()))
    assert isinstance(m.get_submodule(PATH).original, LinearAdapter)
    for undo, state, objs in zip(reversed(undos), reversed(states[:-1]), reversed(objects[:-1])):
        undo.restore(m)
        assert_same_bits(snapshot(m), state)
        now = dict(m.named_modules())
        assert now.keys() == objs.keys() and all(now[k] is objs[k] for k in now)


def test_a_patch_set_that_fails_half_way_leaves_the_model_as_it_was():
    m, _ = model()
    before, original = snapshot(m), m.get_submodule(PATH)
    bad = ModulePatch([InstalledModule("model.layers.9.mlp.down_proj", "linear-adapter", {"rank": 1, "scale": 1.0}, {})])
    with pytest.raises(PatchIntegrityError, match="no module"):
        PatchSet([weight_delta(m, f"{PATH}.weight"), bad]).apply(m)
    assert m.get_submodule(PATH) is original
    assert_same_bits(snapshot(m), before)


def test_registries_refuse_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_module_type(LinearAdapter)
    with pytest.raises(ValueError, match="already registered"):
        register_patch_kind(PATCH_KINDS["module-patch"])
    with pytest.raises(ValueError, match="one part per kind"):
        PatchSet([WeightDelta(), WeightDelta()])


# ---------------------------------------------------------------------- versions in the real store


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under the working directory
    return Tracker(f"sqlite:///{tmp_path}/mlruns/mlflow.db")


def add_version(tracker, name, parent, patches, fp, work):
    run = tracker.start_run(name, f"v-after-{parent}", {})
    work.mkdir(parents=True)
    info = {"registered_model": name, "base_fingerprint": fp, "parent_version": parent, "editor": "test"}
    sha = write_version(work, patches, {}, [], info)
    version = tracker.register_version(name, run, work, {T_PARENT_VERSION: parent or "", T_MANIFEST_SHA: sha})
    tracker.end_run(run)
    return version


def chain_of_three(tracker, tmp_path):
    """v1: a weight delta; v2: an adapter; v3: a delta on v2's adapter plus an adapter at layer 2. Returns the live model."""
    live, tok = model()
    fp = model_fingerprint(None, live)
    name = "tiny"
    tracker.ensure_registered(name, fp, "tiny")
    v, parent = None, None
    for i, make in enumerate(
        [
            lambda: PatchSet([weight_delta(live, f"{PATH}.weight")]),
            lambda: PatchSet([adapter_patch(live)]),
            lambda: PatchSet([weight_delta(live, f"{PATH}.A", seed=7), adapter_patch(live, "model.layers.2.mlp.down_proj", 3)]),
        ]
    ):
        patches = make()
        patches.apply(live)
        v = add_version(tracker, name, parent, patches, fp, tmp_path / f"work{i}")
        parent = v
    tracker.set_production(name, v)
    return live, tok, name, v, fp


def test_a_chain_with_module_patches_rebuilds_and_exports_bit_for_bit(store, tmp_path, caplog):
    live, tok, name, v, fp = chain_of_three(store, tmp_path)
    want, y = snapshot(live), logits(live, tok)
    manifest = json.loads((tmp_path / "work2" / "manifest.json").read_text())
    assert [p["kind"] for p in manifest["patches"]] == ["weight-delta", "module-patch"]
    assert all(manifest["sha256"][f] == sha for p in manifest["patches"] for f, sha in p["files"].items())

    base, _ = model()
    chain = rebuild(base, store, name, v, fp)
    assert [c.version for c in chain.versions] == ["1", "2", "3"]
    assert_same_bits(snapshot(base), want)
    assert torch.equal(logits(base, tok), y)

    with caplog.at_level(logging.WARNING, logger="kedit.store.versions"):
        out = export_version(model()[0], tok, store, name, v, fp, tmp_path / "export")
    assert any("module patches" in r.message and "load_export" in r.message for r in caplog.records)
    assert (out / "base" / "config.json").is_file() and (out / "patches" / "v3" / "modules.safetensors").is_file()
    exported, _, info = load_export(out)
    assert info["chain"] == ["1", "2", "3"]
    assert_same_bits(snapshot(exported), want)
    assert torch.equal(logits(exported, tok), y)
    via_ref, _ = load_model_or_export(str(out), "cpu")  # how `kedit score --model DIR` opens it
    assert torch.equal(logits(via_ref, tok), y)

    # the export is checked before anything is built
    f = out / "patches" / "v2" / "modules.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 1
    f.write_bytes(bytes(blob))
    with pytest.raises(PatchIntegrityError, match="does not match"):
        load_export(out)


def test_a_tampered_module_patch_in_the_chain_is_refused_before_anything_changes(store, tmp_path):
    live, tok, name, v, fp = chain_of_three(store, tmp_path)
    source = store.version(name, "2").source
    f = Path(source.removeprefix("file://")) / "modules.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 1
    f.write_bytes(bytes(blob))
    base, _ = model()
    before, objs = snapshot(base), dict(base.named_modules())
    with pytest.raises(PatchIntegrityError, match="sha256"):
        rebuild(base, store, name, v, fp)
    assert_same_bits(snapshot(base), before)
    assert all(base.get_submodule(k) is o for k, o in objs.items() if k)


def test_a_weight_only_version_keeps_the_delta_files_and_reads_as_before(store, tmp_path):
    m, _ = model()
    fp = model_fingerprint(None, m)
    store.ensure_registered("w", fp, "tiny")
    v = add_version(store, "w", None, PatchSet([weight_delta(m, f"{PATH}.weight")]), fp, tmp_path / "work")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "delta.json",
        "delta.safetensors",
        "manifest.json",
        "requests.jsonl",
        "state.safetensors",
    ]
    base, _ = model()
    rebuild(base, store, "w", v, fp)
    want, _ = model()
    weight_delta(want, f"{PATH}.weight").apply(want)
    assert_same_bits(snapshot(base), snapshot(want))


@pytest.mark.parametrize("name", ["requests.jsonl", "state.safetensors", "delta.safetensors"])
def test_a_changed_or_missing_file_of_a_version_is_refused(tmp_path, name):
    """Every file the version manifest lists is checked once: the patch files by the patch set, the rest by the version."""
    m, _ = model()
    work = tmp_path / "v"
    info = {"registered_model": "w", "base_fingerprint": "fp", "parent_version": None, "editor": "test"}
    sha = write_version(work, PatchSet([weight_delta(m, f"{PATH}.weight")]), {}, [], info)
    assert read_version(work, sha).patches.get(WeightDelta) is not None
    f = work / name
    blob = bytearray(f.read_bytes()) or bytearray(b"\n")
    blob[-1] ^= 1
    f.write_bytes(bytes(blob))
    with pytest.raises(PatchIntegrityError, match="sha256"):
        read_version(work, sha)
    f.unlink()
    with pytest.raises(PatchIntegrityError, match="missing"):
        read_version(work, sha)
