from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FTLHyperParams:
    layers: tuple[int, ...]  # blocks whose MLP output projection is tuned
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4  # L∞ bound on each weight's change
