"""Target vectors shared between editors of the same base model (FLEKE's mediator knowledge vectors).

A locate-then-edit editor spends most of an edit optimizing, per fact, the target z at the top of its layer
range. An editor given a ``TargetExchange`` first looks its facts up there by a key and optimizes only the
facts it finds nothing for; it then offers the vectors it optimized. What the exchange is (a federation's MKV
store, kedit/store/mkv.py) is the pipeline's business; the editor only computes keys and vectors.

The key (``fact_keys``) is text-free and does not move when the family edits: at the first edited layer, the
input of the MLP output projection (MEMIT's key) at the subject's last token, at the prompt's last token (the
question asked) and at the new target's last token (the answer), each whitened by that layer's key covariance
C (k C^-1/2, so that unrelated keys are near orthogonal, as MEMIT's solve assumes) and unit-normed, then
concatenated: cos(key, key') is the mean of the three parts' cosines. The first edited layer's MLP input is
computed below every weight the family changes, so two clients' keys for one fact are equal whatever each
has edited; and z sets the top edited layer's output, above which no client's weights differ, so a vector
means the same edit on every client of the base (its residual z - h is taken against the reuser's own h).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from kedit.core.arch import ArchSpec
from kedit.core.facts import EditRequest

from .keys import read_at_subject

KEY_VERSION = "subject-question-answer/whitened-mlp-key/1"  # what a key is: part of what reusers must share


@dataclass
class Found:
    """Per queried fact: whether a vector was found, and the vectors (rows without one are zero)."""

    found: torch.Tensor  # (n,) bool
    z: torch.Tensor  # (n, d) absolute target at the editor's target path


class TargetExchange(Protocol):
    # False: a found vector is used as it is (FLEKE's reuse: no step). True: it is where the editor's optimization
    # starts, so one forward on this model checks it and only a vector that falls short here takes steps
    refine: bool

    def lookup(self, keys: torch.Tensor) -> Found:
        """Vectors for the facts whose keys (n, d_k) match one the exchange holds."""
        ...

    def offer(self, keys: torch.Tensor, z: torch.Tensor) -> None:
        """Vectors this editor optimized, keys (m, d_k) and z (m, d), for the exchange to share."""
        ...


def whitener(cov: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """C^-1/2 of a key covariance (d, d), eigenvalues floored at ``floor`` times the largest (C is rank-poor)."""
    ev, vec = torch.linalg.eigh(cov.double())
    return ((vec * ev.clamp(min=float(ev.max()) * floor).rsqrt()) @ vec.T).float()


@torch.no_grad()
def fact_keys(
    model: nn.Module, tokenizer, spec: ArchSpec, layer: int, white: torch.Tensor, requests: Sequence[EditRequest]
) -> torch.Tensor:
    """(n, 3 d_in): whitened, unit-normed MLP keys at ``layer`` of subject, question and answer, concatenated
    and normed again. ``white`` (d_in, d_in) is C^-1/2 at that layer."""
    path = spec.module_path("mlp_out", layer)
    as_subject = [
        list(requests),
        # the whole question read as the "subject": its last token is the prompt's
        [EditRequest(r.id, r.text, "{}", r.target_new) for r in requests],
        # the answer alone (template "{}")
        [EditRequest(r.id, r.target_new, "{}", r.target_new) for r in requests],
    ]
    n = len(requests)
    flat = [r for part in as_subject for r in part]
    keys = read_at_subject(model, tokenizer, flat, ("{}",), [path], "input")[path]  # (3n, d_in), one forward
    parts = torch.nn.functional.normalize(keys @ white.to(keys), dim=-1).reshape(3, n, -1)
    return torch.nn.functional.normalize(torch.cat(list(parts), -1), dim=-1)  # (n, 3 d_in)
