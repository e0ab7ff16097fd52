"""CoME (Jung et al., 2025): conflict-free editing by unlearning the outdated fact, on MEMIT or PMET.

1. update vector δ: the base method's target for ``target_new``;
2. unlearning vector δ′: the same optimization for the outdated ``target_true``
   (both are optimized in one joint batch of 2n requests); with ``unlearning.outdated: installed``, a fact
   this editor edited before takes as δ′ what those edits installed at the subject (kedit's variant for
   re-edit streams, see the README);
3. common component δ″: the part of δ′ along δ (the subject and relation features both share),
   which is kept;
4. z = δ − α(δ′ − δ″), the removal applied only to the top-p fraction of coordinates where
   |δ′ − δ″| is largest; α = 0 gives the base method exactly;
5. then the base method's layer loop (keys, residual spread, solve, apply).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from editing.base import EditError, register
from editing.ids import slot_id
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
    """Mixin: replaces the base method's target with the conflict-free one.

    With ``unlearning.outdated: installed`` the editor keeps, per fact it edited (its slot's id), the sum of the
    targets its edits of that fact set at the subject, (m,) ids and (m, d) vectors: a re-edit's δ′ is that
    vector instead of an optimization for a value the model already states."""

    shares_targets = False  # δ depends on what this model already removed (its installed δ′): not another's

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.installed_slot = torch.zeros(0, dtype=torch.int64)  # (m,)
        self.installed = torch.zeros(0, 0)  # (m, d), d set by the first edit

    def require_supported(self, requests):
        missing = [r.id for r in requests if r.target_true is None]
        if missing:
            raise EditError(
                f"{self.name} needs each request's outdated answer (target_true) to unlearn it; missing for: "
                + ", ".join(missing[:10])
                + (" ..." if len(missing) > 10 else "")
            )

    def _keeps_installed(self) -> bool:
        return self.hparams.unlearning.outdated == "installed"

    def _held_rows(self, requests: list[EditRequest]) -> torch.Tensor:
        """Per request, the row of ``installed`` holding its fact, or -1: (n,)."""
        if not self._keeps_installed() or len(self.installed_slot) == 0:
            return torch.full((len(requests),), -1, dtype=torch.int64)
        ids = torch.tensor([slot_id(r) for r in requests], dtype=torch.int64)
        match = ids[:, None] == self.installed_slot[None, :]  # (n, m)
        return torch.where(match.any(1), match.int().argmax(1), -1)

    def compute_targets(self, requests: list[EditRequest], start: torch.Tensor | None = None) -> torch.Tensor:
        if start is not None:  # shares_targets is False: no exchange ever hands CoME a vector to start from
            raise ValueError("CoME's targets start from zero: its δ depends on what this model already removed")
        n = len(requests)
        rows = self._held_rows(requests)  # (n,)
        fresh = [i for i in range(n) if rows[i] < 0]  # δ′ optimized for these
        old = [dataclasses.replace(requests[i], target_new=requests[i].target_true, target_true=None) for i in fresh]
        t = self.optimize(list(requests) + old)
        both = t.deltas[self.target_path()]  # (n + len(fresh), d)
        delta = both[:n]
        outdated = torch.empty_like(delta)
        outdated[fresh] = both[n:]
        held = (rows >= 0).nonzero().squeeze(1)
        if len(held):
            outdated[held] = self.installed[rows[held]].to(delta)
        cut = removal(delta, outdated, self.hparams.unlearning.alpha, self.hparams.unlearning.top_p)  # (n, d)
        # why CoME does or does not differ from its base: how large δ′ came out (a value the model already
        # states needs few steps, so δ′ stays small) and how much of δ the removal is
        norm = delta.norm(dim=-1).clamp(min=1e-12)
        steps = torch.zeros(n)
        steps[fresh] = t.steps[n:].float().cpu()
        self.diagnostics |= {
            "target_nll": t.nll[:n].tolist(),
            "target_steps": t.steps[:n].float().tolist(),
            "outdated_steps": steps.tolist(),
            "outdated_installed": (rows >= 0).float().tolist(),  # 1: δ′ is what earlier edits installed
            "outdated_norm_ratio": (outdated.norm(dim=-1) / norm).tolist(),  # |δ′| / |δ|
            "outdated_cosine": torch.nn.functional.cosine_similarity(outdated, delta, dim=-1).tolist(),
            "removed_norm_ratio": (cut.norm(dim=-1) / norm).tolist(),  # |z − δ| / |δ|
        }
        target = delta - cut
        if self._keeps_installed():
            self._keep_installed(requests, rows, target)
        return target

    def _keep_installed(self, requests: list[EditRequest], rows: torch.Tensor, target: torch.Tensor) -> None:
        """Add each request's target to what its fact holds (new tensors: the state before stays the undo's)."""
        t = target.detach().float().cpu()  # (n, d)
        installed = self.installed if len(self.installed_slot) else torch.zeros(0, t.shape[1])
        held = rows >= 0
        installed = installed.index_add(0, rows[held], t[held])
        new = (~held).nonzero().squeeze(1)
        ids = torch.tensor([slot_id(requests[i]) for i in new.tolist()], dtype=torch.int64)
        # one fact twice in a batch: its rows are summed into the first
        ids, inverse = ids.unique(sorted=False, return_inverse=True)
        added = torch.zeros(len(ids), t.shape[1]).index_add(0, inverse, t[new])
        self.installed_slot = torch.cat([self.installed_slot, ids])
        self.installed = torch.cat([installed, added])

    def state_dict(self) -> dict[str, Any]:
        if not self._keeps_installed():
            return {}
        return {"installed_slot": self.installed_slot.clone(), "installed": self.installed.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self._keeps_installed() or not state:
            super().load_state_dict(state)  # refuses a non-empty state where none is kept
            self.installed_slot, self.installed = torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0)
            return
        if set(state) != {"installed_slot", "installed"} or len(state["installed_slot"]) != len(state["installed"]):
            raise EditError(f"{self.name} state holds installed_slot (m,) and installed (m, d), got {sorted(state)}")
        self.installed_slot, self.installed = state["installed_slot"].clone(), state["installed"].clone()


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
