"""WeightValues: a patch that sets parameters to stored values (what a squashed chain prefix leaves behind).

A chain of WeightDeltas adds its updates one version at a time, each rounded into the parameter's dtype;
summing the deltas first would round differently, so a prefix of the chain replaced by one version stores
the values the chain produced, not their sum. Applying them is a copy, bit for bit where the dtypes match.

On disk (format ``kedit-weight-values/1``): ``values.safetensors`` (each parameter in its own dtype) and
``values.json`` (names, shapes, dtypes, the tensors' sha256, a hash of the manifest's own content).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Patch, PatchIntegrityError, Undo, load_tensors, register_patch_kind, save_tensors, write_parameters

FORMAT = "kedit-weight-values/1"
TENSORS = "values.safetensors"
MANIFEST = "values.json"


@register_patch_kind
@dataclass
class WeightValues(Patch):
    """Per parameter name, the value it takes (replaced, not added to)."""

    kind: ClassVar[str] = "weight-values"
    files: ClassVar[tuple[str, ...]] = (TENSORS, MANIFEST)

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def apply(self, model: nn.Module) -> Undo:
        """Copy every value into its parameter (cast to the parameter's dtype); all or nothing."""
        return write_parameters(model, self.values.items(), "values")

    def is_empty(self) -> bool:
        return not self.values

    def describe(self) -> dict[str, Any]:
        params = {n: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for n, v in self.values.items()}
        return {"kind": self.kind, "parameters": params, "bytes": sum(v.numel() * v.element_size() for v in self.values.values())}

    def save(self, directory: str | Path) -> Path:
        tensors = {n: v.detach().cpu().contiguous() for n, v in self.values.items()}
        save_tensors(Path(directory), TENSORS, MANIFEST, {"format": FORMAT, "names": sorted(tensors), "meta": self.meta}, tensors)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> WeightValues:
        """Checks the manifest's own hash and the tensors' sha256 before anything is built."""
        manifest, tensors = load_tensors(Path(directory), TENSORS, MANIFEST, FORMAT)
        if sorted(tensors) != manifest["names"]:
            raise PatchIntegrityError(f"{Path(directory) / TENSORS}: holds {sorted(tensors)[:3]}…, the manifest lists others")
        return cls(tensors, manifest.get("meta", {}))
