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

Since ``kedit-version/3`` the manifest also names its parent's manifest sha256
(``parent_manifest_sha256``, null on the base), so a chain is verified from the manifests themselves:
the registry's manifest tag only locates the head, and walking down each parent must be the very
manifest its child names, of the same registered model and base weights, with no manifest twice.
A chain spliced through the registry alone (a version's source and tag pointed at another version's
artifact) is refused. Below a ``kedit-version/1`` or ``/2`` manifest (no parent hash) a parent is
still checked against the registry's tag only, as those formats were; a log line says so.

With ``KEDIT_SIGNING_KEY`` set, manifests are written with an HMAC-SHA256 ``signature`` and every
manifest read must carry a good one (see ``docs/security.md`` for what that does and does not protect).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editing import EDITORS
from editing.patches import PatchIntegrityError, PatchSet, WeightDelta
from editing.patches.base import check_file, read_manifest, write_manifest
from kedit.core.facts import EditRequest
from kedit.core.paths import sha256_file
from kedit.store.tracking import T_KIND, T_MANIFEST_SHA, Tracker, VersionInfo

log = logging.getLogger(__name__)

FORMAT = "kedit-version/3"
FORMAT_UNLINKED = "kedit-version/2"  # no parent_manifest_sha256: the parent is vouched for by the registry's tag only
FORMATS = ("kedit-version/1", FORMAT_UNLINKED, FORMAT)  # 1: a WeightDelta only, no ``patches`` list
PARENT_SHA = "parent_manifest_sha256"
SIGNATURE = "signature"
SIGNING_ENV = "KEDIT_SIGNING_KEY"
SIGNING_ALG = "hmac-sha256"
EXPORT_FORMAT = "kedit-export/1"
EXPORT_MANIFEST = "kedit_version.json"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
MANIFEST = "manifest.json"
STATE = "state.safetensors"
REQUESTS = "requests.jsonl"
NOT_HOLDING = "not_holding"  # manifest key: facts of the version whose own edit did not hold when it was made
SUPERSEDES = "supersedes"  # manifest key: the re-edits of the version, each naming the fact and version it replaces
# written by a squash (kedit.store.squash): the versions a squash stands for, the version a copy copies, and per
# fact the version that first held it
SQUASHES = "squashes"  # [{version, manifest_sha256}] of the squashed prefix, oldest first
COPY_OF = "copy_of"  # {version, manifest_sha256} of the copied version
FACT_VERSIONS = "fact_versions"  # fact key -> version
LINEAGE = "lineage"  # what the squashed or copied versions stood for in turn (a squash of a squash)


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

    ``patches`` is what ``Editor.edit`` returned. ``info`` names at least ``registered_model``,
    ``base_fingerprint``, ``parent_version`` and, for a version on a parent, ``parent_manifest_sha256``
    (the parent's verified manifest sha, ``Chain.head_manifest_sha``). Without that key a version on a
    parent is written as ``kedit-version/2`` (its parent link then rests on the registry; a warning says so).
    With ``KEDIT_SIGNING_KEY`` set the manifest is signed.
    """
    info = dict(info)
    fmt = FORMAT
    if info.get("parent_version"):
        if PARENT_SHA not in info:
            fmt = FORMAT_UNLINKED
            log.warning(
                "version on v%s written without its parent's manifest sha256 (%s): its parent link rests on the registry",
                info["parent_version"], FORMAT_UNLINKED,
            )  # fmt: skip
        elif not info[PARENT_SHA]:
            raise ValueError(f"parent_version {info['parent_version']!r} given with an empty {PARENT_SHA}")
    else:
        if info.get(PARENT_SHA):
            raise ValueError(f"{PARENT_SHA} given for a version on the base (no parent_version)")
        info[PARENT_SHA] = None
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
        "format": fmt,
        **info,
        "fact_ids": [r.id for r in requests],  # the producers' ids (provenance)
        "fact_keys": [r.key for r in requests],  # the facts' identity on the chain (EditRequest.key)
        "created": datetime.now(UTC).isoformat(),
        "patches": index,
        "sha256": {
            **{name: sha for entry in index for name, sha in entry["files"].items()},
            STATE: sha256_file(directory / STATE),
            REQUESTS: sha256_file(directory / REQUESTS),
        },
    }
    manifest.pop(SIGNATURE, None)
    key = signing_key()
    if key is not None:
        manifest[SIGNATURE] = _signature(manifest, key)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return sha256_file(directory / MANIFEST)


# ----------------------------------------------------------------------------- signing


def signing_key() -> bytes | None:
    """The manifest signing key, ``$KEDIT_SIGNING_KEY`` read now (never at import); None when unset or empty."""
    key = os.environ.get(SIGNING_ENV, "")
    return key.encode("utf-8") if key else None


def key_id(key: bytes) -> str:
    """A short public name of a key (the first 8 hex of its sha256), so a rotated key gives a clear error."""
    return hashlib.sha256(key).hexdigest()[:8]


def _signed_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest's canonical JSON without its signature: what the HMAC covers."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def _signature(manifest: dict[str, Any], key: bytes) -> dict[str, str]:
    mac = hmac.new(key, _signed_bytes(manifest), hashlib.sha256).hexdigest()
    return {"alg": SIGNING_ALG, "key_id": key_id(key), "hmac": mac}


def check_signature(manifest: dict[str, Any], where: str) -> None:
    """With a signing key set, refuse an unsigned manifest or one whose HMAC does not verify under that key."""
    key = signing_key()
    sig = manifest.get(SIGNATURE)
    if key is None:
        if sig is not None:
            log.debug("%s: signed manifest read without %s; its signature is not checked", where, SIGNING_ENV)
        return
    if sig is None:
        raise PatchIntegrityError(f"{where}: unsigned manifest, and {SIGNING_ENV} is set: refusing it")
    if not isinstance(sig, dict) or sig.get("alg") != SIGNING_ALG or not isinstance(sig.get("hmac"), str):
        raise PatchIntegrityError(f"{where}: bad signature (not an {SIGNING_ALG} signature)")
    if sig.get("key_id") != key_id(key):
        raise PatchIntegrityError(
            f"{where}: bad signature: signed with key id {sig.get('key_id')!r}, but the {SIGNING_ENV} set has id "
            f"{key_id(key)!r} (a rotated or wrong key?)"
        )
    want = _signature(manifest, key)["hmac"]
    # compare_digest takes ASCII str or bytes only: a planted non-ASCII value must be a refusal, not a TypeError
    if not hmac.compare_digest(want.encode(), sig["hmac"].encode("utf-8", "surrogatepass")):
        raise PatchIntegrityError(f"{where}: bad signature: the manifest changed after it was signed, or another key signed it")


# ----------------------------------------------------------------------------- reading


def read_version(directory: Path, manifest_sha: str | None, fingerprint: str | None = None) -> Version:
    """Load a version directory after checking every hash (and, with a signing key set, the manifest's
    signature); raises PatchIntegrityError on any mismatch. ``manifest_sha`` is what vouches for the
    manifest: the registry's tag for a chain's head, the child manifest's ``parent_manifest_sha256`` below it."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise PatchIntegrityError(f"{directory}: no {MANIFEST}")
    if not manifest_sha:
        raise PatchIntegrityError(f"{directory}: the registry holds no manifest hash for this version; refusing to apply it")
    actual = sha256_file(mpath)
    if actual != manifest_sha:
        raise PatchIntegrityError(f"{mpath}: sha256 {actual[:16]}… does not match the registry's {manifest_sha[:16]}…")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PatchIntegrityError(f"{mpath}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise PatchIntegrityError(f"{mpath}: unknown format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
    check_signature(manifest, str(mpath))
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
    """One version on its own, vouched for by the registry's manifest tag (a chain is walked by ``rebuild``)."""
    return read_version(tracker.fetch_version(info, dst), info.tags.get(T_MANIFEST_SHA), fingerprint)


@dataclass
class Chain:
    versions: list[VersionInfo]
    state: dict[str, torch.Tensor]
    editor: str | None
    requests: list[EditRequest]  # every request applied along the chain, oldest first
    head_manifest_sha: str | None = None  # the verified manifest sha256 of the last version; None on the base
    # (request, version) of the requests whose edit held when their version was made, oldest first:
    # what ``kedit.core.facts.reedit.live_facts`` reads the chain's current facts from (the version that first
    # held the fact, also when a squash holds it now)
    applied: list[tuple[EditRequest, str]] = field(default_factory=list)
    # the chain's versions and every version they stand for (a squash's prefix, a copy's original): where an
    # attempt on "this chain" may have been made, e.g. one that quarantined a fact
    lineage: list[str] = field(default_factory=list)


def fetch_chain(tracker: Tracker, name: str, version: str | None, fingerprint: str | None):
    """Every version from the base up to ``version``, fetched and verified (patches loaded in memory), oldest first.

    The walk goes down from the head. The registry locates each version (its artifact and the head's
    manifest sha256); below the head, each manifest must be the one its child's manifest names in
    ``parent_manifest_sha256``. Every manifest must name this registered model, the registry's parent
    tag must equal the manifest's ``parent_version``, all must share the base fingerprint (and match
    ``fingerprint`` when given), and no manifest may appear twice. Any disagreement raises
    PatchIntegrityError naming the version, before any weight is touched.
    """
    infos: list[VersionInfo] = []
    loaded: list[Version] = []
    shas: list[str] = []
    seen: set[str] = set()
    named: str | None = None  # the manifest sha256 the child's manifest names for this version
    child: str | None = None
    base_fp = fingerprint
    index = tracker.version_index(name) if version else {}
    walked: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="kedit-chain-") as tmp, ThreadPoolExecutor(FETCH_WORKERS) as pool:
        fetched = _prefetch(pool, tracker, index, version, Path(tmp))
        while version:
            where = f"{name} v{version}"
            if version in walked:
                raise PatchIntegrityError(f"{where}: the chain comes back to this version (a cycle)")
            info = index.get(version) or tracker.version(name, version)
            tag = info.tags.get(T_MANIFEST_SHA)
            if child is None:
                want = tag  # the head: the registry's tag is all there is to start from
            elif named is not None:
                want = named
                if tag != named:
                    raise PatchIntegrityError(
                        f"{where}: the registry's manifest sha256 {str(tag)[:16]}… is not the {named[:16]}… "
                        f"that v{child}'s manifest names for its parent"
                    )
            else:
                want = tag
                log.warning(
                    "%s: v%s's manifest (an older format) names no parent manifest sha256; v%s is vouched for by the "
                    "registry's tag only",
                    name, child, version,
                )  # fmt: skip
            got = fetched.get(version)  # started from the same registry entry as ``info``
            path = got.result() if got is not None else tracker.fetch_version(info, Path(tmp) / f"v{version}")
            v = read_version(path, want, base_fp)
            m = v.manifest
            if want in seen:
                raise PatchIntegrityError(f"{where}: manifest {want[:16]}… appears twice in the chain")
            seen.add(want)
            if m.get("registered_model") != name:
                raise PatchIntegrityError(f"{where}: its manifest was made for registered model {m.get('registered_model')!r}")
            parent = m.get("parent_version")
            parent = str(parent) if parent not in (None, "") else None
            if parent != info.parent:
                raise PatchIntegrityError(
                    f"{where}: the registry's parent tag says {_v(info.parent)}, its manifest says {_v(parent)}"
                )
            base_fp = base_fp or m.get("base_fingerprint")
            if m.get("base_fingerprint") != base_fp:
                raise PatchIntegrityError(f"{where}: made for other base weights than the rest of the chain")
            named = _named_parent(m, parent, where)
            infos.append(info)
            walked.add(info.version)
            loaded.append(v)
            shas.append(want)
            child, version = version, parent
    return infos[::-1], loaded[::-1], shas[::-1]


FETCH_WORKERS = 4  # artifact downloads in flight while the chain is verified (I/O: copies or HTTP requests)


def _prefetch(pool: ThreadPoolExecutor, tracker: Tracker, index: dict[str, VersionInfo], head: str | None, tmp: Path):
    """Start downloading the versions the registry's parent tags link below ``head``, into ``tmp/v<N>``.

    Only the downloads run ahead: each version is still verified in the walk, against the manifest hash its
    child names, so a registry whose tags lie gets nothing past the check."""
    fetched: dict[str, Future] = {}
    while head and head in index and head not in fetched:
        fetched[head] = pool.submit(tracker.fetch_version, index[head], tmp / f"v{head}")
        head = index[head].parent
    return fetched


def _v(version: str | None) -> str:
    return f"v{version}" if version else "the base"


def _named_parent(manifest: dict[str, Any], parent: str | None, where: str) -> str | None:
    """The parent's manifest sha256 a ``kedit-version/3`` manifest names (None for older formats or on the base)."""
    if manifest["format"] != FORMAT:
        return None
    sha = manifest.get(PARENT_SHA)
    if parent is None and sha is not None:
        raise PatchIntegrityError(f"{where}: its manifest names a parent manifest but no parent version")
    if parent is not None and not (isinstance(sha, str) and sha):
        raise PatchIntegrityError(f"{where}: its manifest names parent v{parent} but not the parent's manifest sha256")
    return sha


def _apply_chain(model, name: str, infos: list[VersionInfo], loaded: list[Version]) -> None:
    for info, v in zip(infos, loaded):
        log.info("applying %s v%s (%d facts; %s)", name, info.version, len(v.requests), ", ".join(p.kind for p in v.patches))
        v.patches.apply(model)


def rebuild(model, tracker: Tracker, name: str, version: str | None, fingerprint: str | None) -> Chain:
    """Apply the patches from the base up to ``version`` to ``model`` (which must hold the base weights):
    weight deltas are added, module patches re-install their modules (built from the registry of
    installable types, no editor needed).

    Every version is fetched and verified (``fetch_chain``) before anything changes, so a bad link
    leaves the model untouched.
    """
    infos, loaded, shas = fetch_chain(tracker, name, version, fingerprint)
    _apply_chain(model, name, infos, loaded)
    return _chain(infos, loaded, shas)


def _held(version: Version) -> list[EditRequest]:
    """The version's requests whose edit held when it was made (its manifest lists the others)."""
    not_holding = set(version.manifest.get(NOT_HOLDING, ()))
    return [r for r in version.requests if r.key not in not_holding]


def fact_version(version: Version, number: str, key: str) -> str:
    """The version that first held a fact: what a squash or a copy recorded, else the version itself."""
    return str(version.manifest.get(FACT_VERSIONS, {}).get(key, number))


def stands_for(version: Version) -> list[str]:
    """The older versions a version replaces: a squash's prefix, a copy's original, and what those stood for in
    turn (``LINEAGE``, written by a squash); none for an edit's version."""
    squashed = [str(e["version"]) for e in version.manifest.get(SQUASHES, ())]
    copied = version.manifest.get(COPY_OF)
    direct = squashed + ([str(copied["version"])] if copied else [])
    return direct + [str(v) for v in version.manifest.get(LINEAGE, ()) if str(v) not in direct]


def editor_state(loaded: list[Version]) -> dict[str, torch.Tensor]:
    """The head editor's state at the head of a chain: what its own trailing versions stored, added up by the
    editor (``Editor.state_at``; an editor that stores its whole state each time gives the last). An editor
    that is not registered here gets the last version's state as it is."""
    if not loaded:
        return {}
    editor = loaded[-1].manifest.get("editor")
    run: list[Version] = []
    for v in reversed(loaded):  # a stream with another editor started with a fresh state: only this editor's run
        if v.manifest.get("editor") != editor:
            break
        run.insert(0, v)
    cls = EDITORS.get(editor)
    return cls.state_at([v.state for v in run]) if cls is not None else dict(loaded[-1].state)


def _chain(infos: list[VersionInfo], loaded: list[Version], shas: list[str]) -> Chain:
    last = loaded[-1] if loaded else None
    return Chain(
        infos,
        editor_state(loaded),
        last.manifest.get("editor") if last else None,
        [r for v in loaded for r in v.requests],
        shas[-1] if shas else None,
        [(r, fact_version(v, i.version, r.key)) for i, v in zip(infos, loaded) for r in _held(v)],
        [n for i, v in zip(infos, loaded) for n in (i.version, *stands_for(v))],
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
    """Move ``production`` to ``version`` after verifying its whole chain as ``rebuild`` does; returns the previous one."""
    fetch_chain(tracker, name, version, fingerprint)
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
    infos, loaded, shas = fetch_chain(tracker, name, version, fingerprint)
    chain = _chain(infos, loaded, shas)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "registered_model": name,
        "version": version,
        "base_fingerprint": fingerprint,
        "chain": [v.version for v in chain.versions],
        "fact_ids": [r.id for r in chain.requests],
        "fact_keys": [r.key for r in chain.requests],
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
