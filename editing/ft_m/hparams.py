from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FTMHyperParams:
    layers: tuple[int, ...]
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = -1.0  # L∞ bound; negative means unconstrained (EasyEdit's FT-M default)
