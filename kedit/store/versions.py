"""Model versions as patches over their parent, and rebuilding any version from the base.

A version directory holds:

- the batch's patches, in order, each kind under its own file names (``delta.safetensors`` +
  ``delta.json`` for a WeightDelta, ``modules.safetensors`` + ``modules.json`` for a ModulePatch),
  each with its own sha256 inside;
- ``state.safetensors``: the editor's state after the batch (e.g. AlphaEdit's key cache);
- ``requests.jsonl``: the accepted edit requests (retention is checked against them later);
- ``manifest.json``: parent version, base fingerprint, fact ids, editor, hparams, the sha256 of
  every file above, and ``patches``: per patch in order, its kind, its files with their sha256
  and its ``describe()`` summary. Version 1 manifests (a WeightDelta only) still read.

The registry stores the manifest's own sha256 as a tag, so the chain of trust starts outside
the artifact store: a tampered or missing file anywhere is refused before a weight is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editing.patches import PatchIntegrityError, PatchSet, WeightDelta
from editing.patches.base import check_file, read_manifest, write_manifest
from kedit.core.facts import EditRequest
from kedit.core.paths import sha256_file
from kedit.store.tracking import T_KIND, T_MANIFEST_SHA, Tracker, VersionInfo

log = logging.getLogger(__name__)

FORMAT = "kedit-version/2"
FORMATS = ("kedit-version/1", FORMAT)  # 1: a WeightDelta only, no ``patches`` list
EXPORT_FORMAT = "kedit-export/1"
EXPORT_MANIFEST = "kedit_version.json"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
MANIFEST = "manifest.json"
STATE = "state.safetensors"
REQUESTS = "requests.jsonl"


@dataclass
class Version:
    manifest: dict[str, Any]
    patches: PatchSet
    state: dict[str, torch.Tensor]
    requests: list[EditRequest]


def write_version(
    directory: Path,
    patches: PatchSet,
    state: dict[str, Any],
    requests: list[EditRequest],
    info: dict[str, Any],
) -> str:
    """Write a version directory; returns the manifest's sha256 (to be stored in the registry).

    ``patches`` is what ``Editor.edit`` returned.
    """
    directory.mkdir(parents=True, exist_ok=True)
    index = patches.save(directory)
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
        "patches": index,
        "sha256": {
            **{name: sha for entry in index for name, sha in entry["files"].items()},
            STATE: sha256_file(directory / STATE),
            REQUESTS: sha256_file(directory / REQUESTS),
        },
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return sha256_file(directory / MANIFEST)


def read_version(directory: Path, manifest_sha: str | None, fingerprint: str | None = None) -> Version:
    """Load a version directory after checking every hash; raises PatchIntegrityError on any mismatch."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise PatchIntegrityError(f"{directory}: no {MANIFEST}")
    if not manifest_sha:
        raise PatchIntegrityError(f"{directory}: the registry holds no manifest hash for this version; refusing to apply it")
    actual = sha256_file(mpath)
    if actual != manifest_sha:
        raise PatchIntegrityError(f"{mpath}: sha256 {actual[:16]}… does not match the registry's {manifest_sha[:16]}…")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") not in FORMATS:
        raise PatchIntegrityError(f"{mpath}: unknown format {manifest.get('format')!r}")
    if fingerprint and manifest.get("base_fingerprint") != fingerprint:
        raise PatchIntegrityError(
            f"{mpath}: made for base weights {str(manifest.get('base_fingerprint'))[:12]}, not {fingerprint[:12]}"
        )
    index = _patch_index(manifest, mpath)
    patch_files = {name for entry in index for name in entry.get("files", {})}
    for name, want in manifest["sha256"].items():
        if name not in patch_files:  # the patch files: PatchSet.load checks them against the same hashes
            check_file(directory / name, want)
    patches = PatchSet.load(directory, index)
    state = load_file(str(directory / STATE))
    lines = (directory / REQUESTS).read_text(encoding="utf-8").splitlines()
    requests = [EditRequest.from_dict(json.loads(line)) for line in lines if line.strip()]
    return Version(manifest, patches, state, requests)


