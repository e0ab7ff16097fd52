from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ROMEHyperParams:
    layer: int  # the block whose MLP output projection is edited
    steps: int = 20  # target-vector optimization
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm: float = 4.0
    stop_loss: float = 0.05
    n_templates: int = 5  # context prefixes besides "{}"
    template_length: int = 10
    mom2_samples: int = 2000  # windows of mom2_length tokens for E[k kᵀ]
    mom2_length: int = 128
