"""Measurements that more than one gate reads: the batch's own edit outcomes, and the relative regression."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kedit.core.facts import EditRequest
from kedit.core.lm import score_targets

from ..metrics import mean, prompt_scores


@dataclass(frozen=True)
class EditOutcomes:
    """Per-request outcomes on one model: does each edit hold on its prompt and paraphrases,
    and do its neighbours keep their own answer (over ``target_new``)?"""

    rewrite_ok: torch.Tensor  # (n_requests,) bool
    rewrite_p_new: torch.Tensor  # (n_requests,) per-token probability of target_new on the edit prompt
    rewrite_p_true: torch.Tensor  # (n_requests,) of target_true (NaN where the request has none)
    paraphrase_ok: torch.Tensor  # (n_paraphrases,) bool
    neighbor_ok: torch.Tensor  # (n_neighbors,) bool

    @property
    def efficacy(self) -> float:
        return mean(self.rewrite_ok)

    @property
    def generalization(self) -> float:
        return mean(self.paraphrase_ok)

    @property
    def specificity(self) -> float:
        return mean(self.neighbor_ok)


def edit_outcomes(model, tokenizer, requests: Sequence[EditRequest], batch_size: int = 64) -> EditOutcomes:
    """Whether each edit holds on its prompt and paraphrases (``prompt_scores``), and whether its neighbours
    still prefer their own answer over ``target_new``."""
    rewrite = [(r.text, r) for r in requests]
    para = [(p, r) for r in requests for p in r.paraphrase_prompts]
    pairs = rewrite + para  # rewrite prompts first: the first len(requests) results are the rewrites
    h = prompt_scores(
        model, tokenizer, [p for p, _ in pairs], [r.target_new for _, r in pairs], [r.target_true for _, r in pairs], batch_size
    )
    k = len(rewrite)
    return EditOutcomes(h.ok[:k], h.p_new[:k], h.p_true[:k], h.ok[k:], neighbours_keep(model, tokenizer, requests, batch_size))


def neighbours_keep(model, tokenizer, requests: Sequence[EditRequest], batch_size: int = 64) -> torch.Tensor:
    """Per neighbourhood prompt of the batch, whether it prefers its own answer over the edit's ``target_new``.

    A scoring call of its own (not batched with the rewrites), so that measuring only the neighbours before an
    edit gives exactly the numbers ``edit_outcomes`` gives."""
    nb = [(n.prompt, n.answer, r.target_new) for r in requests for n in r.neighborhood]
    if not nb:
        return torch.zeros(0, dtype=torch.bool)
    prompts = [p for p, _, _ in nb] * 2
    prob = score_targets(model, tokenizer, prompts, [a for _, a, _ in nb] + [t for _, _, t in nb], batch_size).prob
    return prob[: len(nb)] > prob[len(nb) :]


def regression(base: float, now: float, higher_is_better: bool) -> float:
    """Relative change in the bad direction: 0.1 means 10% worse than ``base``; negative is better."""
    if base == 0 or math.isnan(base) or math.isnan(now):
        return float("nan")
    return (base - now) / abs(base) if higher_is_better else (now - base) / abs(base)


def draw(n: int, sample: int, batch: Sequence[EditRequest], salt: str = "") -> list[int]:
    """``sample`` indices of ``range(n)``, uniformly without replacement, the same for the same batch (and
    ``salt``: two draws for one batch, e.g. per capability task, are independent)."""
    text = "\x1f".join(sorted(r.key for r in batch)) + ("\x1e" + salt if salt else "")
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:sample].tolist())
