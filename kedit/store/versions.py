"""Model versions as weight deltas over their parent, and rebuilding any version from the base.

A version directory holds:

- ``delta.safetensors`` + ``delta.json``: the batch's WeightDelta (its own sha256 inside);
- ``state.safetensors``: the editor's state after the batch (e.g. AlphaEdit's key cache);
- ``requests.jsonl``: the accepted edit requests (retention is checked against them later);
- ``manifest.json``: parent version, base fingerprint, fact ids, editor, hparams and the
  sha256 of every file above.

The registry stores the manifest's own sha256 as a tag, so the chain of trust starts outside
the artifact store: a tampered or missing file anywhere is refused before a weight is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editing.delta import DeltaIntegrityError, WeightDelta
from kedit.core.facts import EditRequest
from kedit.core.paths import sha256_file
from kedit.store.tracking import T_KIND, T_MANIFEST_SHA, Tracker, VersionInfo

log = logging.getLogger(__name__)

FORMAT = "kedit-version/1"
MANIFEST = "manifest.json"
STATE = "state.safetensors"
REQUESTS = "requests.jsonl"


@dataclass
class Version:
    manifest: dict[str, Any]
    delta: WeightDelta
    state: dict[str, torch.Tensor]
    requests: list[EditRequest]


def write_version(
    directory: Path,
    delta: WeightDelta,
    state: dict[str, Any],
    requests: list[EditRequest],
    info: dict[str, Any],
) -> str:
    """Write a version directory; returns the manifest's sha256 (to be stored in the registry)."""
    directory.mkdir(parents=True, exist_ok=True)
    delta.save(directory)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"editor state must hold tensors only; not tensors: {bad}")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / STATE))
    with (directory / REQUESTS).open("w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    manifest = {
        "format": FORMAT,
        **info,
        "fact_ids": [r.id for r in requests],
        "created": datetime.now(UTC).isoformat(),
        "sha256": {name: sha256_file(directory / name) for name in ("delta.safetensors", "delta.json", STATE, REQUESTS)},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return sha256_file(directory / MANIFEST)


def read_version(directory: Path, manifest_sha: str | None, fingerprint: str | None = None) -> Version:
    """Load a version directory after checking every hash; raises DeltaIntegrityError on any mismatch."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise DeltaIntegrityError(f"{directory}: no {MANIFEST}")
    if not manifest_sha:
        raise DeltaIntegrityError(f"{directory}: the registry holds no manifest hash for this version; refusing to apply it")
    actual = sha256_file(mpath)
    if actual != manifest_sha:
        raise DeltaIntegrityError(f"{mpath}: sha256 {actual[:16]}… does not match the registry's {manifest_sha[:16]}…")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise DeltaIntegrityError(f"{mpath}: unknown format {manifest.get('format')!r}")
    if fingerprint and manifest.get("base_fingerprint") != fingerprint:
        raise DeltaIntegrityError(
            f"{mpath}: made for base weights {str(manifest.get('base_fingerprint'))[:12]}, not {fingerprint[:12]}"
        )
    for name, want in manifest["sha256"].items():
        f = directory / name
        if not f.is_file():
            raise DeltaIntegrityError(f"{directory}: {name} is missing")
        if sha256_file(f) != want:
            raise DeltaIntegrityError(f"{f}: sha256 does not match the manifest")
    delta = WeightDelta.load(directory)
    state = load_file(str(directory / STATE))
    lines = (directory / REQUESTS).read_text(encoding="utf-8").splitlines()
    requests = [EditRequest.from_dict(json.loads(line)) for line in lines if line.strip()]
    return Version(manifest, delta, state, requests)


def fetch(tracker: Tracker, info: VersionInfo, dst: Path, fingerprint: str | None) -> Version:
    return read_version(tracker.fetch_version(info, dst), info.tags.get(T_MANIFEST_SHA), fingerprint)


@dataclass
class Chain:
    versions: list[VersionInfo]
    state: dict[str, torch.Tensor]
    editor: str | None
    requests: list[EditRequest]  # every request applied along the chain, oldest first


def rebuild(model, tracker: Tracker, name: str, version: str | None, fingerprint: str | None) -> Chain:
    """Apply the deltas from the base up to ``version`` to ``model`` (which must hold the base weights).

    Every version is fetched and verified before any weight changes, so a bad link leaves the model untouched.
    """
    infos = tracker.chain(name, version)
    with tempfile.TemporaryDirectory(prefix="kedit-chain-") as tmp:
        loaded = [fetch(tracker, info, Path(tmp) / info.version, fingerprint) for info in infos]
    for info, v in zip(infos, loaded):
        log.info("applying %s v%s (%d facts)", name, info.version, len(v.requests))
        v.delta.apply(model)
    last = loaded[-1] if loaded else None
    return Chain(
        infos,
        last.state if last else {},
        last.manifest.get("editor") if last else None,
        [r for v in loaded for r in v.requests],
    )


def model_fingerprint(path: str | None, model=None) -> str:
    """sha256 over a checkpoint's weight files (names and contents), or over the model's tensors if no directory."""
    h = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin")) if path and Path(path).is_dir() else []
    if files:
        for f in files:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()
    if model is None:
        raise ValueError(f"no weight files under {path!r} and no model to hash")
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- operations on versions


def rollback_to(tracker: Tracker, name: str, version: str, fingerprint: str | None = None) -> str | None:
    """Move ``production`` to ``version`` after verifying its whole chain; returns the previous production."""
    infos = tracker.chain(name, version)
    with tempfile.TemporaryDirectory(prefix="kedit-verify-") as tmp:
        for info in infos:
            fetch(tracker, info, Path(tmp) / info.version, fingerprint)
    prev = tracker.production(name)
    tracker.set_production(name, version)
    run = tracker.start_run(name, f"rollback-to-v{version}", {T_KIND: "rollback"})
    tracker.log_params(run, {"from_version": prev.version if prev else "", "to_version": version})
    tracker.end_run(run)
    return prev.version if prev else None


def export_version(model, tokenizer, tracker: Tracker, name: str, version: str, fingerprint: str, out: Path) -> Path:
    """Rebuild ``version`` on ``model`` (the base) and save a plain transformers checkpoint to ``out``."""
    chain = rebuild(model, tracker, name, version, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "kedit_version.json").write_text(
        json.dumps(
            {
                "registered_model": name,
                "version": version,
                "base_fingerprint": fingerprint,
                "chain": [v.version for v in chain.versions],
                "fact_ids": [r.id for r in chain.requests],
            },
            indent=2,
        )
    )
    return out
