"""A target-vector editor's single edits with its steps' attention on the model's own implementation against the
plain path (``attention: auto`` where the steps run in bf16 on a CPU), alternated on the same requests (run it
with nothing else on the machine).

usage: python scripts/target_attention.py [--editor balancedit] [--key value] [--model smollm2-135m] [--n 10]
    [--threads 2] [--data FILE] [--json FILE]

``--key``: where the editor's hparams hold its target settings (BalancEdit and GRACE: ``value``). Each request is
edited once by each setting, in alternating order, on the unedited model (the edit is reverted after); the means
in seconds, their ratio, and the value optimization's steps and final NLL under each are printed as JSON. The two
settings round differently, so their optimizations take different paths to the same stopping loss: steps and
NLL are there to show what the seconds bought.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from editing import make_editor
from kedit.app.bench import _cases, machine
from kedit.core.models import load_model

SETTINGS = ("model", "auto")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--editor", default="balancedit")
    ap.add_argument("--key", default="value")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/zsre/zsre_eval_1037.json")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    editors = {s: make_editor(args.editor, model, tok, {f"{args.key}.attention": s}) for s in SETTINGS}
    requests = _cases(args.data, args.n + 1)
    for editor in editors.values():  # warm: templates generated, kernels chosen
        editor.edit(requests[:1])
        editor.revert()
    seconds: dict[str, list[float]] = {s: [] for s in SETTINGS}
    steps: dict[str, list[float]] = {s: [] for s in SETTINGS}
    nll: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for i, r in enumerate(requests[1:]):
        for s in SETTINGS if i % 2 == 0 else SETTINGS[::-1]:
            editor = editors[s]
            t0 = time.perf_counter()
            editor.edit([r])
            seconds[s].append(time.perf_counter() - t0)
            editor.revert()
            steps[s] += editor.diagnostics.get("value_steps", [])
            nll[s] += editor.diagnostics.get("value_nll", [])
    out = {
        "editor": args.editor,
        "model": args.model,
        "data": args.data,
        "n": args.n,
        "machine": machine(),
        "seconds_per_edit": {s: statistics.mean(v) for s, v in seconds.items()},
        "ratio_model_over_auto": sum(seconds["model"]) / sum(seconds["auto"]),
        "value_steps": {s: statistics.mean(v) if v else None for s, v in steps.items()},
        "value_nll": {s: statistics.mean(v) if v else None for s, v in nll.items()},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
