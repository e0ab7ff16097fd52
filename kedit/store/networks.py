"""Trained editor networks (MEND's) in the registry: a registered model of their own per base model and
editor, ``<base registered name>-<editor>``, tagged with the base fingerprint; alias ``production`` on the
version editors use. A version's tag holds a sha256 over its files (names and contents), checked after every download."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from kedit.core.paths import sha256_file

from .tracking import T_EDITOR, T_FINGERPRINT, T_KIND, T_MANIFEST_SHA, Tracker, TrackingError

ARTIFACT = "network"
KIND = "editor-network"


def tree_sha256(directory: Path) -> str:
    """sha256 over every file under ``directory``: its relative path and its own sha256, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        h.update(f.relative_to(directory).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def network_name(registered: str, editor: str) -> str:
    return f"{registered}-{editor}"


def publish_network(
    tracker: Tracker, registered: str, editor: str, fingerprint: str, base_ref: str, run_id: str, directory: Path
) -> str:
    """Register ``directory`` (the network's files) as a new version made by the
    training run ``run_id`` and move ``production`` to it; returns the version."""
    name = network_name(registered, editor)
    tracker.ensure_registered(name, fingerprint, base_ref)
    tags = {T_MANIFEST_SHA: tree_sha256(directory), T_FINGERPRINT: fingerprint, T_EDITOR: editor, T_KIND: KIND}
    version = tracker.register_version(name, run_id, directory, tags, ARTIFACT)
    tracker.set_production(name, version)
    return version


def production_provenance(tracker: Tracker, registered: str, editor: str) -> dict[str, str] | None:
    """What an editor using the production network for this base would record (as ``fetch_network`` returns it
    once the files are verified), read from the registry alone; None when there is none."""
    name = network_name(registered, editor)
    info = tracker.production(name)
    return None if info is None else _provenance(name, info)


def _provenance(name: str, info) -> dict[str, str]:
    """What a version made with this network records: its registered name, version and files' sha256."""
    return {"network": name, "network_version": info.version, "network_sha256": info.tags.get(T_MANIFEST_SHA, "")}


def fetch_network(tracker: Tracker, registered: str, editor: str, fingerprint: str, dst: Path) -> tuple[Path, dict]:
    """The production network for this base and editor, downloaded to ``dst`` and checked against the registry:
    its fingerprint tag and the sha256 of its files. Returns the directory and its provenance."""
    name = network_name(registered, editor)
    info = tracker.production(name)
    if info is None:
        raise TrackingError(
            f"no {editor} network is registered for {registered} ({name!r} has no production version); "
            f"train one with: kedit train {editor} --model MODEL"
        )
    if info.tags.get(T_FINGERPRINT) != fingerprint:
        raise TrackingError(f"{name} v{info.version} was trained for base weights {info.tags.get(T_FINGERPRINT, '?')[:12]}")
    directory = tracker.fetch_version(info, dst)
    actual = tree_sha256(directory)
    if actual != info.tags.get(T_MANIFEST_SHA):
        raise TrackingError(f"{name} v{info.version}: its files' sha256 {actual[:12]} does not match the registry's")
    return directory, _provenance(name, info)  # the tag's sha256, just checked equal to the files'


def trained_assets(tracker: Tracker, editor_cls, registered: str, fingerprint: str) -> dict[str, Any]:
    """The asset an editor class trains for itself (its network), fetched from the registry for this base,
    verified, and loaded by the class; {} for an editor that trains nothing."""
    name = editor_cls.trains
    if not name:
        return {}
    with tempfile.TemporaryDirectory(prefix="kedit-network-") as tmp:
        directory, provenance = fetch_network(tracker, registered, editor_cls.name, fingerprint, Path(tmp))
        return {name: editor_cls.open_asset(name, directory, fingerprint, provenance)}


def copy_network(source: Tracker, target: Tracker, registered: str, editor: str, fingerprint: str, base_ref: str) -> str:
    """Publish the production network of ``source`` (verified as ``fetch_network`` does) into ``target``'s
    registry under the same name, on a run of its own there: a benchmark's scratch store gets the operator's
    network without training again. Returns the version in ``target``."""
    with tempfile.TemporaryDirectory(prefix="kedit-network-") as tmp:
        directory, provenance = fetch_network(source, registered, editor, fingerprint, Path(tmp))
        run = target.start_run(registered, f"copy-{editor}-network", {T_KIND: "network-copy"})
        target.log_params(run, {f"source.{k}": v for k, v in provenance.items()} | {"source.uri": source.uri})
        version = publish_network(target, registered, editor, fingerprint, base_ref, run, directory)
        target.end_run(run)
        return version
