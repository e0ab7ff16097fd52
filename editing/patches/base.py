"""What an edit leaves behind: the ``Patch`` protocol, the ``Undo`` that reverts it, and the registry of patch kinds.

Invariants every kind keeps:
- ``apply(model)`` is the only way the patch reaches a model, so applying the same patches in the
  same order to the same base (device, dtype) reproduces the edited model bit for bit;
- ``apply`` returns an ``Undo``; ``Undo.restore`` puts back the tensors as they were (copies, not
  subtraction: float addition does not invert) and the module objects that were replaced;
- ``save(dir)`` writes the kind's own files (names distinct across kinds, so the parts of one edit
  share a directory) with a manifest holding the tensors' sha256; ``load(dir)`` checks every hash
  before it builds anything;
- ``describe()`` is a small JSON-able summary for the version manifest.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kedit.core import registry
from kedit.core.errors import KeditError
from kedit.core.paths import sha256_file

SELF_SHA = "manifest_sha256"


class PatchIntegrityError(KeditError):
    """A stored patch is missing, tampered with, or does not fit the model."""


# ---------------------------------------------------------------------- undo


@dataclass
class TensorSnapshot:
    """Parameters as they were before a change (their own dtype and device)."""

    saved: dict[str, torch.Tensor]

    def restore(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, old in self.saved.items():
                model.get_parameter(name).copy_(old)


@dataclass
class ModuleSwap:
    """The module object that sat at ``path`` before another was installed there."""

    path: str
    previous: nn.Module

    def restore(self, model: nn.Module) -> None:
        model.set_submodule(self.path, self.previous)


@dataclass
class Undo:
    """Steps that revert applied patches, restored last first (an install then a weight change
    inside it are undone in the opposite order, so every name resolves when its step runs)."""

    steps: list[TensorSnapshot | ModuleSwap] = field(default_factory=list)

    @classmethod
    def of_tensors(cls, saved: dict[str, torch.Tensor]) -> Undo:
        return cls([TensorSnapshot(saved)] if saved else [])

    def extend(self, other: Undo) -> Undo:
        self.steps.extend(other.steps)
        return self

    def restore(self, model: nn.Module) -> None:
        for step in reversed(self.steps):
            step.restore(model)

    @classmethod
    @contextmanager
    def all_or_nothing(cls, model: nn.Module) -> Iterator[Undo]:
        """Collect the steps of several changes; if one of them raises, the ones made are undone first."""
        undo = cls()
        try:
            yield undo
        except BaseException:
            undo.restore(model)
            raise

    def first_snapshot(self, name: str) -> torch.Tensor | None:
        """The parameter as it was before the earliest step that touched it."""
        for step in self.steps:
            if isinstance(step, TensorSnapshot) and name in step.saved:
                return step.saved[name]
        return None


# ---------------------------------------------------------------------- the protocol


class Patch(ABC):
    """One kind of change an edit leaves behind. ``kind`` names it on disk; ``files`` are what ``save`` writes."""

    kind: ClassVar[str]
    files: ClassVar[tuple[str, ...]]
    meta: dict[str, Any]

    @abstractmethod
    def apply(self, model: nn.Module) -> Undo: ...

    @abstractmethod
    def save(self, directory: str | Path) -> Path: ...

    @classmethod
    @abstractmethod
    def load(cls, directory: str | Path) -> Patch: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...

    @abstractmethod
    def is_empty(self) -> bool: ...


PATCH_KINDS: dict[str, type[Patch]] = {}


def register_patch_kind(cls: type[Patch]) -> type[Patch]:
    return registry.add(PATCH_KINDS, cls.kind, cls, "patch kind")


def patch_kind(kind: str) -> type[Patch]:
    return registry.lookup(PATCH_KINDS, kind, "patch kind", PatchIntegrityError)


# ---------------------------------------------------------------------- manifests


def _digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != SELF_SHA}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """JSON with a hash of its own content, so a changed byte is noticed even where no outer manifest vouches for it."""
    path.write_text(json.dumps({**manifest, SELF_SHA: _digest(manifest)}, indent=2, sort_keys=True))


def read_manifest(path: Path, fmt: str, require_self_sha: bool = True) -> dict[str, Any]:
    """Parse and check a manifest written by ``write_manifest`` (older ones without a self hash pass if allowed)."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PatchIntegrityError(f"{path.parent}: no {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PatchIntegrityError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise PatchIntegrityError(f"{path}: unknown format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
    if SELF_SHA in manifest or require_self_sha:
        if manifest.get(SELF_SHA) != _digest(manifest):
            raise PatchIntegrityError(f"{path}: its content does not match its own sha256 (changed after it was written)")
    return manifest


def save_tensors(directory: Path, tensors_name: str, manifest_name: str, manifest: dict[str, Any], tensors) -> None:
    """A kind's two files: the tensors (safetensors) and its manifest, which records their sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / tensors_name))
    write_manifest(directory / manifest_name, {**manifest, "sha256": sha256_file(directory / tensors_name)})


def load_tensors(
    directory: Path, tensors_name: str, manifest_name: str, fmt: str, require_self_sha: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the tensors ``save_tensors`` wrote, both checked before the tensors are read."""
    manifest = read_manifest(directory / manifest_name, fmt, require_self_sha)
    check_file(directory / tensors_name, manifest.get("sha256"))
    return manifest, load_file(str(directory / tensors_name))


def check_file(path: Path, want: str | None) -> None:
    if not path.is_file():
        raise PatchIntegrityError(f"{path.parent}: no {path.name} (the file is missing)")
    actual = sha256_file(path)
    if actual != want:
        raise PatchIntegrityError(f"{path}: sha256 {actual} does not match the manifest's {want}")


def write_parameters(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    what: str,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda p, t: t,
) -> Undo:
    """Overwrite each named parameter with ``combine(parameter, tensor)`` (stored in the parameter's dtype; a
    combine that returns the parameter itself has written it in place),
    snapshotting it first; all or nothing: a tensor whose shape is not its parameter's, or any failure,
    restores what was written and raises. ``what`` names the tensors in errors ("delta", "values")."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, tensor in tensors:
                p = parameter(model, name)
                if tensor.shape != p.shape:
                    raise PatchIntegrityError(
                        f"{what} for {name} has shape {tuple(tensor.shape)}, the parameter has {tuple(p.shape)}"
                    )
                saved[name] = p.detach().clone()
                value = combine(p, tensor.to(p.device))
                if value is not p:  # a combine may work in place (an fp32 delta added to an fp32 parameter)
                    p.copy_(value.to(p.dtype))
    except BaseException:
        Undo.of_tensors(saved).restore(model)
        raise
    return Undo.of_tensors(saved)


def parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The model's parameter ``name``; a patch naming one the model lacks is an integrity error, not an AttributeError."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise PatchIntegrityError(f"the model has no parameter {name!r}") from None
