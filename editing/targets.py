"""Target vectors (ROME's v*, MEMIT's z), optimized for all requests of a batch jointly.

One residual δ per request and per module is added to the module's output at the subject's
last token. The loss per request is the NLL of ``target_new`` after the prompt in every context
template, plus a KL term keeping the subject's "essence" prompt unchanged, plus a weight decay
on ‖δ‖. Requests' losses are summed: each δ only reaches its own rows, so the joint problem is
the per-request problems side by side (Adam is elementwise), in one forward and backward per
step. The weights are frozen, the blocks below the first edited module run once, and a request
stops (its δ frozen) once its NLL is below ``stop_loss``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from kedit.core.arch import ArchSpec
from kedit.core.facts import EditRequest
from kedit.core.lm import encode_pairs, logits_at, model_device, pad_batch, pad_id_of

from .hooks import capture, edit_output, frozen, output_kind, start_at_block
from .hparams import TargetHyperParams
from .keys import average_by_owner, fill, locate

log = logging.getLogger(__name__)


@dataclass
class Targets:
    deltas: dict[str, torch.Tensor]  # module path -> (n, d) fp32
    originals: dict[str, torch.Tensor]  # module path -> (n, d) output at the subject (template "{}")
    nll: torch.Tensor  # (n,) final NLL per request
    steps: torch.Tensor  # (n,) steps each request ran


def _batch(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str], kl_prompt: str | None):
    """Rows: every (template, request) with target_new appended, then one KL row per request (none without
    a KL term: a method that trains without it, GRACE's values, does not pay for those rows' forwards)."""
    n = len(requests)
    loc = locate(tokenizer, requests, templates)
    texts = [fill(t, r)[0] for t in templates for r in requests]
    enc = encode_pairs(tokenizer, texts, [requests[i].target_new for i in loc.owner])
    ids, subject_pos, owner = enc.ids, loc.subject_pos, loc.owner
    if kl_prompt is not None:
        kl = locate(tokenizer, [EditRequest(r.id, r.subject, kl_prompt, "x") for r in requests], ["{}"])
        ids, subject_pos, owner = ids + kl.ids, subject_pos + kl.subject_pos, owner + list(range(n))
    return ids, enc.n_prompt, enc.n_target, subject_pos, owner, len(enc.ids)


@dataclass
class _Live:
    """The rows of the requests still optimizing, re-indexed densely (R' rows, T' columns)."""

    input_ids: torch.Tensor  # (R', T')
    mask: torch.Tensor
    positions: torch.Tensor
    hidden: torch.Tensor  # (R', T', d): the first edited block's input, computed once
    cols: torch.Tensor  # (R',) subject's last token
    own: torch.Tensor  # (R',) request of each row
    t_rows: torch.Tensor  # (N',) target tokens: live row, column, label, rewrite row in the full batch
    t_cols: torch.Tensor
    t_labels: torch.Tensor
    t_rw: torch.Tensor
    kl_rows: torch.Tensor  # (n',) one KL row per live request
    kl_cols: torch.Tensor
    kl_req: torch.Tensor  # (n',) which requests


def optimize_targets(
    model: nn.Module,
    tokenizer,
    spec: ArchSpec,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    paths: Sequence[str],
    first_block: int,
    cfg: TargetHyperParams,
) -> Targets:
    """Jointly optimize one δ per request for each module in ``paths`` (all in blocks >= first_block).

    A request that reaches ``stop_loss`` leaves the batch: its rows are dropped from later forwards,
    so the joint run does the per-request loop's arithmetic, not n rows for the slowest request's steps.
    """
    n = len(requests)
    device = model_device(model)
    kl_prompt = cfg.kl_prompt if cfg.kl_factor > 0 else None
    ids, n_prompt, n_target, subject_pos, owner, n_rw = _batch(tokenizer, requests, templates, kl_prompt)
    input_ids, mask, positions, _ = pad_batch(ids, pad_id_of(tokenizer), "right", device)
    n_rows = len(ids)
    cols = torch.tensor(subject_pos, device=device)
    own = torch.tensor(owner, device=device)

    # target-token positions of the rewrite rows: token j of row b is predicted at n_prompt[b] - 1 + j
    lens = torch.tensor(n_target, device=device)
    t_rows = torch.repeat_interleave(torch.arange(n_rw, device=device), lens)
    t_cols = torch.cat([torch.arange(p - 1, p - 1 + t) for p, t in zip(n_prompt, n_target)]).to(device)
    t_labels = input_ids[t_rows, t_cols + 1]
    kl_rows = torch.arange(n_rw, n_rows, device=device)
    kl_cols = mask[n_rw:].sum(-1) - 1  # last real token of each KL row

    blocks_path = spec.blocks
    with torch.no_grad(), output_kind(model, spec.block(first_block)) as kind, capture(model, list(paths), "output") as out0:
        with capture(model, [spec.block(first_block)], "input") as in0:
            base_kl_logits = logits_at(model, input_ids, mask, positions, kl_rows, kl_cols)  # (n, V)
    hidden_in = in0[spec.block(first_block)].detach()  # (R, T, d)
    returns_tuple = kind["tuple"]
    base_kl = torch.log_softmax(base_kl_logits, -1).detach()  # (n, V)
    all_rows = torch.arange(n_rows, device=device)
    originals_all = {p: out0[p][all_rows, cols].detach().float() for p in paths}  # (R, d)
    originals = {p: originals_all[p][:n_rw][:n] for p in paths}  # template "{}" comes first
    norms = {p: originals[p].norm(dim=-1).clamp(min=1e-6) for p in paths}  # (n,)

    has_kl = n_rows > n_rw

    def live_view(active: torch.Tensor) -> _Live:
        keep = active[own]  # (R,)
        sel = keep.nonzero().squeeze(1)
        remap = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        remap[sel] = torch.arange(len(sel), device=device)
        width = int(mask[sel].sum(-1).max())  # right padding: columns past the longest live row are padding
        t_keep = keep[t_rows]
        return _Live(
            input_ids[sel, :width],
            mask[sel, :width],
            positions[sel, :width],
            hidden_in[sel, :width],
            cols[sel],
            own[sel],
            remap[t_rows[t_keep]],
            t_cols[t_keep],
            t_labels[t_keep],
            t_rows[t_keep],
            remap[kl_rows[active]] if has_kl else kl_rows,
            kl_cols[active] if has_kl else kl_cols,
            active.nonzero().squeeze(1) if has_kl else kl_rows,  # no KL rows: no request has one
        )

    deltas = {p: torch.zeros(n, originals[p].shape[-1], device=device, requires_grad=True) for p in paths}
    opt = torch.optim.Adam(list(deltas.values()), lr=cfg.lr)
    active = torch.ones(n, dtype=torch.bool, device=device)
    live = live_view(active)
    steps = torch.zeros(n, dtype=torch.long)
    nll_req = torch.full((n,), float("inf"), device=device)

    def add_delta(p):
        def fn(out):
            d = deltas[p][live.own].to(out.dtype)  # (R', d)
            rows = torch.arange(len(live.own), device=out.device)
            return out.index_put((rows, live.cols), d, accumulate=True)

        return fn

    with ExitStack() as stack:
        stack.enter_context(frozen(model))
        for p in paths:
            stack.enter_context(edit_output(model, p, add_delta(p)))
        for _ in range(cfg.steps):
            # the LM head only where a loss is taken: target tokens, then the KL rows' last tokens
            with start_at_block(model, blocks_path, first_block, live.hidden, returns_tuple):
                logits = logits_at(
                    model,
                    live.input_ids,
                    live.mask,
                    live.positions,
                    torch.cat([live.t_rows, live.kl_rows]),
                    torch.cat([live.t_cols, live.kl_cols]),
                )
            n_t = len(live.t_rows)
            logp = torch.log_softmax(logits[:n_t], -1)
            tok_nll = -logp.gather(-1, live.t_labels[:, None]).squeeze(-1)  # (N',)
            row_nll = torch.zeros(n_rw, device=device).index_add_(0, live.t_rw, tok_nll) / lens  # (n_rw,)
            # stopped requests keep the NLL they stopped at: their δ no longer changes
            nll_req = torch.where(active, average_by_owner(row_nll, own[:n_rw], n), nll_req.detach())
            kl_logp = torch.log_softmax(logits[n_t:], -1)
            kl_live = torch.nn.functional.kl_div(kl_logp, base_kl[live.kl_req], log_target=True, reduction="none").sum(-1)
            kl = torch.zeros(n, device=device).index_put((live.kl_req,), kl_live)  # (n,)
            decay = sum((deltas[p].norm(dim=-1) / norms[p]) ** 2 for p in paths)
            loss_req = nll_req + cfg.kl_factor * kl + cfg.weight_decay * decay
            still = active & (nll_req.detach() > cfg.stop_loss)
            if not bool(still.any()):
                break
            if not torch.equal(still, active):
                active = still
                live = live_view(active)
            steps += active.cpu().long()
            opt.zero_grad()
            (loss_req * active).sum().backward()
            with torch.no_grad():
                keep = {p: deltas[p].detach().clone() for p in paths}
            opt.step()
            with torch.no_grad():
                for p in paths:
                    d = deltas[p]
                    d[~active] = keep[p][~active]  # finished requests stay where they stopped
                    limit = cfg.clamp_norm * norms[p]
                    scale = (limit / d.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)
                    d.mul_(scale[:, None])
    nll = nll_req.detach().cpu()
    log.info(
        "targets: NLL of target_new mean %.3f max %.3f after %.1f steps on average", nll.mean(), nll.max(), steps.float().mean()
    )
    return Targets({p: d.detach() for p, d in deltas.items()}, originals, nll, steps)
