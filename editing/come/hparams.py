from __future__ import annotations

from typing import Literal

from editing.hparams import MultiLayerHyperParams
from kedit.core.config import StrictConfig


class Unlearning(StrictConfig):
    alpha: float = 0.1  # how much of the outdated fact's own direction is removed
    top_p: float = 0.2  # fraction of coordinates (most affected) the removal applies to
    # δ′ of a re-edit: "optimized", the paper's (the target optimization run for the old value, which the model
    # already states after its edit, so δ′ comes out small); "installed", what this editor's earlier edits of the
    # fact added at the subject (their targets' sum, kept as editor state). A first edit's δ′ is always optimized.
    outdated: Literal["optimized", "installed"] = "optimized"


class CoMEHyperParams(MultiLayerHyperParams):
    unlearning: Unlearning = Unlearning()
