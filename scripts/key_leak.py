"""How much of a MEMIT update at a subject's key reaches the same prompt about other subjects, per model and layer.

usage: python scripts/key_leak.py [--models smollm2-135m,gemma3-270m] [--n 40] [--batch-size 10] [--json FILE]

CounterFact's neighbourhood prompts are the edited fact's relation about other subjects that share its old answer.
An update that reads the relation in the key, rather than the subject, changes their answers too. On the first
``--n`` records of CounterFact's train split (never scored by a benchmark), in batches, on the unedited model, for each
edited layer of the MEMIT preset:

- ``cosine``: between a request's key at its subject (the bare prompt) and the key of its prompt about each of the
  batch's other subjects (``editing.keys.other_subjects``), the inputs the update should leave alone;
- ``leak``: what MEMIT's solve at that layer, x = (λC + KᵀK)⁻¹ Kᵀ, gives such a key against the request's own key,
  nᵀxᵢ / kᵢᵀxᵢ: the share of the edit's change at its own key that its relation's other subjects receive, to first
  order, at this layer.

Medians and quartiles over all (request, other subject) pairs. A model whose leak is higher loses more of its
neighbours to the same edits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from editing.keys import other_subjects, subject_keys
from kedit.app.bench import _cases, editor_on, machine
from kedit.core.paths import default_corpus


def quartiles(x: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in torch.quantile(x.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.double))]


@torch.no_grad()
def leak(model_ref: str, requests: list, batch_size: int) -> dict:
    model, tok, editor, _ = editor_on(model_ref, "memit", str(default_corpus() or "") or None, None)
    hp = editor.hparams
    rows: dict[int, dict[str, list[torch.Tensor]]] = {layer: {"cosine": [], "leak": []} for layer in hp.layers}
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        negatives, owner = other_subjects(batch, batch_size - 1)
        owner = torch.tensor(owner)  # (m,) the request each other-subject prompt belongs to
        keys = subject_keys(model, tok, editor.spec, hp.layers, batch, editor.templates())  # as MEMIT solves with
        bare = subject_keys(model, tok, editor.spec, hp.layers, batch, ("{}",))  # as the negatives are read
        others = subject_keys(model, tok, editor.spec, hp.layers, negatives, ("{}",))
        for layer in hp.layers:
            k, b, n = keys[layer], bare[layer], others[layer]  # (b, d), (b, d), (m, d)
            _, x = editor.solve(layer, k, torch.zeros(len(k), 1))  # (b, d): MEMIT's (λC + KᵀK)⁻¹ Kᵀ, transposed
            own = (k * x).sum(-1)  # (b,) kᵢᵀxᵢ
            rows[layer]["leak"].append((n * x[owner]).sum(-1) / own[owner])
            rows[layer]["cosine"].append(torch.nn.functional.cosine_similarity(b[owner], n, dim=-1))
    return {
        str(layer): {name: quartiles(torch.cat(v)) for name, v in r.items()} | {"pairs": int(sum(len(t) for t in r["leak"]))}
        for layer, r in rows.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact-train.easyedit.json")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    requests = _cases(args.data, args.n)
    out = {"data": args.data, "n": args.n, "batch_size": args.batch_size, "machine": machine(), "models": {}}
    for ref in args.models.split(","):
        out["models"][ref] = leak(ref, requests, args.batch_size)
        for layer, r in out["models"][ref].items():
            print(f"{ref:14s} layer {layer:>2s}  cosine q1/med/q3 {r['cosine']}  leak {r['leak']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
