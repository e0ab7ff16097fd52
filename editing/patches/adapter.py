"""LinearAdapter: a low-rank additive adapter around a Linear, y = W x + scale · B (A x).

It may wrap another LinearAdapter (a later edit's adapter over an earlier one's): the outputs add up.

Generic on purpose: any editor (or test) that wants a trainable side path at a projection installs one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .modules import Installable, register_module_type


@register_module_type
class LinearAdapter(Installable):
    """A (rank, d_in), B (d_out, rank), in the original's dtype and device. Both start at zero, so the
    installed adapter is the identity; a caller that trains it initializes A (B = 0 keeps it the identity)."""

    type_name: ClassVar[str] = "linear-adapter"

    def __init__(self, original: nn.Module, rank: int, scale: float = 1.0):
        super().__init__()
        w = _linear_weight(original)  # (d_out, d_in)
        self.original = original
        self.rank = int(rank)
        self.scale = float(scale)
        self.A = nn.Parameter(torch.zeros(self.rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.B = nn.Parameter(torch.zeros(w.shape[0], self.rank, dtype=w.dtype, device=w.device))

    @classmethod
    def from_config(cls, config: dict[str, Any], original: nn.Module) -> LinearAdapter:
        return cls(original, config["rank"], config["scale"])

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "scale": self.scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., d_in) -> A x (..., rank) -> B A x (..., d_out)
        return self.original(x) + self.scale * F.linear(F.linear(x, self.A), self.B)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of the Linear an adapter wraps, through earlier adapters (they stack additively)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, LinearAdapter):
        return _linear_weight(module.original)
    raise TypeError(f"LinearAdapter wraps an nn.Linear (or another LinearAdapter), not {type(module).__name__}")
