"""AlphaEdit (Fang et al., 2025): MEMIT's update projected onto the null space of preserved keys.

1. projector P = U₀U₀ᵀ over the eigenvectors of E[k kᵀ] with eigenvalues below a threshold,
   computed once per layer (the knowledge to preserve lives in the other directions);
2. target and residuals as in MEMIT;
3. solve: Δ = ((P(KᵀK + K_pᵀK_p) + l2·I)⁻¹ P Kᵀ R)ᵀ, where K_p are the keys of earlier edits
   (editor state, so sequential batches do not undo each other); for a preserved key k₀
   (P k₀ = 0) the update gives Δk₀ = 0;
4. apply, and add this batch's KᵀK to the cache (a version stores the batch's keys, not the sum).
"""

from __future__ import annotations

from collections.abc import Sequence
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
        # layer -> the keys of each edit since the last commit, [(n, d_in)]: what the next version stores
        self.new_keys: dict[int, list[torch.Tensor]] = {}

    def projectors(self) -> dict[int, torch.Tensor]:
        if self._projectors is None:
            thr = self.hparams.solve.nullspace_threshold
            self._projectors = {layer: null_space_projector(c, thr) for layer, c in self.covariances().items()}
        return self._projectors

    def prepare(self) -> None:
        self.projectors()

    def solve(self, layer, keys, resid, kept=None):
        p = self.projectors()[layer].to(keys.device).double()
        k = keys.double()  # (n, d_in)
        cache = self.key_cache.get(layer)
        # the batch's kept keys beside the earlier edits': both are outputs the update must leave as they are
        gram = k.T @ k + (cache.to(k.device).double() if cache is not None else 0) + self.kept_gram(kept)
        a = p @ gram + self.hparams.solve.l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
        x = torch.linalg.solve(a, p @ k.T)  # (d_in, n); Δ = R^T x^T
        return resid.T.float(), x.T.float()

    def after_layer(self, layer, keys):
        k = keys.detach().cpu()
        self.key_cache[layer] = add_keys(self.key_cache.get(layer), k)
        self.new_keys.setdefault(layer, []).append(k.clone())

    def commit(self) -> None:
        super().commit()
        self.new_keys = {}

    def state_dict(self) -> dict[str, Any]:
        state = {f"key_cache.{layer}": c.clone() for layer, c in self.key_cache.items()}
        return state | {f"new_keys.{name}": k.clone() for name, k in _numbered(self.new_keys).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.key_cache = {int(layer): v.clone() for layer, v in _under(state, "key_cache").items()}
        self.new_keys = _unnumbered(_under(state, "new_keys"))

    def version_state(self) -> dict[str, Any]:
        # the keys this version's edits added, (n, d_in) per layer and edit: 0.3 MB per 10 edits on SmolLM2,
        # where the sums are one (d_in, d_in) fp32 matrix per layer (47 MB); state_at adds them up again
        return {f"keys.{name}": k.clone() for name, k in _numbered(self.new_keys).items()}

    @classmethod
    def state_at(cls, stored: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Σ KᵀK per layer along the versions, in the order and arithmetic ``after_layer`` used, so the
        sums equal the stream's. A version that stored the sums themselves (a squash, or one written before
        versions stored keys) starts them over."""
        cache: dict[int, torch.Tensor] = {}
        for state in stored:
            whole = {int(layer): v.clone() for layer, v in _under(state, "key_cache").items()}
            cache = whole or cache
            for layer, keys in _unnumbered(_under(state, "keys")).items():
                for k in keys:
                    cache[layer] = add_keys(cache.get(layer), k)
        return {f"key_cache.{layer}": c for layer, c in cache.items()}


def add_keys(cache: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """``cache`` (d_in, d_in) plus KᵀK of ``keys`` (n, d_in): the product in float64, the sum in float32."""
    k = keys.double()
    return (k.T @ k).float() + (cache if cache is not None else 0)


def _under(state: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The entries ``<prefix>.<rest>`` of a state, by ``<rest>``."""
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}


def _numbered(keys: dict[int, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{layer: [keys of edit 0, edit 1, ...]} as flat state names ``<layer>.<edit>``."""
    return {f"{layer}.{i}": k for layer, ks in keys.items() for i, k in enumerate(ks)}


def _unnumbered(flat: dict[str, torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    out: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for name, k in flat.items():
        layer, i = (int(x) for x in name.split("."))
        out.setdefault(layer, []).append((i, k))
    return {layer: [k.clone() for _, k in sorted(ks, key=lambda e: e[0])] for layer, ks in out.items()}
