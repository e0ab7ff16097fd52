"""AlphaEdit (Fang et al., 2025): MEMIT's update projected onto the null space of preserved keys.

1. projector P = U₀U₀ᵀ over the eigenvectors of E[k kᵀ] with eigenvalues below a threshold,
   computed once per layer (the knowledge to preserve lives in the other directions);
2. target and residuals as in MEMIT;
3. solve: Δ = ((P(KᵀK + K_pᵀK_p) + l2·I)⁻¹ P Kᵀ R)ᵀ, where K_p are the keys of earlier edits
   (editor state, so sequential batches do not undo each other); for a preserved key k₀
   (P k₀ = 0) the update gives Δk₀ = 0;
4. apply, and add this batch's KᵀK to the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from editing.base import register
from editing.memit.memit import MEMITFamily

from .hparams import AlphaEditHyperParams


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """(d, d) projector onto the eigenvectors of ``cov`` whose eigenvalues are below ``threshold``."""
    evals, evecs = torch.linalg.eigh(cov.double())
    null = evecs[:, evals < threshold]  # (d, m)
    return (null @ null.T).float()


@register
class AlphaEdit(MEMITFamily):
    name = "alphaedit"
    hparams_cls = AlphaEditHyperParams
    method_dir = Path(__file__).parent

    def __init__(self, model, tokenizer, hparams=None, corpus=None):
        super().__init__(model, tokenizer, hparams, corpus)
        self._projectors: dict[int, torch.Tensor] | None = None
        self.key_cache: dict[int, torch.Tensor] = {}  # layer -> Σ KᵀK of accepted edits, (d_in, d_in)

    def projectors(self) -> dict[int, torch.Tensor]:
        if self._projectors is None:
            thr = self.hparams.solve.nullspace_threshold
            self._projectors = {layer: null_space_projector(c, thr) for layer, c in self.covariances().items()}
        return self._projectors

    def prepare(self) -> None:
        self.projectors()

    def solve(self, layer, keys, resid):
        p = self.projectors()[layer].to(keys.device).double()
        k = keys.double()  # (n, d_in)
        cache = self.key_cache.get(layer)
        gram = k.T @ k + (cache.to(k.device).double() if cache is not None else 0)
        a = p @ gram + self.hparams.solve.l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
        x = torch.linalg.solve(a, p @ k.T)  # (d_in, n); Δ = R^T x^T
        return resid.T.float(), x.T.float()

    def after_layer(self, layer, keys):
        k = keys.double().cpu()
        prev = self.key_cache.get(layer)
        self.key_cache[layer] = (k.T @ k).float() + (prev if prev is not None else 0)

    def state_dict(self) -> dict[str, Any]:
        return {f"key_cache.{layer}": c.clone() for layer, c in self.key_cache.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.key_cache = {int(k.split(".", 1)[1]): v.clone() for k, v in state.items() if k.startswith("key_cache.")}
