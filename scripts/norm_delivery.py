"""Whether a MEMIT edit delivers the residual change its target asks for, and what a post-MLP norm does to it.

usage: python scripts/norm_delivery.py [--models smollm2-135m,gemma3-270m] [--lrs 0.5,5.0] [--set JSON] [--no-norm] [--json FILE]

On the first 10 records of CounterFact's train split (never scored by a benchmark), as one batch, with the MEMIT
preset of each model:

- ``delivery``: per target learning rate (``--lrs``) and per map through the post-MLP norm (``first_order``, the
  one MEMIT uses: ``editing.keys.residual_to_mlp_output``; ``exact``, defined here: the multiple of (y + Δy) / g
  nearest m, which reaches the point of the norm's surface on the ray of y + Δy), the target's size ‖δ‖ / ‖h‖ and
  RMS of h at the top edited block, then after the edit the change h_after − h0 there against the wanted δ:
  its share along δ, and its cosine with δ (1: exactly the change asked for). Without a post-MLP norm (Llama) the
  maps are the identity and only ``first_order`` is run;
- ``norm`` (models with a post-MLP norm): per edited layer, on the unedited model, δ asked of that layer alone at a
  fifth (the first layer's share) and in full: ‖Δy‖ / ‖y‖, the ‖Δm‖ / ‖m‖ each map asks of the MLP's output, and the
  cosine and share along Δy of the change the norm then makes, y(m + Δm) − y(m).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import editing.memit.memit as memit_module
from editing.keys import _post_norm, read_at_subject, residual_to_mlp_output
from kedit.app.bench import _cases, editor_on, machine
from kedit.core.paths import default_corpus

F = torch.nn.functional


@torch.no_grad()
def exact_map(model, tokenizer, spec, layer, requests, resid):
    """Δm with y(m + Δm) the point of the norm's surface rms(y / g) = 1 on the ray of y + Δy; the least such change."""
    if spec.mlp_post_norm is None:
        return resid
    gain, rms, dead = _post_norm(model, tokenizer, spec, layer, requests)
    path = spec.module_path("mlp_out", layer)
    m = read_at_subject(model, tokenizer, requests, ("{}",), [path], "output")[path]  # (n, d)
    u = torch.where(dead, m / rms, (gain * m / rms + resid) / torch.where(dead, torch.ones_like(gain), gain))
    scale = (u * m).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True)  # (n, 1) the multiple nearest m
    return torch.where(dead, torch.zeros_like(m), scale * u - m)


MAPS = {"first_order": residual_to_mlp_output, "exact": exact_map}


def stats(got: torch.Tensor, want: torch.Tensor) -> dict:
    along = (got * want).sum(-1) / want.pow(2).sum(-1)  # (n,)
    return {"along": round(float(along.mean()), 3), "along_min": round(float(along.min()), 3),
            "cosine": round(float(F.cosine_similarity(got, want, dim=-1).mean()), 3)}  # fmt: skip


def delivery(model_ref: str, requests: list, lr: float, map_name: str, overrides: dict) -> dict:
    over = {"targets.lr": lr, **overrides}
    model, tok, editor, _ = editor_on(model_ref, "memit", str(default_corpus() or "") or None, over)
    top = editor.target_path()
    seen = {}
    wanted = editor.targets

    def targets(reqs, h0):  # what the edit asks at the top: z - h0
        z = wanted(reqs, h0)
        seen["h0"], seen["delta"] = h0.clone(), (z - h0).clone()
        return z

    editor.targets = targets
    memit_module.residual_to_mlp_output = MAPS[map_name]  # the map MEMIT's at_layer calls
    try:
        editor.edit(requests)
    finally:
        memit_module.residual_to_mlp_output = residual_to_mlp_output
    h1 = read_at_subject(model, tok, requests, ("{}",), [top], "output")[top]
    h0, delta = seen["h0"], seen["delta"]
    size = float((delta.norm(dim=-1) / h0.norm(dim=-1)).mean())
    rms_h = float(h0.pow(2).mean(-1).sqrt().mean())
    row = {"lr": lr, "map": map_name, "overrides": overrides, "post_norm": editor.spec.mlp_post_norm is not None}
    row |= {"delta_over_h": round(size, 4), "rms_h": round(rms_h, 1)}
    return row | stats(h1 - h0, delta)


@torch.no_grad()
def norm_errors(model_ref: str, requests: list) -> list[dict]:
    model, tok, editor, _ = editor_on(model_ref, "memit", str(default_corpus() or "") or None, None)
    spec = editor.spec
    with torch.enable_grad():
        delta = editor.compute_targets(requests)  # (n, d) the preset's δ at the top
    rows = []
    for layer in editor.hparams.layers:
        path = spec.module_path("mlp_out", layer)
        m = read_at_subject(model, tok, requests, ("{}",), [path], "output")[path]
        norm = model.get_submodule(f"{spec.block(layer)}.{spec.mlp_post_norm}")
        y = norm(m)
        for share in (0.2, 1.0):
            dy = delta * share
            for name, fn in MAPS.items():
                dm = fn(model, tok, spec, layer, requests, dy)
                row = {"layer": layer, "share": share, "map": name}
                row |= {"dy_over_y": round(float((dy.norm(dim=-1) / y.norm(dim=-1)).mean()), 3)}
                row |= {"dm_over_m": round(float((dm.norm(dim=-1) / m.norm(dim=-1)).mean()), 3)}
                rows.append(row | stats(norm(m + dm) - y, dy))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--lrs", default="0.5,5.0")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact-train.easyedit.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", type=json.loads, default={}, help='more MEMIT overrides, e.g. \'{"targets.step_scale": "gain"}\'')
    ap.add_argument("--no-norm", action="store_true", help="skip the per-layer table")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    requests = _cases(args.data, 10)
    out = {"data": args.data, "n": 10, "machine": machine(), "models": {}}
    for ref in args.models.split(","):
        got = out["models"][ref] = {"delivery": [], "norm": []}
        has_norm = None  # the first run says: without a post-MLP norm the maps are the identity, run once
        for lr in (float(x) for x in args.lrs.split(",")):
            for name in MAPS:
                if name != "first_order" and not has_norm:
                    continue
                got["delivery"].append(delivery(ref, requests, lr, name, args.set))
                has_norm = got["delivery"][-1]["post_norm"]
                print(ref, json.dumps(got["delivery"][-1]), flush=True)
        if has_norm and not args.no_norm:
            got["norm"] = norm_errors(ref, requests)
            for row in got["norm"]:
                print(ref, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
