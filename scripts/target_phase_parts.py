"""Parts of one MEMIT target phase, fp32 against the bf16 copy: the figures docs/benchmarks.md gives for
"The steps on a bf16 copy, now the preset".

usage: python scripts/target_phase_parts.py [--model smollm2-135m] [--threads 2] [--json FILE]

- ``step_s``: seconds per optimization step with 1, 2, 4 and 8 requests of CounterFact's train split (never scored
  by a benchmark) in one batch, every request running all 10 steps (stop loss below zero), the batch's set-up
  (copy and first forward, timed apart) taken off.
- ``setup_s``: the set-up alone for a batch of 10 (no step): tokenizing, the copy (bf16) and the unedited forward.
- ``copy_s``: the bf16 copy as ``low_precision_copy`` makes it, against a deepcopy in fp32 converted after (how it was made
  before), and whether the two hold the same tensors.
- ``key_read_tokens``: the token slots the key reads run for the first 20 CounterFact records over the preset's
  templates, each row run to its end (before) against stopped at the subject's last token (now).
Each timing is the fastest of ``--repeat``; nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from copy import deepcopy
from pathlib import Path

import torch

from editing import make_editor
from editing.keys import locate
from editing.targets import optimize_targets
from kedit.app.bench import _cases, machine
from kedit.core.models import load_model
from kedit.core.precision import low_precision_copy

TRAIN = "../shared/data/counterfact/counterfact-train.easyedit.json"
EVAL = "../shared/data/counterfact/counterfact_500.rome.json"


def fastest(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    editor = make_editor("memit", model, tok)
    templates = editor.templates()
    path, top = editor.target_path(), editor.hparams.layers[-1]
    train = _cases(TRAIN, 10)

    def phase(requests, precision: str, steps: int):
        cfg = editor.target_config().model_copy(update={"steps": steps, "stop_loss": -1.0, "precision": precision})
        return lambda: optimize_targets(model, tok, editor.spec, requests, templates, [path], top, cfg)

    out = {"model": args.model, "threads": args.threads, "repeat": args.repeat, "step_s": {}, "setup_s": {}}
    for precision in ("model", "bfloat16"):
        out["setup_s"][precision] = fastest(phase(train, precision, 0), args.repeat)
        out["step_s"][precision] = {}
        for k in (1, 2, 4, 8):
            setup = fastest(phase(train[:k], precision, 0), args.repeat)
            ten = fastest(phase(train[:k], precision, 10), args.repeat)
            out["step_s"][precision][k] = (ten - setup) / 10
        print(json.dumps({precision: out["step_s"][precision], "setup_s": out["setup_s"][precision]}), flush=True)

    old = deepcopy(model).to(torch.bfloat16)
    new = low_precision_copy(model, torch.bfloat16)
    same = all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    out["copy_s"] = {
        "now": fastest(lambda: low_precision_copy(model, torch.bfloat16), args.repeat + 1),
        "before": fastest(lambda: deepcopy(model).to(torch.bfloat16), args.repeat + 1),
        "same_tensors": same,
    }
    loc = locate(tok, _cases(EVAL, 20), templates)
    full = [len(x) for x in loc.ids]
    cut = [s + 1 for s in loc.subject_pos]
    out["key_read_tokens"] = {
        "rows": len(full),
        "before": {"tokens": sum(full), "padded_slots": len(full) * max(full)},
        "now": {"tokens": sum(cut), "padded_slots": len(cut) * max(cut)},
    }
    out["machine"] = machine()
    print(json.dumps({k: out[k] for k in ("copy_s", "key_read_tokens")}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
