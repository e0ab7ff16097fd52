"""Squashing a chain prefix: versions 1..k of a chain become one version, the later ones are copied onto it.

A long stream leaves a long chain, and every rebuild of production applies all of it. ``squash`` writes:

- one version **S** on the base that holds what the prefix left: the values of every base parameter the prefix
  changed (a ``WeightValues`` patch: copies, so the result is the prefix's bit for bit, which a sum of its
  deltas would not be) and every module it installed (a ``ModulePatch``, innermost install first, with the
  tensors they hold at v_k); the editor's state at v_k; the requests of the whole prefix, each fact keeping
  the version that first held it (``fact_versions``); the prefix's versions and manifest hashes (``squashes``);
- a copy of each later version, linked to S (``copy_of`` names the version and manifest it copies).

Before anything is registered, the new chain is applied to the same base and its whole state (every
parameter and buffer, names included, so the module structure too) must hash as the old chain's does, at v_k
and at the head. The old versions stay in the registry: ``kedit rollback`` to one still works, and the stream
finds facts quarantined on them (``Chain.lineage``). Production moves to the new head if it was the old one.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editing.patches import Installable, InstalledModule, ModulePatch, PatchSet, Undo, WeightValues
from kedit.core.errors import KeditError
from kedit.store.tracking import T_KIND, T_MANIFEST_SHA, T_PARENT_VERSION, Tracker, VersionInfo
from kedit.store.versions import (
    COPY_OF,
    FACT_VERSIONS,
    LINEAGE,
    NOT_HOLDING,
    PARENT_SHA,
    SIGNATURE,
    SQUASHES,
    SUPERSEDES,
    Version,
    editor_state,
    fact_version,
    fetch_chain,
    model_fingerprint,
    rebuild,
    stands_for,
    write_version,
)

log = logging.getLogger(__name__)

T_SQUASH_OF = "kedit.squash_of"  # on a squashed version: "v1-v<k>"
T_COPY_OF = "kedit.copy_of"  # on a copied version: the version it copies
# what a copied manifest does not carry over from its original (written anew, or the link being replaced)
_REWRITTEN = {"format", "created", "patches", "sha256", "fact_ids", "fact_keys", SIGNATURE, PARENT_SHA, "parent_version"}


class SquashError(KeditError):
    pass


@dataclass
class Squashed:
    squash: str  # the new version that stands for v1..v<k>
    head: str  # the new chain's head (a copy of the old head, or the squash itself)
    versions: list[str]  # the new chain, oldest first
    replaced: list[str]  # the old versions it stands for
    production_moved: bool
    head_fingerprint: str  # model_fingerprint of the model at the head, equal on both chains


def squash(model: nn.Module, tracker: Tracker, name: str, upto: str, fingerprint: str | None) -> Squashed:
    """Squash versions 1..``upto`` of production's chain into one version and copy the later ones onto it.

    ``model`` must hold the base weights; it ends holding the head (of the new chain, when it was made).
    The new chain is applied to the same base before anything is registered, and rebuilt from the registry
    before production moves; a state that differs from the old chain's raises SquashError."""
    prod = tracker.production(name)
    if prod is None:
        raise SquashError(f"{name}: no production version: nothing to squash")
    infos, loaded, shas = fetch_chain(tracker, name, prod.version, fingerprint)
    numbers = [i.version for i in infos]
    if upto not in numbers:
        raise SquashError(f"{name}: v{upto} is not in production's chain ({_span(numbers)})")
    k = numbers.index(upto) + 1
    if k < 2:
        raise SquashError(f"{name}: v{upto} is the first version of the chain: a squash needs at least two")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}  # by their names on the base
    with torch.no_grad():
        undo = _apply(model, [v.patches for v in loaded[:k]])
        patches = squash_patches(model, base)
        at_k = model_fingerprint(None, model)
        undo.extend(_apply(model, [v.patches for v in loaded[k:]]))
        at_head = model_fingerprint(None, model)
        undo.restore(model)
        # the new chain on the same base tensors, before anything is written
        undo = _apply(model, [patches])
        _same(model_fingerprint(None, model), at_k, f"the squash of v{numbers[0]}-v{upto}")
        undo.extend(_apply(model, [v.patches for v in loaded[k:]]))
        _same(model_fingerprint(None, model), at_head, "the copies on the squash")
        undo.restore(model)
    label = f"v{numbers[0]}-v{upto}"
    run = tracker.start_run(name, f"squash {label}", {T_KIND: "squash"})
    versions, parent, parent_sha = [], None, None
    with tempfile.TemporaryDirectory(prefix="kedit-squash-") as tmp:
        for j in range(k - 1, len(loaded)):
            d = Path(tmp) / f"v{numbers[j]}"
            if j == k - 1:
                sha = write_version(d, patches, editor_state(loaded[:k]), [r for v in loaded[:k] for r in v.requests],
                                    _squash_info(infos[:k], loaded[:k], shas[:k]))  # fmt: skip
            else:
                sha = write_version(d, loaded[j].patches, loaded[j].state, loaded[j].requests,
                                    _copy_info(infos[j], loaded[j], shas[j], parent, parent_sha))  # fmt: skip
            tags = _tags(infos[j], parent, sha, label if j == k - 1 else None)
            where = f"versions/{'squash' if j == k - 1 else f'copy-of-v{numbers[j]}'}"
            parent, parent_sha = tracker.register_version(name, run, d, tags, where), sha
            versions.append(parent)
    with torch.no_grad():  # the registered chain, walked and verified as any rebuild does
        rebuilt = rebuild(model, tracker, name, versions[-1], fingerprint)
        _same(model_fingerprint(None, model), at_head, f"v{versions[-1]} rebuilt from the registry")
    moved = (now := tracker.production(name)) is not None and now.version == prod.version
    if moved:
        tracker.set_production(name, versions[-1])
    tracker.log_params(run, {"squashed": label, "new_chain": ",".join(versions), "from_head": prod.version})
    tracker.end_run(run)
    log.info("%s: %s squashed into v%s, %d later version(s) copied onto it; head v%s (%d versions, was %d)",
             name, label, versions[0], len(versions) - 1, versions[-1], len(rebuilt.versions), len(numbers))  # fmt: skip
    return Squashed(versions[0], versions[-1], versions, numbers[:k], moved, at_head)


