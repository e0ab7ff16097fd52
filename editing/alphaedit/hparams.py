from __future__ import annotations

from editing.hparams import LocateEditHyperParams, NegativeHyperParams
from kedit.core.config import Seq, StrictConfig


class NullSpaceSolve(StrictConfig):
    l2: float = 10.0  # ridge term of the projected solve
    nullspace_threshold: float = 0.02  # eigenvalues of E[k kᵀ] below this span the null space


class AlphaEditHyperParams(LocateEditHyperParams):
    layers: Seq[int]
    solve: NullSpaceSolve = NullSpaceSolve()
    negatives: NegativeHyperParams = NegativeHyperParams()
