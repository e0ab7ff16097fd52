"""Constrained fine-tuning of a few weight matrices; the result is returned as a dense difference."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kedit.core.facts import EditRequest
from kedit.core.lm import encode_pairs, model_device, pad_batch, pad_id_of


def tune(
    model: nn.Module,
    names: Sequence[str],
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    linf: float | None,
) -> dict[str, torch.Tensor]:
    """Adam on the named parameters only; after each step each stays within ``linf`` of its start.

    Returns the fp32 differences and leaves the weights as they were: the caller applies the
    differences as a delta, so the edit is reproducible from what is stored.
    """
    params = [model.get_parameter(n) for n in names]
    start = [p.detach().clone() for p in params]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for _ in range(steps):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
            if linf is not None:
                with torch.no_grad():
                    for p, p0 in zip(params, start):
                        p.copy_(torch.clamp(p, p0 - linf, p0 + linf))
        diffs = {n: (p.detach().float() - p0.float()) for n, p, p0 in zip(names, params, start)}
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        for p, f in flags:
            p.requires_grad_(f)
    return diffs


def target_batch(tokenizer, requests: Sequence[EditRequest], device: torch.device):
    """Padded prompt+target rows and, per target token, (row, predicting column, label)."""
    enc = encode_pairs(tokenizer, [r.text for r in requests], [r.target_new for r in requests])
    input_ids, mask, positions, _ = pad_batch(enc.ids, pad_id_of(tokenizer), "right", device)
    lens = torch.tensor(enc.n_target)
    rows = torch.repeat_interleave(torch.arange(len(requests)), lens).to(device)
    cols = torch.cat([torch.arange(p - 1, p - 1 + t) for p, t in zip(enc.n_prompt, enc.n_target)]).to(device)
    last = torch.tensor(enc.n_prompt, device=device) - 1  # (n,) last prompt position per row
    return input_ids, mask, positions, rows, cols, input_ids[rows, cols + 1], last


__all__ = ["model_device", "target_batch", "tune"]
