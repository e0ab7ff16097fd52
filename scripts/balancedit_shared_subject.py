"""BalancEdit on facts that share a subject which opens their prompts, on development data only.

usage: python scripts/balancedit_shared_subject.py [--model smollm2-135m] [--pairs 20] [--first-token 20] [--threads 2]
    [--json FILE]

Two prompts that open with one subject ("{} owner", "{} was created in") read one key at the subject's last token:
a causal model's state there sees only the tokens up to it. From CounterFact's train split (never scored by a
benchmark), the first ``--pairs`` subjects with two such records of different prompts: the first record of every
pair as sequential single edits, then the second of every pair (a feed that meets the subject again later), on
one model, as a stream applies them. Then, per record, whether it holds (the new target's teacher-forced mean
log-probability above the old one's, the stream's check), apart for the first and the second records, and how
many of the second records the editor keyed at their prompt's end (``keyed_at_prompt_end``).

Then, on the same model, the first ``--first-token`` records of that split whose subject is the prompt's first
token (without BOS its state there is the token's alone), as sequential single edits: whether they hold, and
their scopes' diagnostics (the farthest positive, the nearest background token, the value's final NLL).

Run from another checkout (``PYTHONPATH=<checkout> python scripts/...``) it measures that checkout's editor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from editing.keys import locate
from kedit.app.bench import _cases, _corpus_file, editor_on, machine
from kedit.core.facts.schema import normalize
from kedit.core.lm import score_targets


def shared_pairs(requests, n: int):
    """The first ``n`` (first, second) records of one subject that opens both prompts, the prompts different."""
    first, pairs = {}, []
    for r in requests:
        if not r.prompt.startswith("{}"):
            continue
        s = normalize(r.subject)
        if s in first and normalize(first[s].prompt) != normalize(r.prompt):
            pairs.append((first.pop(s), r))
            if len(pairs) == n:
                break
        else:
            first.setdefault(s, r)
    return pairs


def first_token(tok, requests, n: int):
    """The first ``n`` requests whose subject's last token is the prompt's first (no BOS before it)."""
    pos = locate(tok, requests, ("{}",)).subject_pos
    return [r for r, p in zip(requests, pos) if p == 0][:n]


def holds(model, tok, requests) -> list[bool]:
    prompts = [r.text for r in requests]
    new = score_targets(model, tok, prompts, [r.target_new for r in requests]).mean_logprob
    old = score_targets(model, tok, prompts, [r.target_true for r in requests]).mean_logprob
    return (new > old).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact-train.easyedit.json")
    ap.add_argument("--corpus", default="../shared/data/text/wikitext-2-raw.test.txt")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--first-token", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    requests = _cases(args.data, None)
    pairs = shared_pairs(requests, args.pairs)
    model, tok, editor, _ = editor_on(args.model, "balancedit", _corpus_file(args.corpus), None)
    paired = {r.id for pair in pairs for r in pair}
    opening = first_token(tok, [r for r in requests if r.id not in paired], args.first_token)
    keyed_at_end, diag = [], []
    for r in [a for a, _ in pairs] + [b for _, b in pairs] + opening:
        editor.edit([r])
        editor.commit()
        keyed_at_end += editor.diagnostics.get("keyed_at_prompt_end", [0.0])
        diag.append({k: editor.diagnostics[k][0] for k in ("farthest_positive", "nearest_background", "value_nll")})
    firsts = holds(model, tok, [a for a, _ in pairs])
    seconds = holds(model, tok, [b for _, b in pairs])
    opened = holds(model, tok, opening)
    tail = diag[2 * len(pairs) :]
    out = {
        "model": args.model,
        "data": args.data,
        "pairs": len(pairs),
        "first_records_hold": sum(firsts) / len(pairs),
        "second_records_hold": sum(seconds) / len(pairs),
        "second_records_keyed_at_prompt_end": sum(keyed_at_end[len(pairs) : 2 * len(pairs)]),
        "first_token_subjects": len(opening),
        "first_token_subjects_hold": sum(opened) / max(len(opening), 1),
        "first_token_subjects_keyed_at_prompt_end": sum(keyed_at_end[2 * len(pairs) :]),
        "first_token_subjects_mean": {k: sum(d[k] for d in tail) / max(len(tail), 1) for k in tail[0]} if tail else {},
        "rows": [
            {"subject": a.subject, "first": a.prompt, "second": b.prompt, "first_holds": f, "second_holds": s}
            for (a, b), f, s in zip(pairs, firsts, seconds)
        ],
        "first_token_rows": [
            {"subject": r.subject, "prompt": r.prompt, "holds": h} | d for r, h, d in zip(opening, opened, tail)
        ],
        "machine": machine(),
    }
    print(json.dumps({k: v for k, v in out.items() if k not in ("rows", "first_token_rows", "machine")}))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
