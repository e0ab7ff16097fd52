"""The MEMIT family's target optimization alone, on development records, under several target settings.

usage: python scripts/target_steps.py [--method memit] [--n 40] [--batch-size 10] [--threads 2] [--json FILE] SETTING ...

Each SETTING is a JSON object of ``targets`` overrides (``'{"optimizer": "normalized", "step_size": 0.05}'``; ``'{}'``
for the preset). Per setting, the first ``--n`` records of CounterFact's train split (never scored by a benchmark)
are optimized in batches of ``--batch-size`` on the unedited model (the target phase of an edit, without the solve),
and the script reports the steps per request (mean and max), how many requests ended above the stopping loss, the
final NLL, ‖δ‖ / ‖h‖ (the target vector's size against the output it is added to) and the seconds. The same model
serves every setting, so the seconds are comparable within one run.
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


def run(editor, requests, batch_size: int, overrides: dict) -> dict:
    cfg = editor.target_config().model_copy(update=overrides)
    path = editor.target_path()
    steps, nll, ratio = [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        t = optimize_targets(
            editor.model,
            editor.tok,
            editor.spec,
            requests[i : i + batch_size],
            editor.templates(),
            [path],
            editor.hparams.layers[-1],
            cfg,
            step_scale=editor.step_scale(cfg),
        )
        steps.append(t.steps.float())
        nll.append(t.nll)
        ratio.append((t.deltas[path].norm(dim=-1) / t.originals[path].norm(dim=-1)).cpu())
    seconds = time.perf_counter() - t0
    steps, nll, ratio = torch.cat(steps), torch.cat(nll), torch.cat(ratio)
    return {
        "targets": overrides,
        "seconds": seconds,
        "steps_mean": float(steps.mean()),
        "steps_max": float(steps.max()),
        "above_stop": int((nll > cfg.stop_loss).sum()),
        "nll_mean": float(nll.mean()),
        "delta_over_h_mean": float(ratio.mean()),
        "delta_over_h_max": float(ratio.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("settings", nargs="+", type=json.loads)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact-train.easyedit.json")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    editor = make_editor(args.method, model, tok)
    editor.templates()  # generated once, outside every setting's seconds
    requests = _cases(args.data, args.n)
    rows = []
    for setting in args.settings:
        rows.append(run(editor, requests, args.batch_size, setting))
        print(json.dumps(rows[-1]), flush=True)
    out = {"model": args.model, "method": args.method, "data": args.data, "n": args.n, "batch_size": args.batch_size}
    out |= {"threads": args.threads, "machine": machine(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
