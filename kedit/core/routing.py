"""Installed memories: modules that answer some inputs from their own store instead of the weights.

Memory editors (GRACE's codebook, a side memory behind a router) install such a module in the model. This
protocol lets a measurement ask, without knowing the method, how full the memories are and which inputs they
answer: what the issue calls the router's hit rate, which on unrelated prompts should stay near 0.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Router(Protocol):
    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d_in) inputs of the module -> (N,) bool: answered from the memory."""
        ...

    def n_entries(self) -> int:
        """How many entries (keys, edits) the memory holds."""
        ...


def routers(model: torch.nn.Module) -> dict[str, Router]:
    """Every installed memory of the model by module path (nested ones included: each answers for itself)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Router)}
