from __future__ import annotations

from editing.hparams import MultiLayerHyperParams
from kedit.core.config import StrictConfig


class Unlearning(StrictConfig):
    alpha: float = 0.1  # how much of the outdated fact's own direction is removed
    top_p: float = 0.2  # fraction of coordinates (most affected) the removal applies to


class CoMEHyperParams(MultiLayerHyperParams):
    unlearning: Unlearning = Unlearning()
