"""Squashing a chain prefix into one version: the new chain rebuilds the old one bit for bit, old versions stay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_chain import NAME, empty_db, store  # noqa: F401 (fixtures)
from test_patches import PATH, adapter_patch, assert_same_bits, model, snapshot, weight_delta

from editing.patches import LowRank, PatchSet, WeightDelta, WeightValues
from kedit.core.facts import EditRequest
from kedit.store.squash import SquashError, squash
from kedit.store.tracking import T_MANIFEST_SHA, T_PARENT_VERSION
from kedit.store.versions import NOT_HOLDING, model_fingerprint, rebuild, rollback_to, write_version


def _requests(i: int) -> list[EditRequest]:
    return [EditRequest(f"f{i}-{j}", f"Subject {i}-{j}", "{} lives in", f"City {i}{j}") for j in range(2)]


def _makers(live):
    """Five versions: a delta; an adapter; a delta on the adapter's own tensor (as codebook rows are written);
    a second adapter wrapping the first; a delta on a base weight now wrapped twice."""
    g = torch.Generator().manual_seed(5)
    return [
        lambda: PatchSet([weight_delta(live, f"{PATH}.weight")]),
        lambda: PatchSet([adapter_patch(live)]),
        lambda: PatchSet([WeightDelta({f"{PATH}.A": LowRank(torch.randn(2, 1, generator=g), torch.randn(1, 64, generator=g))})]),
        lambda: PatchSet([adapter_patch(live, seed=3)]),
        lambda: PatchSet([weight_delta(live, "model.layers.0.mlp.down_proj.weight", seed=9)]),
    ]


def build(tracker, tmp_path):
    live, _ = model()
    fp = model_fingerprint(None, live)
    tracker.ensure_registered(NAME, fp, "tiny")
    versions, parent, parent_sha = [], None, None
    for i, make in enumerate(_makers(live)):
        patches = make()
        patches.apply(live)
        run = tracker.start_run(NAME, f"v{i}", {})
        info = {"registered_model": NAME, "base_fingerprint": fp, "parent_version": parent, "editor": "test",
                "parent_manifest_sha256": parent_sha, NOT_HOLDING: [_requests(i)[1].key] if i == 1 else []}  # fmt: skip
        sha = write_version(tmp_path / f"w{i}", patches, {"step": torch.tensor([i])}, _requests(i), info)
        parent = tracker.register_version(NAME, run, tmp_path / f"w{i}", {T_PARENT_VERSION: parent or "", T_MANIFEST_SHA: sha})
        parent_sha = sha
        tracker.end_run(run)
        versions.append(parent)
    tracker.set_production(NAME, parent)
    return live, fp, versions


@pytest.mark.parametrize("upto", [3, 5], ids=["prefix", "whole-chain"])
def test_a_squashed_chain_rebuilds_the_old_one_bit_for_bit(store, tmp_path, upto):  # noqa: F811
    live, fp, old = build(store, tmp_path)
    want = snapshot(live)
    base, _ = model()
    out = squash(base, store, NAME, old[upto - 1], fp)
    assert len(out.versions) == 1 + len(old) - upto and out.replaced == old[:upto]
    assert out.production_moved and store.production(NAME).version == out.head
    assert_same_bits(snapshot(base), want)  # squash leaves the model at the head
    assert out.head_fingerprint == model_fingerprint(None, live)

    fresh, _ = model()
    chain = rebuild(fresh, store, NAME, store.production(NAME).version, fp)
    assert_same_bits(snapshot(fresh), want)
    assert [v.version for v in chain.versions] == out.versions
    # every fact is still there, with the version that first held it; the one that did not hold is still named
    assert [r.id for r in chain.requests] == [r.id for i in range(len(old)) for r in _requests(i)]
    held = {r.id: v for r, v in chain.applied}
    assert "f1-1" not in held and held["f0-0"] == old[0] and held["f4-1"] == old[4]
    assert set(old) <= set(chain.lineage)  # a fact quarantined on an old version is still found
    assert torch.equal(chain.state["step"], torch.tensor([len(old) - 1]))
    manifest = json.loads((Path(store.version(NAME, out.squash).source.removeprefix("file://")) / "manifest.json").read_text())
    assert [e["version"] for e in manifest["squashes"]] == old[:upto]
    assert [p["kind"] for p in manifest["patches"]] == [WeightValues.kind, "module-patch"]

    # the old versions stay: rolling back to one rebuilds it from the old chain
    assert rollback_to(store, NAME, old[1], fp) == out.head
    partial, _ = model()
    rebuild(partial, store, NAME, old[1], fp)
    expect, _ = model()
    for make in _makers(expect)[:2]:
        make().apply(expect)
    assert_same_bits(snapshot(partial), snapshot(expect))


def test_a_squash_that_would_not_rebuild_the_chain_registers_nothing(store, tmp_path, monkeypatch):  # noqa: F811
    _, fp, old = build(store, tmp_path)
    before = [v.version for v in store.versions(NAME)]
    import kedit.store.squash as sq

    real = sq.squash_patches

    def lossy(model, base):  # a squash that rounds its values to bf16 loses bits
        patches = real(model, base)
        values = patches.get(WeightValues)
        values.values = {k: v.to(torch.bfloat16).float() for k, v in values.values.items()}
        return patches

    monkeypatch.setattr(sq, "squash_patches", lossy)
    with pytest.raises(SquashError, match="does not rebuild the old chain's state"):
        squash(model()[0], store, NAME, old[2], fp)
    assert [v.version for v in store.versions(NAME)] == before
    assert store.production(NAME).version == old[-1]


def test_squash_refuses_what_is_not_a_prefix_of_production(store, tmp_path):  # noqa: F811
    _, fp, old = build(store, tmp_path)
    with pytest.raises(SquashError, match="not in production's chain"):
        squash(model()[0], store, NAME, "99", fp)
    with pytest.raises(SquashError, match="needs at least two"):
        squash(model()[0], store, NAME, old[0], fp)


def test_weight_values_set_apply_revert_and_refuse_tampering(tmp_path):
    m, _ = model()
    before = snapshot(m)
    name = f"{PATH}.weight"
    patch = WeightValues({name: torch.full_like(m.get_parameter(name), 0.25)})
    undo = patch.apply(m)
    assert torch.all(m.get_parameter(name) == 0.25)
    undo.restore(m)
    assert_same_bits(snapshot(m), before)
    patch.save(tmp_path)
    loaded = WeightValues.load(tmp_path)
    assert torch.equal(loaded.values[name], patch.values[name])
    raw = bytearray((tmp_path / "values.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "values.safetensors").write_bytes(bytes(raw))
    with pytest.raises(Exception, match="does not match"):
        WeightValues.load(tmp_path)
    with pytest.raises(Exception, match="the parameter has"):
        WeightValues({name: torch.zeros(3, 3)}).apply(m)
    assert_same_bits(snapshot(m), before)


def test_a_squash_of_a_squashed_chain_still_stands_for_every_original_version(store, tmp_path):  # noqa: F811
    live, fp, old = build(store, tmp_path)
    first = squash(model()[0], store, NAME, old[2], fp)  # [S(v1-v3), copy of v4, copy of v5]
    second = squash(model()[0], store, NAME, first.versions[1], fp)  # [S'(S, copy of v4), copy of the copy of v5]
    fresh, _ = model()
    chain = rebuild(fresh, store, NAME, store.production(NAME).version, fp)
    assert_same_bits(snapshot(fresh), snapshot(live))
    assert [v.version for v in chain.versions] == second.versions and len(second.versions) == 2
    assert set(old) | set(first.versions) <= set(chain.lineage)  # a fact quarantined on v1..v5 is still found
    assert {r.id: v for r, v in chain.applied}["f0-0"] == old[0]  # and keeps the version that first held it
