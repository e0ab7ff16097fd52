"""Where a BalancEdit edit's time goes: per edit, the value optimization's NLL at every step, on development data.

usage: python scripts/balancedit_steps.py [--model smollm2-135m] [--n 30] [--threads 2] [--json FILE]

zsRE records 900-(900+n) (after the first 900, which the benchmarks report) as sequential single edits with the
llama preset. Per edit: its seconds and the mean NLL of target_new over the value's rows at each step (read from
``editing.targets.average_by_owner``, which every step calls once; nothing is changed). Then, for several stopping
losses, the mean number of steps the same trajectories would have taken to reach it: whether the steps go to the
descent or to the tail.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import editing.targets as targets
from editing import make_editor
from kedit.app.bench import _cases, machine, scored_texts
from kedit.core.models import load_model

STOPS = (0.05, 0.1, 0.2, 0.5, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--zsre", default="../shared/data/zsre/zsre_eval_1037.json")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    requests = _cases(args.zsre, 900 + args.n)[900:]
    model, tok = load_model(args.model)
    editor = make_editor("balancedit", model, tok, {})
    editor.held_out = scored_texts(requests)
    trace: list[float] = []
    average = targets.average_by_owner

    def recorded(*a, **k):  # one call per step: the requests' mean NLL over their rows
        out = average(*a, **k)
        trace.append(float(out.detach()[0]))
        return out

    targets.average_by_owner = recorded
    edits = []
    for r in requests:
        trace.clear()
        t0 = time.perf_counter()
        editor.edit([r])
        editor.commit()
        edits.append({"seconds": time.perf_counter() - t0, "steps": len(trace) - 1, "nll": list(trace)})
        print(f"{edits[-1]['seconds']:.2f} s, {edits[-1]['steps']} steps: " + " ".join(f"{x:.2f}" for x in trace), flush=True)
    targets.average_by_owner = average
    steps_to = {
        str(s): sum(next((i for i, x in enumerate(e["nll"]) if x < s), len(e["nll"]) - 1) for e in edits) / len(edits)
        for s in STOPS
    }
    seconds = sum(e["seconds"] for e in edits)
    steps = sum(e["steps"] for e in edits)
    out = {"model": args.model, "records": [900, 900 + args.n], "seconds_per_edit": seconds / len(edits)}
    out |= {"mean_steps": steps / len(edits), "seconds_per_step": seconds / max(steps, 1), "steps_to_stop": steps_to}
    out |= {"edits": edits, "machine": machine()}
    print(json.dumps({k: v for k, v in out.items() if k not in ("edits", "machine")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
