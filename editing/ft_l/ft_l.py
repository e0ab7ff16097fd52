"""FT-L (Zhu et al., 2020; the ROME paper's baseline): fine-tune one MLP layer with an L∞ constraint.

Objective as in EasyEdit's FT-L: every target token is predicted from the last prompt position;
after each Adam step, every weight is clamped back into [w₀ - ε, w₀ + ε]. The change is stored dense.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editing.base import Editor, register
from editing.finetune import model_device, target_batch, tune
from editing.patches import Dense
from kedit.core.facts import EditRequest

from .hparams import FTLHyperParams


@register
class FTL(Editor):
    name = "ft-l"
    hparams_cls = FTLHyperParams
    method_dir = Path(__file__).parent

    def _edit(self, requests: list[EditRequest]) -> None:
        hp = self.hparams
        ids, mask, pos, rows, _, labels, last = target_batch(self.tok, requests, model_device(self.model))

        def loss():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            logp = torch.log_softmax(logits[rows, last[rows]].float(), -1)  # (N, V) all from the last prompt token
            nll = -logp.gather(-1, labels[:, None]).squeeze(-1)
            return nll.sum() / len(requests)

        names = [self.weight_name("mlp_out", layer) for layer in hp.layers]
        for name, diff in tune(self.model, names, loss, hp.steps, hp.lr, hp.norm_constraint).items():
            self._apply(name, Dense(diff))
