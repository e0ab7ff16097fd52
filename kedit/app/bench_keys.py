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


def _keys(model, tok, paths: list[str], reqs: list[EditRequest]) -> dict[str, torch.Tensor]:
    """Per path, (n, d_in): one forward for every layer asked."""
    return read_at_subject(model, tok, reqs, ("{}",), paths, "input")


def prompt_rows(reqs: list[EditRequest], texts_of, make) -> tuple[list[EditRequest], torch.Tensor]:
    """Each fact's other prompts as requests keyed at the position, and the fact each belongs to."""
    rows, owner = [], []
    for i, r in enumerate(reqs):
        for t in texts_of(r):
            q = make(r, t)
            if q is not None:
                rows.append(q)
                owner.append(i)
    return rows, torch.tensor(owner, dtype=torch.long)


def _per_fact(d: torch.Tensor, owner: torch.Tensor, n: int, reduce: str) -> torch.Tensor:
    """(n,) the farthest ("amax") or nearest ("amin") of each fact's distances d (m,); NaN for a fact with none."""
    fill = float("-inf") if reduce == "amax" else float("inf")
    out = torch.full((n,), fill).scatter_reduce(0, owner, d, reduce)
    return out.masked_fill(out.isinf(), float("nan"))


def _distances(model, tok, paths: list[str], reqs: list[EditRequest], position: str) -> dict[str, dict[str, float]]:
    """Per path, the summary at one position; three forwards (edit prompts, paraphrases, neighbours) for all paths."""
    make = POSITIONS[position]
    n = len(reqs)
    own = _keys(model, tok, paths, [make(r, r.text) for r in reqs])  # path -> (n, d_in)
    para_rows, para_owner = prompt_rows(reqs, lambda r: r.paraphrase_prompts, make)
    neigh_rows, neigh_owner = prompt_rows(reqs, lambda r: [n.prompt for n in r.neighborhood], make)
    para_keys = _keys(model, tok, paths, para_rows) if para_rows else {}
    neigh_keys = _keys(model, tok, paths, neigh_rows) if neigh_rows else {}
    out = {}
    for p in paths:
        k = own[p]
        other = torch.cdist(k, k).fill_diagonal_(float("inf")).min(-1).values  # (n,)
        nan = torch.full((n,), float("nan"))
        para = _per_fact((para_keys[p] - k[para_owner]).norm(dim=-1), para_owner, n, "amax") if para_rows else nan
        neigh = _per_fact((neigh_keys[p] - k[neigh_owner]).norm(dim=-1), neigh_owner, n, "amin") if neigh_rows else nan
        # at the subject's token a neighbourhood prompt (another subject) has no key of its own: NaN, and then the
        # other facts' subjects are the negatives
        have = ~para.isnan()
        separable = (para < other) & (neigh.isnan() | (para < neigh))
        out[p] = {
            "key_norm": float(k.norm(dim=-1).mean()),
            "farthest_paraphrase": float(para[have].mean()),
            "nearest_neighbourhood": float(neigh[~neigh.isnan()].mean()),
            "nearest_other_fact": float(other.mean()),
            "separable": float(separable[have].float().mean()),
            "n_facts": float(int(have.sum())),
        }
    return out


def bench_keys(model_ref: str, data, n: int, layers: list[int]) -> dict:
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    model, tok = load_model(model_ref)
    spec = spec_for(model)
    reqs = _cases(data, n)
    out = {"model": model_ref, "data": str(data), "n": len(reqs), "layers": {}, "machine": machine()}
    paths = {layer: spec.module_path("mlp_out", layer) for layer in layers}
    by_position = {pos: _distances(model, tok, list(paths.values()), reqs, pos) for pos in POSITIONS}
    out["layers"] = {str(layer): {pos: by_position[pos][p] for pos in POSITIONS} for layer, p in paths.items()}
    return out
