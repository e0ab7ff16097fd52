"""Where a MEND single edit's time goes, part by part (run it with nothing else on the machine).

usage: python scripts/mend_parts.py [--model smollm2-135m] [--n 40] [--threads 2] [--data FILE]

The network is an untrained one of the preset's shape: the parts cost the same for any weights. Each request is
edited twice: once part by part (the frozen copy's forward, the forward and backward from the first edited block,
the network, the low-rank updates), once through ``Editor.edit`` (everything, reverted after), and the means in
milliseconds are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from editing import make_editor
from editing.base import linear_update
from editing.finetune import model_device, target_batch
from editing.mend.mend import MEND, MENDNetwork
from kedit.app.bench import _cases
from kedit.core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact_500.rome.json")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    editor = make_editor("mend", model, tok, None, assets={"network": None})
    editor.network = MENDNetwork(MEND.new_network(model, editor.hparams), {})
    net = editor.network.net.eval()
    requests = _cases(args.data, args.n + 3)
    for r in requests[:3]:  # warm: the frozen copy is built, the kernels chosen
        editor.edit([r])
        editor.revert()
    totals: dict[str, float] = {}

    def timed(part: str, fn):
        t0 = time.perf_counter()
        out = fn()
        totals[part] = totals.get(part, 0.0) + time.perf_counter() - t0
        return out

    for r in requests[3:]:
        batch = timed("batch", lambda r=r: target_batch(tok, [r], model_device(model)))
        copies = timed("freshness check", editor._frozen_copies)
        starts = timed("stem forward (frozen copy)", lambda b=batch, c=copies: editor._stem_input(c["stem"], b))
        head = editor._head(copies["head"])
        factors = timed(
            "edited blocks and head, forward and backward", lambda b=batch, s=starts, h=head: editor._factors(b, s, h)
        )
        updates = timed("network", lambda f=factors: net.updates(f))
        timed(
            "low-rank factors",
            lambda u=updates: [linear_update(model.get_submodule(p), o.contiguous(), i.contiguous()) for p, (o, i) in u.items()],
        )
        timed("Editor.edit (all of it)", lambda r=r: editor.edit([r]))
        editor.revert()
    ms = {k: round(v / args.n * 1000, 2) for k, v in totals.items()}
    print(json.dumps({"model": args.model, "n": args.n, "threads": args.threads, "ms_per_edit": ms}, indent=2))


if __name__ == "__main__":
    main()
