"""BalancEdit's value settings on development data only: steps, zsRE scores and free-text fluency per setting.

usage: python scripts/balancedit_values.py [--model smollm2-135m] [--threads 1] [--json FILE] SETTING [SETTING ...]

Each SETTING is a JSON object of BalancEdit preset overrides (``'{"value": {"lr": 8.0, "clamp_norm": 4.0}}'``;
``'{}'`` for the preset). Per setting, on a fresh copy of the model:

- zsRE records 900-929 (after the first 900, which the benchmarks report) as 30 sequential single edits: the
  value optimization's mean steps, then reliability, generalization and generalization where the subject is the
  record's own (teacher-forced, the bench's zsRE protocol; no benchmark figure comes from these records);
- CounterFact's train split, records 0-29 (never scored by a benchmark), as 30 sequential single edits, then free
  text: greedy 40 tokens after "<subject> is" for each edited subject, scored by ROME's n-gram entropy
  (``fluency``; the unedited model's is printed first) and by the share that names the new target (``bleed``).

A larger value moves the subject's state further: more rephrasings answer the new target, and past some size the
subject's free text repeats it (the fluency falls). Seconds are not reported: the step count is what a setting
changes, and the seconds per step are the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from editing import make_editor
from evaluation.metrics import ngram_entropy, zsre_metrics
from kedit.app.bench import _cases, machine, scored_texts
from kedit.core.lm import greedy_generate
from kedit.core.models import load_model


def edited(model_ref: str, requests, overrides: dict):
    """The model after ``requests`` as sequential single BalancEdit edits, and the mean value steps."""
    model, tok = load_model(model_ref)
    editor = make_editor("balancedit", model, tok, overrides)
    editor.held_out = scored_texts(requests)
    steps = []
    for r in requests:
        editor.edit([r])
        editor.commit()
        steps += editor.diagnostics["value_steps"]
    return model, tok, sum(steps) / len(steps)


def free_text(model, tok, requests) -> dict[str, float]:
    gens = greedy_generate(model, tok, [f"{r.subject} is" for r in requests], max_new_tokens=40)
    return {
        "fluency": sum(ngram_entropy(g) for g in gens) / len(gens),
        "bleed": sum(r.target_new.lower() in g.lower() for r, g in zip(requests, gens)) / len(gens),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("settings", nargs="+", type=json.loads)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--zsre", default="../shared/data/zsre/zsre_eval_1037.json")
    ap.add_argument("--cf-train", default="../shared/data/counterfact/counterfact-train.easyedit.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zsre = _cases(args.zsre, 930)[900:930]
    cf = _cases(args.cf_train, 30)
    model, tok = load_model(args.model)
    out = {"unedited": free_text(model, tok, cf), "settings": [], "machine": machine()}
    print(json.dumps({"unedited": out["unedited"]}), flush=True)
    for overrides in args.settings:
        model, tok, steps = edited(args.model, zsre, overrides)
        m = zsre_metrics(model, tok, zsre)
        row = {
            "overrides": overrides,
            "zsre_900_929": {"steps": steps}
            | {k: m[k] for k in ("efficacy", "generalization", "generalization_distinct_subject")},
        }
        model, tok, _ = edited(args.model, cf, overrides)
        row["cf_train_0_29"] = free_text(model, tok, cf)
        out["settings"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
