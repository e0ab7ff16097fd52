"""CoME (Jung et al., 2025): conflict-free editing by unlearning the outdated fact, on MEMIT or PMET.

1. update vector δ: the base method's target for ``target_new``;
2. unlearning vector δ′: the same optimization for the outdated ``target_true``
   (both are optimized in one joint batch of 2n requests);
3. common component δ″: the part of δ′ along δ (the subject and relation features both share),
   which is kept;
4. z = δ − α(δ′ − δ″), the removal applied only to the top-p fraction of coordinates where
   |δ′ − δ″| is largest; α = 0 gives the base method exactly;
5. then the base method's layer loop (keys, residual spread, solve, apply).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from editing.base import EditError, register
from editing.memit.memit import MEMITFamily
from editing.pmet.pmet import PMETFamily
from kedit.core.facts import EditRequest

from .hparams import CoMEHyperParams


def removal(delta: torch.Tensor, outdated: torch.Tensor, alpha: float, top_p: float) -> torch.Tensor:
    """α(δ′ − δ″) on the top-p coordinates of |δ′ − δ″|, δ″ the part of δ′ along δ; δ, δ′ (n, d)."""
    unit = delta / delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    common = (outdated * unit).sum(-1, keepdim=True) * unit  # δ″: (n, d)
    specific = outdated - common  # δ′ − δ″
    k = max(1, round(top_p * delta.shape[-1]))
    top = specific.abs().topk(k, dim=-1).indices  # (n, k)
    mask = torch.zeros_like(delta).scatter_(-1, top, 1.0)
    return alpha * specific * mask


def conflict_free_target(delta: torch.Tensor, outdated: torch.Tensor, alpha: float, top_p: float) -> torch.Tensor:
    """z = δ − α(δ′ − δ″) on the top-p coordinates of |δ′ − δ″|; δ, δ′ (n, d)."""
    return delta - removal(delta, outdated, alpha, top_p)


class _CoME:
    """Mixin: replaces the base method's target with the conflict-free one."""

    def require_supported(self, requests):
        missing = [r.id for r in requests if r.target_true is None]
        if missing:
            raise EditError(
                f"{self.name} needs each request's outdated answer (target_true) to unlearn it; missing for: "
                + ", ".join(missing[:10])
                + (" ..." if len(missing) > 10 else "")
            )

    def compute_targets(self, requests: list[EditRequest]) -> torch.Tensor:
        n = len(requests)
        old = [dataclasses.replace(r, target_new=r.target_true, target_true=None) for r in requests]
        t = self.optimize(list(requests) + old)
        both = t.deltas[self.target_path()]  # (2n, d)
        delta, outdated = both[:n], both[n:]
        cut = removal(delta, outdated, self.hparams.unlearning.alpha, self.hparams.unlearning.top_p)  # (n, d)
        # why CoME does or does not differ from its base: how large δ′ came out (a value the model already
        # states needs few steps, so δ′ stays small) and how much of δ the removal is
        norm = delta.norm(dim=-1).clamp(min=1e-12)
        self.diagnostics |= {
            "target_nll": t.nll[:n].tolist(),
            "target_steps": t.steps[:n].float().tolist(),
            "outdated_steps": t.steps[n:].float().tolist(),
            "outdated_norm_ratio": (outdated.norm(dim=-1) / norm).tolist(),  # |δ′| / |δ|
            "outdated_cosine": torch.nn.functional.cosine_similarity(outdated, delta, dim=-1).tolist(),
            "removed_norm_ratio": (cut.norm(dim=-1) / norm).tolist(),  # |z − δ| / |δ|
        }
        return delta - cut


@register
class CoMEMEMIT(_CoME, MEMITFamily):
    name = "come-memit"
    hparams_cls = CoMEHyperParams
    method_dir = Path(__file__).parent


@register
class CoMEPMET(_CoME, PMETFamily):
    name = "come-pmet"
    hparams_cls = CoMEHyperParams
    method_dir = Path(__file__).parent
