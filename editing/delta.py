"""WeightDelta: what an edit changed, per parameter, as low-rank factors or a dense tensor.

Invariants:
- an edit reaches the model only through ``WeightDelta.apply``, so applying the same deltas
  in the same order to the same base (device, dtype) reproduces the edited weights bit for bit;
- ``apply`` returns an ``Undo`` holding the touched tensors as they were, and ``Undo.restore``
  puts them back bit for bit (subtracting the update would not: float addition does not invert);
- a saved delta is a safetensors file plus a manifest with its sha256, checked before loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kedit.core.errors import KeditError
from kedit.core.paths import sha256_file

FORMAT = "kedit-weight-delta/1"
TENSORS = "delta.safetensors"
MANIFEST = "delta.json"


class DeltaIntegrityError(KeditError):
    """A stored delta is missing, tampered with, or does not fit the model."""


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


@dataclass
class Undo:
    """The touched parameters as they were before a delta was applied."""

    saved: dict[str, torch.Tensor]

    def restore(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, old in self.saved.items():
                model.get_parameter(name).copy_(old)


@dataclass
class WeightDelta:
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
        """Add every update to its parameter (fp32 arithmetic, stored in the parameter's dtype)."""
        saved = {}
        with torch.no_grad():
            for name, upd in self.parts.items():
                p = _param(model, name)
                d = upd.dense().to(p.device)
                if d.shape != p.shape:
                    raise DeltaIntegrityError(f"delta for {name} has shape {tuple(d.shape)}, parameter has {tuple(p.shape)}")
                saved[name] = p.detach().clone()
                p.copy_((p.float() + d).to(p.dtype))
        return Undo(saved)

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
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors(), str(d / TENSORS))
        manifest = {
            "format": FORMAT,
            "sha256": sha256_file(d / TENSORS),
            "parts": {
                name: {"kind": "lowrank" if isinstance(u, LowRank) else "dense", "rank": getattr(u, "rank", None)}
                for name, u in self.parts.items()
            },
            "meta": self.meta,
        }
        (d / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> WeightDelta:
        """Load a saved delta after checking its hash; refuses anything that does not match."""
        d = Path(directory)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except FileNotFoundError:
            raise DeltaIntegrityError(f"{d}: no {MANIFEST}") from None
        except json.JSONDecodeError as e:
            raise DeltaIntegrityError(f"{d / MANIFEST}: not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise DeltaIntegrityError(f"{d / MANIFEST}: unknown format {manifest.get('format')!r}")
        if not (d / TENSORS).is_file():
            raise DeltaIntegrityError(f"{d}: no {TENSORS}")
        actual = sha256_file(d / TENSORS)
        if actual != manifest.get("sha256"):
            raise DeltaIntegrityError(f"{d / TENSORS}: sha256 {actual} does not match the manifest's {manifest.get('sha256')}")
        tensors = load_file(str(d / TENSORS))
        parts: dict[str, LowRank | Dense] = {}
        for name, info in manifest["parts"].items():
            if info["kind"] == "lowrank":
                parts[name] = LowRank(tensors[f"{name}::u"], tensors[f"{name}::v"])
            else:
                parts[name] = Dense(tensors[f"{name}::dense"])
        return cls(parts, manifest.get("meta", {}))


def _param(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise DeltaIntegrityError(f"the model has no parameter {name!r}") from None
