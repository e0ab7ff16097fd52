"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection.

1. key k*: the MLP output projection's input at the subject's last token (mean over contexts);
2. value: the δ that, added to that projection's output, makes the model say target_new;
3. solve: ΔW = δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*), so W'k* = Wk* + δ while keys uncorrelated with k*
   under C = E[k kᵀ] are disturbed least;
4. apply. Several requests: their δ are optimized jointly, then applied one rank-one update at
   a time, each key re-read after the previous update.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editing.base import Editor, linear_update, register
from editing.keys import context_templates, subject_keys
from editing.stats import Corpus, corpus_from_model, second_moments
from editing.targets import optimize_targets
from kedit.core.facts import EditRequest

from .hparams import ROMEHyperParams


@register
class ROME(Editor):
    name = "rome"
    hparams_cls = ROMEHyperParams
    method_dir = Path(__file__).parent
    assets = ("corpus",)  # text for key statistics; None: sampled from the model

    def __init__(self, model, tokenizer, hparams: ROMEHyperParams | None = None, corpus: Corpus | None = None):
        super().__init__(model, tokenizer, hparams)
        self.corpus = corpus
        self._templates: tuple[str, ...] | None = None
        self._inv_cov: torch.Tensor | None = None

    def templates(self) -> tuple[str, ...]:
        if self._templates is None:
            hp = self.hparams
            self._templates = context_templates(self.model, self.tok, hp.templates.count, hp.templates.length)
        return self._templates

    def inverse_covariance(self) -> torch.Tensor:
        """C⁻¹ at the edited layer, from the (cached) key statistics of the unedited model."""
        if self._inv_cov is None:
            hp = self.hparams
            corpus = self.corpus or corpus_from_model(self.model, self.tok)
            stats = hp.statistics
            cov = second_moments(self.model, self.tok, self.spec, [hp.layer], corpus, stats.samples, stats.length)[hp.layer]
            self._inv_cov = torch.linalg.pinv(cov.double()).float()  # (d_in, d_in)
        return self._inv_cov

    def prepare(self) -> None:
        self.inverse_covariance()

    def _edit(self, requests: list[EditRequest]) -> None:
        hp = self.hparams
        inv_cov = self.inverse_covariance()
        path = self.spec.module_path("mlp_out", hp.layer)
        # value: δ per request at the projection's output, all requests at once
        deltas = optimize_targets(
            self.model, self.tok, self.spec, requests, self.templates(), [path], hp.layer, hp.targets
        ).deltas[path]
        module = self.module("mlp_out", hp.layer)
        for i, request in enumerate(requests):
            # key, re-read after the previous requests' updates
            k = subject_keys(self.model, self.tok, self.spec, [hp.layer], [request], self.templates())[hp.layer][0]  # (d_in,)
            ck = inv_cov.to(k.device) @ k  # (d_in,)
            # solve: rank one, W'k = Wk + δ
            update = linear_update(module, deltas[i][:, None], (ck / (k @ ck))[None, :])
            self._apply(self.weight_name("mlp_out", hp.layer), update)
