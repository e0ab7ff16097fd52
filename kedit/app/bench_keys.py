"""``kedit bench keys``: where a memory editor's keys lie, and whether a radius can separate a fact's scope.

For each CounterFact fact and each layer, at the input of the layer's MLP output projection, the distance
from the edit prompt's key to the keys of its paraphrases (inputs that should get the edit), of its
neighbourhood prompts (the same relation about other subjects: inputs that must not), and of the nearest
other fact's edit prompt. Two positions: the prompt's last token (GRACE's key) and the subject's last
token (the key ROME and MEMIT edit at). A fact is *separable* at a position when its farthest paraphrase
lies nearer than its nearest neighbourhood prompt and than the nearest other fact: only then does some
radius give it generalization without a leak. (At the subject's token only the other facts count: a
neighbourhood prompt is about a subject whose span the data does not give.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from editing.grace.grace import at_last_token
from editing.keys import read_at_subject
from kedit.core.arch import spec_for
from kedit.core.facts import EditRequest
from kedit.core.models import KNOWN_MODELS, load_model, pull

from .bench import _cases, machine

# what the key of a prompt is at each position: (request, prompt text) -> a request whose "subject" ends there
POSITIONS: dict[str, Callable[[EditRequest, str], EditRequest | None]] = {
    "prompt_last_token": lambda r, text: at_last_token([EditRequest(r.id, text, "{}", r.target_new)])[0],
    # a paraphrase that does not contain the subject has no subject token
    "subject_last_token": lambda r, text: (
        EditRequest(r.id, r.subject, text.replace(r.subject, "{}", 1), r.target_new) if r.subject in text else None
    ),
}


def _keys(model, tok, path: str, reqs: list[EditRequest]) -> torch.Tensor:
    return read_at_subject(model, tok, reqs, ("{}",), [path], "input")[path]  # (n, d_in)


def _distances(model, tok, path: str, reqs: list[EditRequest], position: str) -> dict[str, float]:
    make = POSITIONS[position]
    own = [make(r, r.text) for r in reqs]
    k = _keys(model, tok, path, own)  # (n, d_in)
    other = torch.cdist(k, k).fill_diagonal_(float("inf")).min(-1).values  # (n,)

    def farthest_or_nearest(texts_of, reduce) -> torch.Tensor:
        rows, owner = [], []
        for i, r in enumerate(reqs):
            for t in texts_of(r):
                q = make(r, t)
                if q is not None:
                    rows.append(q)
                    owner.append(i)
        out = torch.full((len(reqs),), float("nan"))
        if rows:
            d = (_keys(model, tok, path, rows) - k[torch.tensor(owner)]).norm(dim=-1)  # (m,)
            for i in set(owner):  # per fact: a handful of prompts
                out[i] = reduce(d[torch.tensor(owner) == i])
        return out

    para = farthest_or_nearest(lambda r: r.paraphrase_prompts, torch.max)  # (n,) farthest positive
    neigh = farthest_or_nearest(lambda r: [n.prompt for n in r.neighborhood], torch.min)  # (n,) nearest negative
    # at the subject's token a neighbourhood prompt (another subject) has no key of its own: NaN, and then the
    # other facts' subjects are the negatives
    have = ~para.isnan()
    separable = (para < other) & (neigh.isnan() | (para < neigh))
    return {
        "key_norm": float(k.norm(dim=-1).mean()),
        "farthest_paraphrase": float(para[~para.isnan()].mean()),
        "nearest_neighbourhood": float(neigh[~neigh.isnan()].mean()),
        "nearest_other_fact": float(other.mean()),
        "separable": float(separable[have].float().mean()),
        "n_facts": float(int(have.sum())),
    }


def bench_keys(model_ref: str, data, n: int, layers: list[int]) -> dict:
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    model, tok = load_model(model_ref)
    spec = spec_for(model)
    reqs = _cases(data, n)
    out = {"model": model_ref, "data": str(data), "n": len(reqs), "layers": {}, "machine": machine()}
    for layer in layers:
        path = spec.module_path("mlp_out", layer)
        out["layers"][str(layer)] = {pos: _distances(model, tok, path, reqs, pos) for pos in POSITIONS}
    return out
