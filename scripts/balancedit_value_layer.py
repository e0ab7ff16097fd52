"""What BalancEdit's value would cost at a later layer than its key: steps and seconds per value, per layer.

usage: python scripts/balancedit_value_layer.py [--model smollm2-135m] [--n 15] [--threads 2] [--json FILE] LAYER [LAYER ...]

A whole codebook's key and value sit at one layer (4 on SmolLM2): the key there is where a fact's rephrasings
lie nearest (docs/benchmarks.md, `kedit bench scope`), and the value is trained through every block above it. A
split codebook (``value_layer``) keeps the key and writes the value higher; this script measured what that saves. Per
LAYER, on development records only (zsRE 900-(900+n), after the first 900 the benchmarks report), each record's
value is trained alone with the preset's value settings, templates and frames at that layer's MLP output, as
BalancEdit trains it (``optimize_targets(..., replace=True)``) on the unedited model: mean steps, seconds per value
(wall and process CPU: a shared CPU's steal shows in the first, less in the second) and the largest final NLL.
No codebook is written and no edit is scored: this measures the training's cost only, not what a value at another
layer than the key would do to the scores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from editing import make_editor
from editing.targets import optimize_targets
from kedit.app.bench import _cases, machine
from kedit.core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("layers", type=int, nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--zsre", default="../shared/data/zsre/zsre_eval_1037.json")
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    requests = _cases(args.zsre, 900 + args.n)[900:]
    model, tok = load_model(args.model)
    editor = make_editor("balancedit", model, tok, {})
    templates = editor.templates() + editor.hparams.frames
    rows = []
    for layer in args.layers:
        path = editor.spec.module_path("mlp_out", layer)
        wall, cpu = time.perf_counter(), time.process_time()
        value = editor.hparams.value
        fits = [optimize_targets(model, tok, editor.spec, [r], templates, [path], layer, value, replace=True) for r in requests]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        steps = sum(int(t.steps.sum()) for t in fits)
        row = {"layer": layer, "path": path, "mean_steps": steps / len(requests), "seconds_per_value": wall / len(requests)}
        row |= {"cpu_seconds_per_value": cpu / len(requests), "max_nll": max(float(t.nll.max()) for t in fits)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        out = {"model": args.model, "records": [900, 900 + args.n], "rows": rows, "machine": machine()}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
