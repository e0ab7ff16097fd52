"""WeightDelta: a patch that adds to existing parameters, as low-rank factors or a dense tensor.

On disk (format ``kedit-weight-delta/1``, the format versions written before patch sets still hold): ``delta.safetensors``
(fp32 factors) and ``delta.json`` with their sha256. Manifests written now also carry a hash of
their own content; older ones without it still load (the version manifest vouches for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Patch, Undo, load_tensors, register_patch_kind, save_tensors, write_parameters

FORMAT = "kedit-weight-delta/1"
TENSORS = "delta.safetensors"
MANIFEST = "delta.json"


@dataclass(frozen=True)
class LowRank:
    """``u @ v`` in the parameter's own layout: u (rows, r), v (r, cols)."""

    u: torch.Tensor
    v: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.u.float() @ self.v.float()

    @property
    def rank(self) -> int:
        return self.u.shape[1]


@dataclass(frozen=True)
class Dense:
    d: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.d.float()


def _add_fp32(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """p + d in fp32: in place for an fp32 parameter (the same bits as p + d copied in, one pass less)."""
    return p.add_(d) if p.dtype == torch.float32 and d.dtype == torch.float32 else p.float() + d


@register_patch_kind
@dataclass
class WeightDelta(Patch):
    """Per parameter name, an update added in fp32 and stored in the parameter's dtype."""

    kind: ClassVar[str] = "weight-delta"
    files: ClassVar[tuple[str, ...]] = (TENSORS, MANIFEST)

    parts: dict[str, LowRank | Dense] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, update: LowRank | Dense) -> None:
        """Accumulate: a second update of the same parameter is summed (stored dense if ranks differ in kind)."""
        if name not in self.parts:
            self.parts[name] = update
            return
        old = self.parts[name]
        if isinstance(old, LowRank) and isinstance(update, LowRank):
            self.parts[name] = LowRank(torch.cat([old.u, update.u], 1), torch.cat([old.v, update.v], 0))
        else:
            self.parts[name] = Dense(old.dense() + update.dense())

    def apply(self, model: nn.Module) -> Undo:
        """Add every update to its parameter (fp32 arithmetic, stored in the parameter's dtype); all or nothing."""
        dense = ((name, upd.dense()) for name, upd in self.parts.items())  # one dense update in memory at a time
        return write_parameters(model, dense, "delta", _add_fp32)

    def is_empty(self) -> bool:
        return not self.parts

    def describe(self) -> dict[str, Any]:
        params, size = {}, 0
        for name, u in self.parts.items():
            lowrank = isinstance(u, LowRank)
            # u (rows, r) @ v (r, cols) covers a (rows, cols) parameter
            shape = [u.u.shape[0], u.v.shape[1]] if lowrank else list(u.d.shape)
            params[name] = {"form": "lowrank" if lowrank else "dense", "rank": u.rank if lowrank else None, "shape": shape}
            size += 4 * (u.u.numel() + u.v.numel() if lowrank else u.d.numel())  # stored as fp32
        return {"kind": self.kind, "parameters": params, "bytes": size}

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, upd in self.parts.items():
            if isinstance(upd, LowRank):
                out[f"{name}::u"] = upd.u.detach().float().cpu().contiguous()
                out[f"{name}::v"] = upd.v.detach().float().cpu().contiguous()
            else:
                out[f"{name}::dense"] = upd.d.detach().float().cpu().contiguous()
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``delta.safetensors`` and ``delta.json`` (with the tensors' sha256)."""
        parts = {
            name: {"kind": "lowrank" if isinstance(u, LowRank) else "dense", "rank": getattr(u, "rank", None)}
            for name, u in self.parts.items()
        }
        save_tensors(Path(directory), TENSORS, MANIFEST, {"format": FORMAT, "parts": parts, "meta": self.meta}, self._tensors())
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> WeightDelta:
        """Load a saved delta after checking its hash; refuses anything that does not match."""
        manifest, tensors = load_tensors(Path(directory), TENSORS, MANIFEST, FORMAT, require_self_sha=False)
        parts: dict[str, LowRank | Dense] = {}
        for name, info in manifest["parts"].items():
            if info["kind"] == "lowrank":
                parts[name] = LowRank(tensors[f"{name}::u"], tensors[f"{name}::v"])
            else:
                parts[name] = Dense(tensors[f"{name}::dense"])
        return cls(parts, manifest.get("meta", {}))