def _patch_index(manifest: dict[str, Any], mpath: Path) -> list[dict[str, Any]]:
    """The manifest's patch list (a version 1 manifest implies one WeightDelta); every listed file must
    carry the same hash in the manifest's ``sha256`` map, which was just verified."""
    if manifest["format"] == "kedit-version/1":
        index = [{"kind": WeightDelta.kind, "files": {f: manifest["sha256"].get(f) for f in WeightDelta.files}}]
    else:
        index = manifest.get("patches")
        if not isinstance(index, list):
            raise PatchIntegrityError(f"{mpath}: no patch list")
    for entry in index:
        for name, sha in entry.get("files", {}).items():
            if manifest["sha256"].get(name) != sha:
                raise PatchIntegrityError(f"{mpath}: patch file {name} is not covered by the manifest's sha256")
    return index


def fetch(tracker: Tracker, info: VersionInfo, dst: Path, fingerprint: str | None) -> Version:
    return read_version(tracker.fetch_version(info, dst), info.tags.get(T_MANIFEST_SHA), fingerprint)


@dataclass
class Chain:
    versions: list[VersionInfo]
    state: dict[str, torch.Tensor]
    editor: str | None
    requests: list[EditRequest]  # every request applied along the chain, oldest first


def _fetch_chain(tracker: Tracker, name: str, version: str | None, fingerprint: str | None):
    """Every version from the base up to ``version``, fetched and verified (patches loaded in memory)."""
    infos = tracker.chain(name, version)
    with tempfile.TemporaryDirectory(prefix="kedit-chain-") as tmp:
        loaded = [fetch(tracker, info, Path(tmp) / info.version, fingerprint) for info in infos]
    return infos, loaded


def _apply_chain(model, name: str, infos: list[VersionInfo], loaded: list[Version]) -> None:
    for info, v in zip(infos, loaded):
        log.info("applying %s v%s (%d facts; %s)", name, info.version, len(v.requests), ", ".join(p.kind for p in v.patches))
        v.patches.apply(model)


def rebuild(model, tracker: Tracker, name: str, version: str | None, fingerprint: str | None) -> Chain:
    """Apply the patches from the base up to ``version`` to ``model`` (which must hold the base weights):
    weight deltas are added, module patches re-install their modules (built from the registry of
    installable types, no editor needed).

    Every version is fetched and verified before anything changes, so a bad link leaves the model untouched.
    """
    infos, loaded = _fetch_chain(tracker, name, version, fingerprint)
    _apply_chain(model, name, infos, loaded)
    return _chain(infos, loaded)


def _chain(infos: list[VersionInfo], loaded: list[Version]) -> Chain:
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
    """Rebuild ``version`` on ``model`` (the base) and write it to ``out``; ``kedit export`` calls this.

    - A chain of weight deltas only: a plain transformers checkpoint (``from_pretrained`` loads it),
      with ``kedit_version.json`` naming the version, its chain and fact ids.
    - A chain with module patches cannot be a plain checkpoint (the installed modules are not
      transformers layers), so ``out`` gets ``base/`` (the base checkpoint), ``patches/v<N>/`` (each
      version's patches as stored) and ``kedit_version.json`` (format ``kedit-export/1``: the chain,
      the base files' and every patch file's sha256). One log line says so; ``load_export(out)``
      loads it back bit for bit.

    Every version is verified before anything is written. Either way ``model`` ends holding the version.
    """
    infos, loaded = _fetch_chain(tracker, name, version, fingerprint)
    chain = _chain(infos, loaded)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "registered_model": name,
        "version": version,
        "base_fingerprint": fingerprint,
        "chain": [v.version for v in chain.versions],
        "fact_ids": [r.id for r in chain.requests],
    }
    if not any(p.kind != WeightDelta.kind for v in loaded for p in v.patches):
        _apply_chain(model, name, infos, loaded)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / EXPORT_MANIFEST).write_text(json.dumps(info, indent=2))
        return out
    kinds = sorted({p.kind for v in loaded for p in v.patches})
    log.warning(
        "%s v%s holds module patches (%s): exported to %s as the base checkpoint plus kedit patches, "
        "not a plain transformers checkpoint; load it with kedit.store.versions.load_export",
        name, version, ", ".join(kinds), out,
    )  # fmt: skip
    _export_with_patches(model, tokenizer, infos, loaded, out, info)
    _apply_chain(model, name, infos, loaded)
    return out


