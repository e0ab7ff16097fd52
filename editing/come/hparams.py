from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoMEHyperParams:
    layers: tuple[int, ...]
    alpha: float = 0.1  # how much of the outdated fact's own direction is removed
    top_p: float = 0.2  # fraction of coordinates (most affected) the removal applies to
    mom2_weight: float = 15000.0
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm: float = 4.0
    stop_loss: float = 0.05
    n_templates: int = 5
    template_length: int = 10
    mom2_samples: int = 2000
    mom2_length: int = 128
