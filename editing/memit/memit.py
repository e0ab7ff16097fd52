"""MEMIT (Meng et al., 2023): a batch of facts spread over a range of MLP layers.

1. target: z = h + δ at the last layer of the range, δ optimized jointly for the batch;
2. for each layer l, bottom to top:
   keys K (n, d_in) at l with the current weights, residual R = (z - h_now) / (layers left), as the change of
   l's MLP output that makes it (the same, unless a norm follows the MLP: Gemma 2/3);
3. solve: ΔW = Rᵀ K (λC + KᵀK)⁻¹, kept as factors Rᵀ (d_out, n) and K (λC + KᵀK)⁻¹ (n, d_in),
   so the update has rank <= n;
4. apply it, then go up one layer.

Given a ``TargetExchange`` (``exchange``, FLEKE's federation), step 1 first looks each fact up by its key
and optimizes only the facts not found; the vectors it optimized are offered back (editing/exchange.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from editing.base import Editor, linear_update, register
from editing.exchange import TargetExchange, fact_keys, whitener
from editing.hparams import TargetHyperParams
from editing.keys import (
    context_templates,
    other_subjects,
    post_norm_gain,
    read_at_subject,
    read_every_position,
    residual_to_mlp_output,
    subject_keys,
)
from editing.stats import Corpus, corpus_from_model, second_moments
from editing.targets import Targets, optimize_targets
from kedit.core.facts import EditRequest

from .hparams import MEMITHyperParams


class MEMITFamily(Editor):
    """MEMIT's loop; subclasses change how the target is found or how a layer's update is solved."""

    assets = ("corpus",)  # text for key statistics; None: sampled from the model
    shares_targets = True  # z depends on the fact and the base only: another client's z is this one's

    def __init__(self, model, tokenizer, hparams=None, corpus: Corpus | None = None):
        super().__init__(model, tokenizer, hparams)
        self.corpus = corpus
        self._templates: tuple[str, ...] | None = None
        self._cov: dict[int, torch.Tensor] | None = None
        self._white: torch.Tensor | None = None
        self.exchange: TargetExchange | None = None  # set by a federation: targets looked up before optimizing

    def templates(self) -> tuple[str, ...]:
        if self._templates is None:
            hp = self.hparams
            self._templates = context_templates(self.model, self.tok, hp.templates.count, hp.templates.length)
        return self._templates

    def covariances(self) -> dict[int, torch.Tensor]:
        """E[k kᵀ] per edited layer, from the unedited model, one pass for all layers."""
        if self._cov is None:
            hp = self.hparams
            corpus = self.corpus or corpus_from_model(self.model, self.tok)
            stats = hp.statistics
            self._cov = second_moments(self.model, self.tok, self.spec, hp.layers, corpus, stats.samples, stats.length)
        return self._cov

    def prepare(self) -> None:
        self.covariances()

    def target_config(self) -> TargetHyperParams:
        return self.hparams.targets

    def target_path(self) -> str:
        """Where the target z is set and measured: the last edited block's output."""
        return self.spec.block(self.hparams.layers[-1])

    def spread(self, i: int) -> float:
        """The share of the remaining residual that layer i (0-based in the range) takes: 1 / layers left."""
        return 1.0 / (len(self.hparams.layers) - i)

    def optimize(self, requests: list[EditRequest], start: dict[str, torch.Tensor] | None = None) -> Targets:
        """δ per optimized module, (n, d) each, with each request's final NLL and steps; δ starts at ``start``."""
        return optimize_targets(
            self.model,
            self.tok,
            self.spec,
            requests,
            self.templates(),
            [self.target_path()],
            self.hparams.layers[-1],  # δ enters at the top layer's output: the blocks below it never change
            self.target_config(),
            start=start,
            step_scale=self.step_scale(),
        )

    def step_scale(self, cfg: TargetHyperParams | None = None) -> dict[str, torch.Tensor] | None:
        """``targets.step_scale: gain`` (in ``cfg``, else the editor's): δ's steps per coordinate in proportion to the
        edited layers' mean |gain| of their post-MLP norms, (d,) with mean 1; None where every coordinate steps alike."""
        if (cfg or self.target_config()).step_scale == "none" or self.spec.mlp_post_norm is None:
            return None
        gains = torch.stack([post_norm_gain(self.model, self.spec, layer)[0].abs() for layer in self.hparams.layers])
        scale = gains.mean(0)  # (d,)
        return {self.target_path(): scale / scale.mean()}

    def fact_keys(self, requests: list[EditRequest]) -> torch.Tensor:
        """The text-free lookup key of each fact (n, 3 d_in): editing/exchange.py."""
        first = self.hparams.layers[0]
        if self._white is None:
            self._white = whitener(self.covariances()[first])
        return fact_keys(self.model, self.tok, self.spec, first, self._white, requests)

    def target_layout(self) -> tuple[list[str], list[int], int]:
        """Where a shared target lives, its width, and the key's width: what an exchange's vectors must fit."""
        module = self.module("mlp_out", self.hparams.layers[0])
        d_in = module.weight.shape[1] if isinstance(module, torch.nn.Linear) else module.weight.shape[0]  # Conv1D: (d_in, d_out)
        return [self.shared_path()], [self.model.config.hidden_size], 3 * int(d_in)  # z: the residual width

    def shared_path(self) -> str:
        """Where a shared target is expressed: the top edited block's output, the residual stream that every
        client of the base turns into the same prediction (the blocks above it are nobody's edit), whatever its
        own earlier edits did below. MEMIT's target is set there; a family that sets it elsewhere converts."""
        return self.spec.block(self.hparams.layers[-1])

    def to_shared(self, requests: list[EditRequest], delta: torch.Tensor) -> torch.Tensor:
        """δ (n, d) at ``target_path`` as the change it makes at ``shared_path``."""
        return delta

    def from_shared(self, requests: list[EditRequest], change: torch.Tensor) -> torch.Tensor:
        """A change (n, d) at ``shared_path`` as the δ at ``target_path`` that makes it."""
        return change

    def targets(self, requests: list[EditRequest], h0: torch.Tensor) -> torch.Tensor:
        """z (n, d) at ``target_path``: looked up in the exchange where found, optimized for the rest (and offered).

        A vector is exchanged at ``shared_path`` as the state the edit aims for there; a reuser takes its own state
        there off it, so its earlier edits below do not shift where the fact lands. An exchange that ``refine``s
        has each found vector checked on this model first and stepped from where it falls short (never offered
        again: it is another client's vector)."""
        t0 = time.perf_counter()
        if self.exchange is None:
            z = h0 + self.compute_targets(requests)
            self.diagnostics["target_s"] = [(time.perf_counter() - t0) / len(requests)] * len(requests)
            return z
        keys = self.fact_keys(requests)  # (n, d_k)
        got = self.exchange.lookup(keys)
        lookup_s = time.perf_counter() - t0  # keys and search: what sharing costs when nothing is found
        shared = self.shared_path()
        # the state there before this edit: h0 itself where the target is set at the shared path (MEMIT)
        hs = (
            h0
            if shared == self.target_path()
            else read_at_subject(self.model, self.tok, requests, ("{}",), [shared], "output")[shared]
        )
        found = got.found.nonzero().squeeze(1).tolist()
        own = (~got.found).nonzero().squeeze(1).tolist()
        delta = torch.zeros_like(h0)  # (n, d) z - h0
        if found:
            change = got.z.to(h0)[found] - hs[found]
            delta[found] = self.from_shared([requests[i] for i in found], change)
        diagnostics = {"target_nll": [float("nan")] * len(requests), "target_steps": [0.0] * len(requests)}
        refine = self.exchange.refine
        run = list(range(len(requests))) if refine else own
        if run:
            delta[run] = self.compute_targets([requests[i] for i in run], delta[run] if refine else None)
            for name, values in self.diagnostics.items():  # the optimized facts' rows, in place
                if name in diagnostics:
                    for i, v in zip(run, values):
                        diagnostics[name][i] = v
        if own:
            self.exchange.offer(keys[own], hs[own] + self.to_shared([requests[i] for i in own], delta[own]))
        seconds = time.perf_counter() - t0
        self.diagnostics |= diagnostics | {
            "target_reused": got.found.float().tolist(),
            "target_s": [seconds / len(requests)] * len(requests),  # the phase's time, spread over the batch
            "target_lookup_s": [lookup_s / len(requests)] * len(requests),
        }
        return h0 + delta

    def compute_targets(self, requests: list[EditRequest], start: torch.Tensor | None = None) -> torch.Tensor:
        """z - h at the target path: (n, d), stepped from ``start`` (n, d) where given, else from zero."""
        t = self.optimize(requests, None if start is None else {self.target_path(): start})
        self.diagnostics |= {"target_nll": t.nll.tolist(), "target_steps": t.steps.float().tolist()}
        return t.deltas[self.target_path()]

    def at_layer(self, layer: int, requests: list[EditRequest], resid: torch.Tensor) -> torch.Tensor:
        """The residual-stream change (n, d) layer ``layer`` must make, as a change of its MLP output projection."""
        return residual_to_mlp_output(self.model, self.tok, self.spec, layer, requests, resid)

    def solve(
        self, layer: int, keys: torch.Tensor, resid: torch.Tensor, kept: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (d_out, n), (n, d_in) of the layer's update. keys (n, d_in), resid (n, d_out); ``kept`` (m, d_in):
        keys whose outputs stay, weighted by ``negatives.weight`` beside the covariance."""
        cov = self.covariances()[layer].to(keys.device).double()
        k = keys.double()
        x = torch.linalg.solve(self.hparams.solve.mom2_weight * cov + k.T @ k + self.kept_gram(kept), k.T)  # (d_in, n)
        return resid.T.float(), x.T.float()

    def kept_gram(self, kept: torch.Tensor | None) -> torch.Tensor | float:
        """μ NᵀN (d_in, d_in) of the kept keys N (m, d_in), in float64; 0 where there are none."""
        if kept is None or not len(kept):
            return 0.0
        n = kept.double()
        return self.hparams.negatives.weight * (n.T @ n)

    def kept_keys(self, layer: int, negatives: list[EditRequest]) -> torch.Tensor:
        """(m, d_in) keys of the negatives at ``layer``: at the subject's last token, or at every token."""
        if self.hparams.negatives.positions == "subject":
            return subject_keys(self.model, self.tok, self.spec, [layer], negatives, ("{}",))[layer]
        states, _, real = read_every_position(self.model, self.tok, negatives, self.spec.module_path("mlp_out", layer))
        return states[real]

    def after_layer(self, layer: int, keys: torch.Tensor) -> None:
        """Hook for state kept across batches (AlphaEdit's key cache)."""

    def _edit(self, requests: list[EditRequest]) -> None:
        hp = self.hparams
        self.covariances()
        top = self.target_path()
        h0 = read_at_subject(self.model, self.tok, requests, ("{}",), [top], "output")[top]  # (n, d)
        z = self.targets(requests, h0)  # (n, d)
        negatives, _ = other_subjects(requests, hp.negatives.per_request)
        for i, layer in enumerate(hp.layers):
            keys = subject_keys(self.model, self.tok, self.spec, [layer], requests, self.templates())[layer]  # (n, d_in)
            # (m, d_in) at the current weights, as the edited keys are: their outputs now are the ones to keep
            kept = self.kept_keys(layer, negatives) if negatives else None
            # before the first layer's update the model is the one h0 was read from (finding targets changes no weight)
            h = h0 if i == 0 else read_at_subject(self.model, self.tok, requests, ("{}",), [top], "output")[top]
            resid = self.at_layer(layer, requests, (z - h) * self.spread(i))  # (n, d)
            out_f, in_f = self.solve(layer, keys, resid, kept)
            self._apply(self.weight_name("mlp_out", layer), linear_update(self.module("mlp_out", layer), out_f, in_f))
            self.after_layer(layer, keys)


@register
class MEMIT(MEMITFamily):
    name = "memit"
    hparams_cls = MEMITHyperParams
    method_dir = Path(__file__).parent
