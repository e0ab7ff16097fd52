"""The key-statistics cache: checked headers, bad files moved aside and recomputed, unique temp names, one computation."""

import copy
import json
import logging
import re
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import make_tokenizer, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file

import editing.stats as stats
from editing.stats import Corpus, layer_fingerprints, second_moments
from kedit.core.arch import spec_for

CORPUS = Corpus(
    "test",
    tuple(
        s
        for _ in range(3)
        for s in [
            "the capital of france is paris and the capital of germany is berlin",
            "alice speaks french and bob speaks german",
            "the river flows through the city of london in england",
        ]
    ),
)
LAYERS = [1, 2]
N, LENGTH = 10, 16


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))


@pytest.fixture
def setup():
    tok = make_tokenizer()
    model = tiny_llama(len(tok))
    return model, tok, spec_for(model)


def stats_dir(tmp_path):
    return tmp_path / "home" / "stats"


def count_forwards(model):
    """A counter of forward passes through the first block; returns (calls list, hook handle)."""
    calls = []
    return calls, model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))


def cache_file_for(layer, tmp_path):
    (f,) = stats_dir(tmp_path).glob(f"mom2-L{layer}-*.safetensors")
    return f


def read(f):
    with safe_open(str(f), framework="pt") as h:
        return h.metadata(), h.get_tensor("mom2")


def test_round_trip_loads_the_file_without_a_forward_pass(setup, tmp_path):
    model, tok, spec = setup
    calls, h = count_forwards(model)
    a = second_moments(model, tok, spec, LAYERS, CORPUS, N, LENGTH)
    first = len(calls)
    b = second_moments(model, tok, spec, LAYERS, CORPUS, N, LENGTH)
    h.remove()
    assert first > 0 and len(calls) == first  # the second call ran no forward pass
    assert list(b) == LAYERS and all(torch.equal(a[k], b[k]) for k in LAYERS)
    assert a[1].shape == (64, 64) and a[1].dtype == torch.float32
    # the header repeats every key field, the shape and the tensor's sha256
    meta, t = read(cache_file_for(1, tmp_path))
    assert torch.equal(t, a[1])
    assert meta["format"] == stats.FORMAT
    assert meta["model"] == layer_fingerprints(model, spec, [1])[1]
    assert meta["corpus"] == CORPUS.digest and meta["layer"] == "1" and meta["module"] == spec.module_path("mlp_out", 1)
    assert (meta["n_samples"], meta["length"], meta["dtype"]) == (str(N), str(LENGTH), "torch.float32")
    assert json.loads(meta["shape"]) == [64, 64] and meta["tensor_dtype"] == "torch.float32" and int(meta["tokens"]) > 0
    assert meta["sha256"] == stats._tensor_sha256(a[1])
    # the lock files live outside the (synced) cache folder; nothing but the two caches in it
    assert sorted(p.name.split("-")[1] for p in stats_dir(tmp_path).iterdir()) == ["L1", "L2"]


def truncate(f):
    f.write_bytes(f.read_bytes()[:-100])


def empty(f):
    f.write_bytes(b"")


def other_model(f):
    meta, t = read(f)
    save_file({"mom2": t}, str(f), metadata=meta | {"model": "0" * 64})


def tampered_tensor(f):
    meta, t = read(f)
    t = t.clone()
    t[0, 0] += 1.0  # the header's sha256 no longer matches
    save_file({"mom2": t}, str(f), metadata=meta)


def non_finite(f):
    meta, t = read(f)
    t = t.clone()
    t[3, 3] = float("nan")
    save_file({"mom2": t}, str(f), metadata=meta | {"sha256": stats._tensor_sha256(t)})  # only finiteness fails


def wrong_shape(f):
    meta, t = read(f)
    t = t[:32, :32].contiguous()
    save_file({"mom2": t}, str(f), metadata=meta | {"sha256": stats._tensor_sha256(t)})


def legacy(f):
    meta, t = read(f)
    old = {k: meta[k] for k in ("layer", "module", "model", "corpus", "n_samples", "length", "dtype", "tokens")}
    save_file({"mom2": t}, str(f), metadata=old)  # the format before headers: no tag, no sha256


