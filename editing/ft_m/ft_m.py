"""FT-M (EasyEdit): fine-tune MLP layers with cross-entropy on the target tokens only.

The prompt is masked out of the loss; each target token is predicted from its true prefix
(teacher forcing). The change is stored dense.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editing.base import Editor, register
from editing.finetune import model_device, target_batch, tune
from editing.patches import Dense
from kedit.core.facts import EditRequest

from .hparams import FTMHyperParams


@register
class FTM(Editor):
    name = "ft-m"
    hparams_cls = FTMHyperParams
    method_dir = Path(__file__).parent

    def _edit(self, requests: list[EditRequest]) -> None:
        hp = self.hparams
        ids, mask, pos, rows, cols, labels, _ = target_batch(self.tok, requests, model_device(self.model))

        def loss():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            logp = torch.log_softmax(logits[rows, cols].float(), -1)  # (N, V) target positions only
            return -logp.gather(-1, labels[:, None]).mean()

        names = [self.weight_name("mlp_out", layer) for layer in hp.layers]
        linf = hp.norm_constraint if hp.norm_constraint > 0 else None
        for name, diff in tune(self.model, names, loss, hp.steps, hp.lr, linf).items():
            self._apply(name, Dense(diff))
