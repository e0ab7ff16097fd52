from __future__ import annotations

from editing.hparams import TargetHyperParams
from kedit.core.config import StrictConfig


class CodebookHyperParams(StrictConfig):
    radius: float = 1.0  # initial deferral radius ε₀, Euclidean, in the key space (the layer's input)
    capacity: int = 64  # entries of the first codebook; a full one is wrapped by one twice as large


class GRACEHyperParams(StrictConfig):
    layer: int  # block whose MLP output projection the codebook wraps
    codebook: CodebookHyperParams = CodebookHyperParams()
    # the value: the layer's output at the prompt's last token plus a vector trained so the model emits
    # target_new; GRACE trains it alone (no KL, no decay, no norm bound), about 100 steps at lr 1.0
    value: TargetHyperParams = TargetHyperParams(
        steps=100, lr=1.0, weight_decay=0.0, kl_factor=0.0, clamp_norm=1e6, stop_loss=0.05
    )
