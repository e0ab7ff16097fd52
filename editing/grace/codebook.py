"""GRACE's codebook: an installable module around one layer's MLP output projection.

Each entry is a key (the projection's input at an edited prompt's last token), a value (the output the
model should have there) and a deferral radius. For every token position, the input is compared with
the keys; where the nearest key lies within its radius, that key's value replaces the projection's
output, and everywhere else the output is the wrapped module's, bit for bit. Empty rows have radius -1.

The capacity is fixed per module, so that later edits change rows (a weight delta of a few rows) rather
than reallocating; a full codebook is wrapped by a new, larger one, and where both hold a matching key
the outer (newer) one wins.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from editing.patches import Installable
from editing.patches.modules import register_module_type

EMPTY = -1.0  # the radius of an unused row: no distance is below it


@register_module_type
class Codebook(Installable):
    type_name: ClassVar[str] = "grace-codebook"

    def __init__(self, original: nn.Module, capacity: int, d_in: int, d_out: int):
        super().__init__()
        w = next(original.parameters())
        self.original = original
        self.capacity, self.d_in, self.d_out = int(capacity), int(d_in), int(d_out)

        def frozen(*shape: int, fill: float = 0.0) -> nn.Parameter:
            # parameters, not buffers: later edits change rows through weight deltas like any weight's
            return nn.Parameter(torch.full(shape, fill, dtype=w.dtype, device=w.device), requires_grad=False)

        self.keys = frozen(self.capacity, self.d_in)  # (C, d_in)
        self.values = frozen(self.capacity, self.d_out)  # (C, d_out)
        self.radii = frozen(self.capacity, fill=EMPTY)  # (C,)

    @classmethod
    def from_config(cls, config: dict[str, Any], original: nn.Module) -> Codebook:
        return cls(original, config["capacity"], config["d_in"], config["d_out"])

    def config(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "d_in": self.d_in, "d_out": self.d_out}

    def n_entries(self) -> int:  # kedit.core.routing.Router
        return int((self.radii >= 0).sum())

    def routed(self, x: torch.Tensor) -> torch.Tensor:  # kedit.core.routing.Router
        """(..., d_in) -> (...) bool: the tokens this codebook answers (none while it is empty)."""
        return self.lookup(x.reshape(-1, x.shape[-1]))[1].view(x.shape[:-1])

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of x (N, d_in): the nearest used key's index and whether x lies within its radius."""
        return nearest_within(x, self.keys, self.radii)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(x)  # (..., d_out)
        if not bool((self.radii >= 0).any()):
            return out
        idx, hit = self.lookup(x.reshape(-1, x.shape[-1]))  # (N,) over every position
        if not bool(hit.any()):
            return out
        flat = out.reshape(-1, out.shape[-1])
        return torch.where(hit[:, None], self.values[idx].to(out.dtype), flat).view_as(out)


def nearest_within(x: torch.Tensor, keys: torch.Tensor, radii: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (N, d_in): the nearest key's index among keys (C, d_in) with a radius >= 0, and whether x
    lies within that key's radius: where the nearer of two overlapping scopes answers."""
    dist = torch.cdist(x.float(), keys.float())  # (N, C)
    dist = dist.masked_fill(radii < 0, float("inf"))
    nearest, idx = dist.min(-1)  # (N,)
    return idx, nearest <= radii.float()[idx]


def codebooks(module: nn.Module) -> tuple[list[Codebook], nn.Module]:
    """The codebooks stacked at a path, innermost first (each full one wrapped by the next), and the layer
    they wrap."""
    out: list[Codebook] = []
    while isinstance(module, Codebook):
        out.append(module)
        module = module.original
    return out[::-1], module
