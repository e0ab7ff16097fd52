"""``kedit bench scope``: how far BalancEdit's learned scopes reach at each layer, with no edit trained.

For each layer, the facts' keys and radii are computed as a stream of batches would compute them (each
batch sees its own samples and the keys of the batches before it, as a codebook would hold them). Then,
on what the benchmark scores and the editor never saw: the share of rephrasings whose subject token lands
in its own fact's scope (and the share that lands in another fact's), and the share of unrelated prompts
with any token inside any scope. A cheap way to choose the key's layer before paying for trained values.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editing import make_editor
from editing.grace.codebook import nearest_within
from editing.grace.memory import Book
from editing.ids import slot_id
from editing.keys import read_at_subject, read_tokens
from editing.stats import corpus_from_files
from evaluation.metrics import mean, shared_subject, subject_ids
from kedit.core.facts import EditRequest
from kedit.core.facts.schema import normalize
from kedit.core.lm import encode_prompts
from kedit.core.models import KNOWN_MODELS, load_model, pull

from .bench import _cases, _corpus_file, machine, require_held_out, scored_texts
from .bench_keys import POSITIONS, prompt_rows


def _layer(model, tok, reqs: list[EditRequest], layer: int, batch_size: int, overrides: dict, corpus) -> dict[str, float]:
    editor = make_editor("balancedit", model, tok, {**overrides, "layer": layer}, assets={"corpus": corpus})
    editor.held_out = scored_texts(reqs)
    editor.prepare()  # the background negatives, as a stream reads them
    path = editor.path()
    keys = read_at_subject(model, tok, reqs, ("{}",), [path], "input")[path].cpu()  # (n, d_in)
    radii, seen, separable = [], set(), []
    for s in range(0, len(reqs), batch_size):
        # the facts of the batches before this one, as the codebook would hold them (values play no part)
        book = Book(
            keys[:s],
            torch.zeros(s, 1),
            torch.cat(radii) if radii else torch.zeros(0),
            torch.tensor([slot_id(r) for r in reqs[:s]], dtype=torch.long),
            torch.zeros(s, dtype=torch.long),
        )
        radii.append(editor.scope(reqs[s : s + batch_size], keys[s : s + batch_size], book))
        seen.update(normalize(t) for t in editor.samples)
        separable += editor.diagnostics["separable"]
    require_held_out("balancedit", editor.held_out, seen)
    radius = torch.cat(radii)  # (n,)
    # the rephrasings that name their subject, keyed at its last token (as `kedit bench keys` reads them)
    rows, owner = prompt_rows(reqs, lambda r: r.paraphrase_prompts, POSITIONS["subject_last_token"])
    para = read_at_subject(model, tok, rows, ("{}",), [path], "input")[path].cpu()
    idx, hit = nearest_within(para, keys, radius)
    unrelated = [n.prompt for r in reqs for n in r.neighborhood]
    ids = encode_prompts(tok, unrelated)
    states, real = read_tokens(model, tok, ids, path)  # (m, T, d_in), (m, T)
    by, touched = nearest_within(states.reshape(-1, states.shape[-1]).cpu(), keys, radius)
    touched = touched.reshape(real.shape) & real.cpu()
    # zsRE's siblings: records about one subject (mostly one question reworded, each with its own new answer), whose
    # keys lie as near each other as a rephrasing lies to its own: scored apart from the subjects that are one
    # record's alone
    shared = shared_subject(reqs)  # (n,)
    reached = hit & (idx == owner)  # (n_rows,)
    by_shared = shared[owner]
    subject = subject_ids(reqs)  # (n,)
    to_sibling = hit & (idx != owner) & (subject[idx] == subject[owner])
    return {
        "rephrasings_reached": float(reached.float().mean()),
        "rephrasings_to_another_fact": float((hit & (idx != owner)).float().mean()),
        "rephrasings_to_a_sibling": float(to_sibling.float().mean()),
        "rephrasings_reached_distinct_subject": mean(reached[~by_shared]),
        "rephrasings_reached_shared_subject": mean(reached[by_shared]),
        "shared_subject": mean(shared),
        "unrelated_prompts_touched": float(touched.any(-1).float().mean()),
        "touched": _touched(tok, unrelated, ids, touched, by.reshape(real.shape), reqs),
        "radius": float(radius.mean()),
        "separable": float(torch.tensor(separable).mean()),
        "n_rephrasings": float(len(rows)),
        "n_unrelated": float(len(unrelated)),
    }


def _touched(tok, prompts: list[str], ids: list[list[int]], touched, by, reqs: list[EditRequest], limit: int = 50) -> list[dict]:
    """Which unrelated prompt's which token lands in which fact's scope (the first ``limit``): what crowds a scope."""
    out = []
    for q, t in touched.nonzero().tolist()[:limit]:
        fact = reqs[int(by[q, t])]
        token = tok.decode([ids[q][t]])
        out.append({"prompt": prompts[q], "token": token, "position": t, "fact": fact.id, "subject": fact.subject})
    return out


def bench_scope(
    model_ref: str,
    data,
    n: int,
    start: int,
    layers: list[int],
    batch_size: int,
    overrides: dict | None = None,
    corpus: Path | str | None = None,
) -> dict:
    """``overrides``: BalancEdit preset overrides (``scope.balance`` ...), recorded in the result; ``corpus``:
    the ordinary text of the background negatives (None or a missing file: sampled from the model)."""
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    model, tok = load_model(model_ref)
    reqs = _cases(data, start + n)[start:]
    corpus_path = _corpus_file(corpus)
    text = corpus_from_files([corpus_path]) if corpus_path else None
    out = {"model": model_ref, "data": str(data), "n": len(reqs), "start": start, "batch_size": batch_size}
    out |= {"overrides": overrides or {}, "corpus": corpus_path or "model samples", "machine": machine()}
    out["layers"] = {str(layer): _layer(model, tok, reqs, layer, batch_size, overrides or {}, text) for layer in layers}
    return out
