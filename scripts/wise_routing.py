"""Where WISE's router sends unrelated text to the side memory, on development records only.

usage: python scripts/wise_routing.py [--n 8] [--threads 2] [--json FILE] SETTING [SETTING ...]

Each SETTING is a JSON object of WISE preset overrides (``'{}'`` for the preset, ``'{"null_space": {"leak": 0.01}}'``).
Per setting, on a fresh model: zsRE records 900.. (after every record a WISE table in docs/benchmarks.md reports) as
``n`` sequential single edits, each edit's Δact on its own tokens (the smallest) and the largest on the unrelated
texts it trained against, and its target's NLL; then, on the 30 unrelated questions of records 900-929:

- kedit's per-token routing: the share of questions with some token past ε, of their tokens, the positions of the
  routed tokens, and quantiles of the largest Δact per token;
- WISE's own routing, a whole input on its mean Δact: the share of unrelated questions, edit prompts and their
  rephrasings whose mean is past ε;
- each rule a side memory can be installed with (``router.mode``: a token's own Δact, its sequence's running mean,
  its running max), each with the threshold that rule would set on this memory (act_ratio times the least value
  the rule gives an edit's own tokens: the bare prompt's last token and the answer's), judged at the question's last
  token (where its answer is read) and at any token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from editing.hooks import capture
from kedit.app.bench import _cases, _corpus_file, editor_on, machine, scored_texts
from kedit.core.lm import encode_pairs, encode_prompts, pad_batch, pad_id_of
from kedit.core.paths import default_corpus
from kedit.core.routing import causal

ZSRE = "../shared/data/zsre/zsre_eval_1037.json"


def memory_acts(model, tok, editor, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, memories) each memory's Δact at each token (0 on padding), and the real tokens (B, T)."""
    memory = model.get_submodule(editor.path())
    input_ids, mask, positions, _ = pad_batch(ids, pad_id_of(tok), "right", "cpu")
    with torch.no_grad(), capture(model, [editor.path()], "input") as seen:
        model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
    return memory.activations(seen[editor.path()])[1] * mask[..., None], mask.bool()


def rules(model, tok, editor, reqs, acts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Per routing rule (token, mean, max): its threshold on this memory, and per group of texts the share routed
    at the last token and at any token."""
    ratio = editor.hparams.router.act_ratio
    enc = encode_pairs(tok, [r.text for r in reqs], [r.target_new for r in reqs])
    own, _ = memory_acts(model, tok, editor, enc.ids)
    out = {}
    for how in ("token", "mean", "max"):
        stat = (lambda a: a.amax(-1)) if how == "token" else (lambda a, how=how: causal(a, how).amax(-1))
        s = stat(own)  # (n, T): each memory's statistic, the largest memory's
        eps = ratio * min(float(s[b, p - 1 : p - 1 + t].min()) for b, (p, t) in enumerate(zip(enc.n_prompt, enc.n_target)))
        row = {"threshold": eps}
        for name, (act, real) in acts.items():
            v, last = stat(act), real.sum(-1) - 1
            row[f"{name}_last_token"] = float((v[torch.arange(len(v)), last] > eps).float().mean())
            row[f"{name}_any_token"] = float(((v > eps) & real).any(-1).float().mean())
        out[how] = row
    return out


def routing(model, editor, acts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The installed threshold: per-token routing on the unrelated questions, and each group's whole-input mean."""
    eps = float(model.get_submodule(editor.path()).threshold())
    largest = {name: (a.amax(-1), m) for name, (a, m) in acts.items()}  # (B, T): the largest memory's Δact
    act, real = largest["unrelated"]
    hit = (act > eps) & real
    out = {"threshold": eps, "unrelated_routed_per_token": float(hit.any(-1).float().mean())}
    out["tokens_routed"] = float(hit.sum() / real.sum())
    out["routed_positions"] = torch.bincount(hit.nonzero()[:, 1], minlength=16)[:16].tolist()
    out["act_quantiles_50_90_99_100"] = torch.quantile(act[real], torch.tensor([0.5, 0.9, 0.99, 1.0])).tolist()
    for name, (a, m) in largest.items():
        mean = a.sum(-1) / m.sum(-1)  # (B,)
        out[f"{name}_mean_past_threshold"] = float((mean > eps).float().mean())
        out[f"{name}_any_token_past_threshold"] = float(((a > eps) & m).any(-1).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("settings", nargs="+", type=json.loads)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = _cases(ZSRE, max(30, args.n), 900)
    reqs = cases[: args.n]
    unrelated = [nb.prompt for r in cases[:30] for nb in r.neighborhood]
    out = {"n": args.n, "records": "zsre 900..", "settings": [], "machine": machine()}
    for overrides in args.settings:
        model, tok, editor, _ = editor_on("smollm2-135m", "wise", _corpus_file(default_corpus()), overrides)
        editor.held_out = scored_texts(reqs)
        edits = []
        for r in reqs:
            editor.edit([r])
            editor.commit()
            d = editor.diagnostics
            edits.append(
                {"edit_act_min": d["edit_act"][0], "unrelated_act_max": d["unrelated_act_max"][0], "nll": d["value_nll"][0]}
            )
        groups = {"unrelated": unrelated, "edit_prompts": [r.text for r in reqs]}
        groups["rephrasings"] = [p for r in reqs for p in r.paraphrase_prompts]
        acts = {name: memory_acts(model, tok, editor, encode_prompts(tok, t)) for name, t in groups.items()}  # one pass each
        row = {"overrides": overrides, "edits": edits, **routing(model, editor, acts)}
        row["rules"] = rules(model, tok, editor, reqs, acts)
        out["settings"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "edits"}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
