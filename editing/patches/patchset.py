"""PatchSet: the patches of one edit, in the order they apply (weights of existing parameters, then installs).

The parts share one directory (each kind writes its own file names), so a set holds at most one part
per kind; an editor accumulates into its pending part of each kind. ``save`` returns the index that a
version manifest stores (kind, files with their sha256, describe()); ``load`` checks every listed
file's sha256 before any part is loaded, then loads each part by its registered kind.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from kedit.core.paths import sha256_file

from .base import Patch, PatchIntegrityError, Undo, check_file, patch_kind
from .modules import ModulePatch
from .weights import WeightDelta

P = TypeVar("P", bound=Patch)


@dataclass
class PatchSet:
    parts: list[Patch] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds = [p.kind for p in self.parts]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"a patch set holds one part per kind, got {kinds}")

    def __iter__(self) -> Iterator[Patch]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def get(self, cls: type[P]) -> P | None:
        return next((p for p in self.parts if isinstance(p, cls)), None)

    @property
    def weights(self) -> WeightDelta:
        """The weight delta part, or an empty one."""
        return self.get(WeightDelta) or WeightDelta(meta=self.meta)

    @property
    def modules(self) -> ModulePatch:
        """The module part, or an empty one."""
        return self.get(ModulePatch) or ModulePatch(meta=self.meta)

    def apply(self, model: nn.Module) -> Undo:
        """Apply every part in order; if one fails, the parts already applied are undone."""
        with Undo.all_or_nothing(model) as undo:
            for p in self.parts:
                undo.extend(p.apply(model))
        return undo

    def describe(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.parts]

    def save(self, directory: str | Path) -> list[dict[str, Any]]:
        """Write every part into ``directory``; returns the index: per part, its kind, files and their sha256, describe()."""
        d = Path(directory)
        index = []
        for p in self.parts:
            p.save(d)
            index.append({"kind": p.kind, "files": {f: sha256_file(d / f) for f in p.files}, "describe": p.describe()})
        return index

    @classmethod
    def load(cls, directory: str | Path, index: list[dict[str, Any]]) -> PatchSet:
        """Verify every file the index lists, then load the parts by kind (each checks its own manifest too)."""
        d = Path(directory)
        kinds = []
        for entry in index:
            kind = patch_kind(entry.get("kind", ""))
            if set(entry.get("files", {})) != set(kind.files):
                raise PatchIntegrityError(f"{d}: a {kind.kind} part lists files {sorted(entry.get('files', {}))}")
            for name, want in entry["files"].items():
                check_file(d / name, want)
            kinds.append(kind)
        parts = [k.load(d) for k in kinds]
        return cls(parts, dict(parts[0].meta) if parts else {})
