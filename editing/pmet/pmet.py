"""PMET (Li et al., 2024): attention and FFN targets optimized together, only the FFN updated.

1. target: δ for the attention output and δ for the MLP output of the last edited layer,
   optimized jointly (the attention part absorbs what the FFN should not carry);
2. keys per layer as in MEMIT; the residual is measured at the MLP output of the last layer and
   spread with a square root: layer i takes 1/√(layers left) of it;
3. solve and apply as MEMIT, on the MLP output projections only.

Shared through an exchange (FLEKE), the FFN target travels as the top block's output it makes (``to_shared``), so
a client whose earlier edits moved the residual stream below reaches the same state, not the same MLP output.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from editing.base import register
from editing.keys import mlp_output_to_residual, residual_to_mlp_output
from editing.memit.memit import MEMITFamily
from editing.targets import Targets, optimize_targets
from kedit.core.facts import EditRequest

from .hparams import PMETHyperParams


class PMETFamily(MEMITFamily):
    def target_path(self) -> str:
        return self.spec.module_path("mlp_out", self.hparams.layers[-1])

    def spread(self, i: int) -> float:
        return 1.0 / math.sqrt(len(self.hparams.layers) - i)

    def at_layer(self, layer, requests, resid):
        """PMET measures its residual as a change of the top MLP's output: through the top layer's post-MLP norm
        into the residual stream, then back as the change of this layer's MLP output that makes it (both the
        identity where no norm sits between, Llama and GPT-2)."""
        top = self.hparams.layers[-1]
        dy = mlp_output_to_residual(self.model, self.tok, self.spec, top, requests, resid)
        return residual_to_mlp_output(self.model, self.tok, self.spec, layer, requests, dy)

    def to_shared(self, requests, delta):
        """The top MLP's δ as the change of the top block's output: the FFN part PMET updates, without the
        attention part it optimized beside it (which no weight carries), through the post-MLP norm where there is one."""
        return mlp_output_to_residual(self.model, self.tok, self.spec, self.hparams.layers[-1], requests, delta)

    def from_shared(self, requests, change):
        return residual_to_mlp_output(self.model, self.tok, self.spec, self.hparams.layers[-1], requests, change)

    def optimize(self, requests: list[EditRequest], start: dict[str, torch.Tensor] | None = None) -> Targets:
        top = self.hparams.layers[-1]
        paths = [self.spec.module_path("attn_out", top), self.target_path()]
        cfg = self.target_config()
        return optimize_targets(self.model, self.tok, self.spec, requests, self.templates(), paths, top, cfg, start=start)


@register
class PMET(PMETFamily):
    name = "pmet"
    hparams_cls = PMETHyperParams
    method_dir = Path(__file__).parent