def _export_with_patches(model, tokenizer, infos: list[VersionInfo], loaded: list[Version], out: Path, info: dict) -> None:
    """``base/`` from the model before any patch, ``patches/v<N>/`` per version, and the manifest listing every hash."""
    base = out / "base"
    if base.exists():
        shutil.rmtree(base)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    versions = []
    for vi, v in zip(infos, loaded):
        rel = f"patches/v{vi.version}"
        versions.append({"version": vi.version, "dir": rel, "patches": v.patches.save(out / rel)})
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    manifest = {
        **info,
        "format": EXPORT_FORMAT,
        "base": {"dir": "base", "dtype": dtype, "sha256": _tree_hashes(base)},
        "versions": versions,
    }
    write_manifest(out / EXPORT_MANIFEST, manifest)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): sha256_file(f) for f in sorted(root.rglob("*")) if f.is_file()}


def load_export(directory: Path, device: str | None = "cpu", dtype: torch.dtype | None = None):
    """Load what ``export_version`` wrote: ``(model, tokenizer, manifest)``.

    A plain checkpoint loads as it is. A ``kedit-export/1`` directory is checked first (every base file
    and every patch file against the manifest's sha256, no unlisted files in ``base/``), then the base
    is loaded in the dtype it was saved in (unless ``dtype`` says otherwise) and each version's patches
    are applied in order: the result equals the rebuilt version bit for bit.
    """
    from kedit.core.models import load_model

    directory = Path(directory)
    mpath = directory / EXPORT_MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise PatchIntegrityError(f"{directory}: no readable {EXPORT_MANIFEST} ({e})") from None
    if manifest.get("format") != EXPORT_FORMAT:
        model, tok = load_model(str(directory), device, dtype)
        return model, tok, manifest
    manifest = read_manifest(mpath, EXPORT_FORMAT)
    saved_dtype = manifest["base"]["dtype"]
    if saved_dtype not in EXPORT_DTYPES:
        raise PatchIntegrityError(f"{mpath}: base dtype {saved_dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    base = _inside(directory, manifest["base"]["dir"])
    if _tree_hashes(base) != manifest["base"]["sha256"]:
        raise PatchIntegrityError(f"{base}: the base checkpoint's files do not match the export manifest")
    sets = [PatchSet.load(_inside(directory, v["dir"]), v["patches"]) for v in manifest["versions"]]
    model, tok = load_model(str(base), device, dtype or getattr(torch, saved_dtype))
    for v, patches in zip(manifest["versions"], sets):
        log.info("applying exported v%s (%s)", v["version"], ", ".join(p.kind for p in patches))
        patches.apply(model)
    return model, tok, manifest


def _inside(directory: Path, relative: str) -> Path:
    """A path the manifest names, refused unless it stays inside the export directory."""
    path = (directory / relative).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise PatchIntegrityError(f"{directory / EXPORT_MANIFEST}: {relative!r} points outside the export")
    return path


def load_model_or_export(ref: str, device: str | None = None):
    """``(model, tokenizer)`` of a model reference, where a directory written by ``kedit export`` loads
    with its patches (verified), and anything else as ``kedit.core.models.load_model`` loads it."""
    from kedit.core.models import load_model

    if (Path(ref) / EXPORT_MANIFEST).is_file():
        model, tok, _ = load_export(Path(ref), device)
        return model, tok
    return load_model(ref, device)
