"""``kedit bench chain``: what a long chain of versions costs to rebuild and to show.

A stream of N edits in batches of b leaves N / b versions. This writes a chain of ``versions`` versions on the
model's own shapes, each a weight delta of rank ``rank`` on the MLP output projections of ``layers`` (what a
MEMIT batch of ``rank`` edits leaves) with ``rank`` requests, through the real registry in a fresh MLflow
SQLite store, then times: rebuilding production from the base (fetch, verify every hash, apply), the
registry's chain walk behind ``kedit status``, and ``kedit status`` itself. With ``keep`` set, it then squashes
all but the last ``keep`` versions (``kedit squash``) and times rebuilding production from the new chain.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kedit.core.models import KNOWN_MODELS, load_model, pull

from .bench import machine, save_json


def _patches(model, spec, layers: list[int], rank: int, seed: int):
    from editing.patches import LowRank, PatchSet, WeightDelta

    g = torch.Generator().manual_seed(seed)
    parts = {}
    for layer in layers:
        name = spec.module_path("mlp_out", layer) + ".weight"
        d_out, d_in = model.get_parameter(name).shape
        parts[name] = LowRank(1e-4 * torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g))
    return PatchSet([WeightDelta(parts)])


def _requests(i: int, rank: int):
    from kedit.core.facts import EditRequest

    return [EditRequest(f"f{i}-{j}", f"subject {i} {j}", "{} works for", f"company {j}", "nobody") for j in range(rank)]


def bench_chain(
    model_ref: str,
    versions: int = 200,
    rank: int = 10,
    layers: tuple[int, ...] = (3, 4, 5, 6, 7),
    json_out: Path | None = None,
    keep: int | None = None,
) -> dict:
    from kedit.core.arch import spec_for
    from kedit.store.naming import identify
    from kedit.store.squash import squash
    from kedit.store.tracking import T_MANIFEST_SHA, T_N_EDITS, T_PARENT_VERSION, Tracker
    from kedit.store.versions import model_fingerprint, rebuild, write_version

    from .status import status_text

    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    model, _ = load_model(model_ref, "cpu")
    spec = spec_for(model)
    name, fp = identify(model_ref, model)
    out = {"model": model_ref, "versions": versions, "rank": rank, "layers": list(layers), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="kedit-bench-chain-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        tracker = Tracker(uri)
        tracker.ensure_registered(name, fp, model_ref)
        run = tracker.start_run(name, "bench-chain", {})
        parent, parent_sha = None, None
        t0 = time.perf_counter()
        for i in tqdm(range(versions), desc="writing the chain", unit="version"):
            info = {"registered_model": name, "base_fingerprint": fp, "parent_version": parent, "editor": "memit"}
            work = Path(tmp) / f"work{i}"
            sha = write_version(
                work,
                _patches(model, spec, list(layers), rank, i),
                {},
                _requests(i, rank),
                {**info, "parent_manifest_sha256": parent_sha},
            )
            tags = {T_PARENT_VERSION: parent or "", T_MANIFEST_SHA: sha, T_N_EDITS: str((i + 1) * rank)}
            # on the one run, each version in its own folder, as a stream registers them
            parent, parent_sha = tracker.register_version(name, run, work, tags, f"versions/step-{i}"), sha
        tracker.set_production(name, parent)
        tracker.end_run(run)
        out["write_s_per_version"] = (time.perf_counter() - t0) / versions
        out["version_kb"] = sum(f.stat().st_size for f in (Path(tmp) / "work0").iterdir()) / 1024

        t0 = time.perf_counter()
        chain = rebuild(model, tracker, name, parent, fp)
        out["rebuild_s"] = time.perf_counter() - t0
        if len(chain.versions) != versions or len(chain.requests) != versions * rank:
            raise RuntimeError(f"rebuilt {len(chain.versions)} versions and {len(chain.requests)} requests of {versions}")
        t0 = time.perf_counter()
        tracker.chain(name, parent)
        out["registry_chain_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        status_text(model_ref, uri)
        out["status_s"] = time.perf_counter() - t0
        if keep is not None:
            head_state = model_fingerprint(None, model)
            upto = tracker.chain(name, parent)[-1 - keep].version
            base, _ = load_model(model_ref, "cpu")
            t0 = time.perf_counter()
            done = squash(base, tracker, name, upto, fp)
            out["squash_s"] = time.perf_counter() - t0
            out["squash_kb"] = _version_kb(tracker, name, done.squash)
            fresh, _ = load_model(model_ref, "cpu")
            t0 = time.perf_counter()
            chain = rebuild(fresh, tracker, name, tracker.production(name).version, fp)
            out["rebuild_after_squash_s"] = time.perf_counter() - t0
            out["versions_after_squash"] = len(chain.versions)
            if model_fingerprint(None, fresh) != head_state or len(chain.requests) != versions * rank:
                raise RuntimeError("the squashed chain did not rebuild the same model")
    save_json(json_out, out)
    return out


def _version_kb(tracker, name: str, version: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        d = tracker.fetch_version(tracker.version(name, version), Path(tmp))
        return sum(f.stat().st_size for f in d.iterdir()) / 1024