def _same(got: str, want: str, what: str) -> None:
    if got != want:
        raise SquashError(f"{what} does not rebuild the old chain's state (sha256 {got[:12]}… against {want[:12]}…)")


def squash_patches(model: nn.Module, base: dict[str, torch.Tensor]) -> PatchSet:
    """What the chain applied to ``model`` left on top of ``base``: changed base parameters as values, then every
    installed module, innermost first per path (each later one wraps the one before, as the chain built them)."""
    params = _base_parameters(model, base)
    values = {n: p.detach().clone() for n, p in params.items() if not torch.equal(p, base[n])}
    installs = [InstalledModule.snapshot(path, m) for path, nest in _installed(model) for m in nest]
    parts = [p for p in (WeightValues(values), ModulePatch(installs)) if not p.is_empty()]
    return PatchSet(parts, {"editor": "squash"})


def _base_parameters(model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's parameters by their names on the base, also those now wrapped by an installed module."""
    out = {}
    for n, p in model.named_parameters():
        plain = ".".join(s for s in n.split(".") if s != "original")  # x.original.weight is the base's x.weight
        if plain in base:
            out[plain] = p
    missing = set(base) - set(out)
    if missing:
        raise SquashError(f"base parameters no longer found in the model: {sorted(missing)[:3]}")
    return out


def _installed(model: nn.Module) -> list[tuple[str, list[Installable]]]:
    """Per path holding installed modules (outermost only), the nest of installs, innermost first."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, Installable) and not any(path.startswith(p + ".") for p, _ in out):
            nest = []
            while isinstance(m, Installable):
                nest.append(m)
                m = m.original
            out.append((path, nest[::-1]))
    return out


def _apply(model: nn.Module, patch_sets: list[PatchSet]) -> Undo:
    undo = Undo()
    for patches in patch_sets:
        undo.extend(patches.apply(model))
    return undo


def _squash_info(infos: list[VersionInfo], loaded: list[Version], shas: list[str]) -> dict[str, Any]:
    """The squash's manifest fields: the prefix's head as the base of the chain, and what the prefix held."""
    last = loaded[-1].manifest
    return {
        "registered_model": last["registered_model"],
        "base_model": last.get("base_model"),
        "base_fingerprint": last.get("base_fingerprint"),
        "parent_version": None,
        "editor": last.get("editor"),
        "hparams": last.get("hparams"),
        "n_edits": last.get("n_edits", sum(len(v.requests) for v in loaded)),
        SQUASHES: [{"version": i.version, "manifest_sha256": s} for i, s in zip(infos, shas)],
        LINEAGE: sorted({n for v in loaded for n in stands_for(v)}, key=int),
        NOT_HOLDING: sorted({key for v in loaded for key in v.manifest.get(NOT_HOLDING, ())}),
        SUPERSEDES: [e for v in loaded for e in v.manifest.get(SUPERSEDES, ())],
        FACT_VERSIONS: {r.key: fact_version(v, i.version, r.key) for i, v in zip(infos, loaded) for r in v.requests},
    }


def _copy_info(info: VersionInfo, version: Version, sha: str, parent: str, parent_sha: str) -> dict[str, Any]:
    """A later version's manifest fields, on its new parent, naming the version it copies."""
    copied = {key: val for key, val in version.manifest.items() if key not in _REWRITTEN}
    return copied | {
        "parent_version": parent,
        PARENT_SHA: parent_sha,
        COPY_OF: {"version": info.version, "manifest_sha256": sha},
        LINEAGE: stands_for(version),
        FACT_VERSIONS: {r.key: fact_version(version, info.version, r.key) for r in version.requests},
    }


def _tags(old: VersionInfo, parent: str | None, sha: str, squash_of: str | None) -> dict[str, Any]:
    tags = {k: v for k, v in old.tags.items() if k not in (T_PARENT_VERSION, T_MANIFEST_SHA)}
    tags |= {T_PARENT_VERSION: parent or "", T_MANIFEST_SHA: sha}
    if squash_of:
        tags[T_SQUASH_OF] = squash_of
    else:
        tags[T_COPY_OF] = old.version
    return tags


def _span(numbers: list[str]) -> str:
    return f"v{numbers[0]}-v{numbers[-1]}" if numbers else "empty"
