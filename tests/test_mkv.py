"""The MKV store (FLEKE's server): namespaced, write-once uploads; verified, compatible, batched lookups."""

from __future__ import annotations

import json

import pytest
import torch

from kedit.store.mkv import MANIFEST, TENSORS, Compat, MKVError, MKVStore

COMPAT = Compat("f" * 64, "memit", ("model.layers.7",), (6,), 4, "h" * 64)


def vectors(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), {"model.layers.7": torch.randn(n, 6, generator=g)}


def test_a_client_finds_another_clients_vectors_by_key_and_never_its_own(tmp_path):
    store = MKVStore(tmp_path)
    keys, z = vectors(5, 0)
    store.client("a").upload(0, COMPAT, keys, z)
    own = store.client("a").lookup(keys, COMPAT, 0.9, 0.5)
    assert own.n_found == 0  # its own uploads are not offered back to it
    got = store.client("b").lookup(keys[[3, 1]], COMPAT, 0.9, 0.5)
    assert got.found.tolist() == [True, True] and got.source == ["a/slot-0", "a/slot-0"]
    assert torch.equal(got.vectors["model.layers.7"], z["model.layers.7"][[3, 1]])
    assert torch.allclose(got.similarity, torch.ones(2))


def test_the_threshold_and_the_batch_share_decide_what_is_drawn_on(tmp_path):
    store = MKVStore(tmp_path)
    keys, z = vectors(4, 0)
    store.client("a").upload(0, COMPAT, keys[:1], {m: v[:1] for m, v in z.items()})
    query = torch.cat([keys[:1], -keys[1:]])  # one fact a has; three far from anything it has
    b = store.client("b")
    assert b.lookup(query, COMPAT, 0.9, 0.5).n_found == 0  # a matches 1 of 4 facts: under half the batch
    got = b.lookup(query, COMPAT, 0.9, 0.25)
    assert got.found.tolist() == [True, False, False, False]
    assert torch.equal(got.vectors["model.layers.7"][1:], torch.zeros(3, 6))


def test_a_client_writes_only_under_its_own_name_and_each_slot_once(tmp_path):
    store = MKVStore(tmp_path)
    keys, z = vectors(3, 0)
    a = store.client("a")
    a.upload(0, COMPAT, keys, z)
    a.upload(0, COMPAT, keys, z)  # a resumed slot uploads the same again: a no-op
    other_keys, other_z = vectors(3, 1)
    with pytest.raises(MKVError, match="written once"):
        a.upload(0, COMPAT, other_keys, other_z)
    for name in ("../b", "b/../../a", "", ".hidden"):
        with pytest.raises(MKVError, match="client name"):
            store.client(name)
    assert [p.relative_to(tmp_path).as_posix() for p in store.slots()] == ["a/slot-0"]
    assert torch.equal(store.load(store.slots()[0]).keys, keys)


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("tensors", "damaged"),
        ("manifest", "damaged"),
        ("fingerprint", "fingerprint"),
        ("hparams", "hparams_sha256"),
        ("dims", "dims"),
    ],
)
def test_a_damaged_or_foreign_upload_is_refused_and_counted(tmp_path, damage, reason):
    store = MKVStore(tmp_path)
    keys, z = vectors(3, 0)
    if damage in ("fingerprint", "hparams", "dims"):
        field = {"fingerprint": {"fingerprint": "0" * 64}, "hparams": {"hparams_sha256": "0" * 64}}
        field["dims"] = {"dims": (7,)}
        other = Compat(**{**COMPAT.__dict__, **field[damage]})
        if damage == "dims":
            z = {"model.layers.7": torch.randn(3, 7)}
        d = store.client("a").upload(0, other, keys, z)
    else:
        d = store.client("a").upload(0, COMPAT, keys, z)
        if damage == "tensors":
            raw = bytearray((d / TENSORS).read_bytes())
            raw[-4] ^= 0xFF
            (d / TENSORS).write_bytes(bytes(raw))
        else:
            m = json.loads((d / MANIFEST).read_text())
            m["compat"]["fingerprint"] = "0" * 64  # a planted manifest: its own hash no longer matches
            (d / MANIFEST).write_text(json.dumps(m))
    got = store.client("b").lookup(keys, COMPAT, 0.5, 0.0)
    assert got.n_found == 0 and got.refused == {reason: 1}


def test_vectors_with_nan_or_the_wrong_shape_are_refused_at_upload(tmp_path):
    a = MKVStore(tmp_path).client("a")
    keys, z = vectors(2, 0)
    bad = {"model.layers.7": z["model.layers.7"].clone()}
    bad["model.layers.7"][1, 2] = float("nan")
    with pytest.raises(MKVError, match="NaN"):
        a.upload(0, COMPAT, keys, bad)
    with pytest.raises(MKVError, match="shape"):
        a.upload(0, COMPAT, keys[:, :3], z)
    assert MKVStore(tmp_path).slots() == []