@pytest.mark.parametrize(
    "damage, reason",
    [
        (truncate, "unreadable"),
        (empty, "unreadable"),
        (other_model, "header field model"),
        (tampered_tensor, "sha256"),
        (non_finite, "non-finite"),
        (wrong_shape, "expected a square float32 matrix|header says"),
        (legacy, "format None"),
    ],
)
def test_a_bad_file_is_moved_aside_and_recomputed(setup, tmp_path, caplog, damage, reason):
    model, tok, spec = setup
    fresh = second_moments(model, tok, spec, LAYERS, CORPUS, N, LENGTH)
    f1, f2 = cache_file_for(1, tmp_path), cache_file_for(2, tmp_path)
    damage(f1)
    damaged = f1.read_bytes()
    good2 = f2.read_bytes()
    calls, h = count_forwards(model)
    with caplog.at_level(logging.WARNING, logger="editing.stats"):
        again = second_moments(model, tok, spec, LAYERS, CORPUS, N, LENGTH)
    h.remove()
    assert len(calls) > 0  # recomputed
    assert all(torch.equal(fresh[k], again[k]) for k in LAYERS)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(f1) in warning.getMessage()
    assert re.search(reason, warning.getMessage()), warning.getMessage()
    # moved aside, never deleted: the damaged bytes are kept under a .bad-* name
    (bad,) = stats_dir(tmp_path).glob(f"{f1.name}.bad-*")
    assert bad.read_bytes() == damaged
    # the good layer was not touched; the rewritten layer passes the checks on the next call
    assert f2.read_bytes() == good2
    calls, h = count_forwards(model)
    third = second_moments(model, tok, spec, LAYERS, CORPUS, N, LENGTH)
    h.remove()
    assert len(calls) == 0 and torch.equal(third[1], fresh[1])
    assert len(list(stats_dir(tmp_path).glob("*.bad-*"))) == 1


def test_concurrent_callers_compute_once(setup, tmp_path, monkeypatch, caplog):
    model, tok, spec = setup
    models = [model, copy.deepcopy(model)]  # one model per stream on the same base: same weights, same cache key
    real = stats._accumulate
    computed = []

    def slow(*args, **kw):
        computed.append(threading.get_ident())
        time.sleep(0.5)  # widen the window in which the other caller looks for the file
        return real(*args, **kw)

    monkeypatch.setattr(stats, "_accumulate", slow)
    barrier = threading.Barrier(2)
    out, errors = {}, []

    def stream(i):
        try:
            barrier.wait()
            with torch.inference_mode():
                out[i] = second_moments(models[i], tok, spec, LAYERS, CORPUS, N, LENGTH)
        except BaseException as e:  # surfaced below
            errors.append(e)

    with caplog.at_level(logging.INFO, logger="editing.stats"):
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(computed) == 1  # one computed, the other waited for the lock and loaded the file
    assert any("waiting for" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(out[0][k], out[1][k]) for k in LAYERS)
    names = sorted(p.name for p in stats_dir(tmp_path).iterdir())
    assert len(names) == 2 and all(n.endswith(".safetensors") for n in names)  # no temp files left behind


def test_temporary_names_are_unique_and_cleaned_up(tmp_path, monkeypatch):
    key = {"layer": 0, "module": "m", "model": "x", "corpus": "c", "n_samples": 1, "length": 2, "dtype": "torch.float32"}
    f = stats._cache_file(key)
    seen = []
    real_replace = stats.os.replace

    def record(src, dst):
        seen.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(stats.os, "replace", record)
    t = torch.eye(4)
    stats._save_cached(f, key, t, 7)
    stats._save_cached(f, key, t, 7)
    assert len(set(seen)) == 2  # not one fixed name
    assert all(str(s) != str(f.with_suffix(".tmp")) and str(s).endswith(".tmp") for s in seen)
    assert all(str(s).startswith(str(f.parent) + "/") for s in seen)  # same folder: the rename is atomic
    assert torch.equal(stats._load_cached(f, key), t)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(stats.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        stats._save_cached(f, key, 2 * t, 7)
    assert sorted(p.name for p in f.parent.iterdir()) == [f.name]  # the temp file was removed
    assert torch.equal(stats._load_cached(f, key), t)  # the old file stays in place


def test_without_cache_nothing_is_written(setup, tmp_path):
    model, tok, spec = setup
    a = second_moments(model, tok, spec, LAYERS, CORPUS, N, LENGTH, use_cache=False)
    assert not (tmp_path / "home").exists()  # no cache file, no lock file
    b = second_moments(model, tok, spec, LAYERS, CORPUS, N, LENGTH)
    assert list(a) == LAYERS and all(torch.equal(a[k], b[k]) for k in LAYERS)


def test_the_lock_excludes_another_process(tmp_path):
    key = {"layer": 0, "module": "m", "model": "x", "corpus": "c", "n_samples": 1, "length": 2, "dtype": "torch.float32"}
    lock = stats._lock_file(key)
    lock.parent.mkdir(parents=True)
    holder = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
    holder += "print('held', flush=True); time.sleep(1.0)"
    child = subprocess.Popen([sys.executable, "-c", holder, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with stats._file_lock(lock):
            waited = time.monotonic() - t0
        assert waited > 0.5  # entered only once the other process had let go (it holds the lock 1 s)
    finally:
        child.wait(timeout=10)
