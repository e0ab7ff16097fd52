"""Target vectors (ROME's v*, MEMIT's z), optimized for all requests of a batch jointly.

One residual δ per request and per module is added to the module's output at the subject's
last token. The loss per request is the NLL of ``target_new`` after the prompt in every context
template, plus a KL term keeping the subject's "essence" prompt unchanged, plus a weight decay
on ‖δ‖. Requests' losses are summed: each δ only reaches its own rows, so the joint problem is
the per-request problems side by side (Adam is elementwise), in one forward and backward per
step. The weights are frozen, and a request stops (its δ frozen) once its NLL is below ``stop_loss``.

What cannot change is computed once. δ enters at the subject's last token, so under causal attention
every token before it has the same hidden states, keys and values at every step: the rows are laid out
with that token on one column, the tokens before it run once and are kept as a key/value cache, and each
step runs only the tokens from the subject's last token on (``targets.prefix_cache``; a CounterFact row
of about 20 tokens keeps 3 to 6). The blocks below the first edited module run once as well.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from kedit.core.arch import ArchSpec
from kedit.core.facts import EditRequest
from kedit.core.lm import additive_mask, encode_pairs, head_logits, model_device, pad_id_of

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
class _Layout:
    """Rows aligned on their subject's last token: row b's token t sits at column ``P - subject[b] + t``."""

    input_ids: torch.Tensor  # (R, W) W = P + S
    allowed: torch.Tensor  # (R, W, W) query i sees key j: causal over real tokens; a padding query sees itself only
    positions: torch.Tensor  # (R, W)
    offsets: torch.Tensor  # (R,) column of each row's first token
    lengths: torch.Tensor  # (R,)
    P: int  # the column every subject's last token is on


def _align(ids: list[list[int]], subject_pos: list[int], pad_id: int, device) -> _Layout:
    lengths = torch.tensor([len(x) for x in ids])
    subject = torch.tensor(subject_pos)
    P = int(subject.max())
    width = P + int((lengths - subject).max())
    offsets = P - subject
    cols = torch.arange(width)
    real = (cols >= offsets[:, None]) & (cols < (offsets + lengths)[:, None])  # (R, W)
    input_ids = torch.full(real.shape, pad_id, dtype=torch.long)
    input_ids[real] = torch.tensor([t for x in ids for t in x], dtype=torch.long)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    allowed = (cols[None, :] <= cols[:, None])[None] & real[:, None, :]  # (R, W, W): query i, key j
    allowed |= torch.eye(width, dtype=torch.bool)[None]
    return _Layout(input_ids.to(device), allowed.to(device), positions.to(device), offsets.to(device), lengths.to(device), P)


@dataclass
class _Live:
    """The rows of the requests still optimizing, re-indexed densely (R' rows), and what a step runs:
    columns ``cut`` to ``end`` of the layout, with the columns ``start`` to ``cut`` as a cache."""

    input_ids: torch.Tensor  # (R', T')
    mask: torch.Tensor  # (R', 1, T', end - start)
    positions: torch.Tensor
    hidden: torch.Tensor  # (R', T', d): the first edited block's input, computed once
    past: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer: keys and values of columns start..cut
    own: torch.Tensor  # (R',) request of each row
    t_rows: torch.Tensor  # (N',) target tokens: live row, column, label, rewrite row in the full batch
    t_cols: torch.Tensor
    t_labels: torch.Tensor
    t_rw: torch.Tensor
    kl_rows: torch.Tensor  # (n',) one KL row per live request
    kl_cols: torch.Tensor
    kl_req: torch.Tensor  # (n',) which requests
    cut: int  # the subject's column within the step's columns


def _copy_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of the model in ``dtype``, made per call: it cannot go stale across edits."""
    copy = deepcopy(model).to(dtype).eval()
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy


def _cache(past: list[tuple[torch.Tensor, torch.Tensor]] | None) -> DynamicCache | None:
    """A fresh cache over the fixed prefix: a forward appends its own keys to it, never to ``past``."""
    return None if past is None else DynamicCache(ddp_cache_data=past)


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
    dtype = next(model.parameters()).dtype
    base = getattr(model, "base_model", model)
    kl_prompt = cfg.kl_prompt if cfg.kl_factor > 0 else None
    ids, n_prompt, n_target, subject_pos, owner, n_rw = _batch(tokenizer, requests, templates, kl_prompt)
    lay = _align(ids, subject_pos, pad_id_of(tokenizer), device)
    n_rows, P = len(ids), lay.P
    own = torch.tensor(owner, device=device)

    # target-token positions of the rewrite rows: token j of row b is predicted at n_prompt[b] - 1 + j
    lens = torch.tensor(n_target, device=device)
    t_rows = torch.repeat_interleave(torch.arange(n_rw, device=device), lens)
    t_cols = torch.cat([torch.arange(p - 1, p - 1 + t) for p, t in zip(n_prompt, n_target)]).to(device) + lay.offsets[t_rows]
    t_labels = lay.input_ids[t_rows, t_cols + 1]
    kl_rows = torch.arange(n_rw, n_rows, device=device)
    kl_cols = (lay.offsets + lay.lengths - 1)[n_rw:]  # last real token of each KL row

    # one forward of the unedited model: the prefix cache, the first edited block's input, the outputs at
    # the subject and the KL rows' reference distribution
    first_path = spec.block(first_block)
    with torch.no_grad(), output_kind(model, first_path) as kind, capture(model, list(paths), "output") as out0:
        with capture(model, [first_path], "input") as in0:
            out = base(
                input_ids=lay.input_ids,
                attention_mask=additive_mask(lay.allowed, dtype),
                position_ids=lay.positions,
                use_cache=cfg.prefix_cache,
            )
            base_kl_logits = head_logits(model, out.last_hidden_state[kl_rows, kl_cols])  # (n, V)
    cut = P if cfg.prefix_cache else 0
    past = None
    if cfg.prefix_cache:
        # (R, heads, P, d_head) per layer from the first edited block up; the blocks below never run again
        past = [(layer.keys[:, :, :P], layer.values[:, :, :P]) for layer in out.cache.layers]
    hidden_in = in0[first_path][:, cut:].detach()  # (R, W - cut, d)
    returns_tuple = kind["tuple"]
    base_kl = torch.log_softmax(base_kl_logits, -1).detach()  # (n, V)
    originals_all = {p: out0[p][:, P].detach().float() for p in paths}  # (R, d): every subject is on column P
    originals = {p: originals_all[p][:n_rw][:n] for p in paths}  # template "{}" comes first
    norms = {p: originals[p].norm(dim=-1).clamp(min=1e-6) for p in paths}  # (n,)
    del out, in0, out0

    has_kl = n_rows > n_rw

    def live_view(active: torch.Tensor) -> _Live:
        keep = active[own]  # (R,)
        sel = keep.nonzero().squeeze(1)
        remap = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        remap[sel] = torch.arange(len(sel), device=device)
        start = min(cut, int(lay.offsets[sel].min()))  # prefix columns before every live row's first token are padding
        end = int((lay.offsets + lay.lengths)[sel].max())  # and so are the columns after every live row's last
        t_keep = keep[t_rows]
        return _Live(
            lay.input_ids[sel, cut:end],
            additive_mask(lay.allowed[sel][:, cut:end, start:end], run_dtype),
            lay.positions[sel, cut:end],
            hidden_in[sel, : end - cut].to(run_dtype),
            None if past is None else [(k[sel, :, start:].to(run_dtype), v[sel, :, start:].to(run_dtype)) for k, v in past],
            own[sel],
            remap[t_rows[t_keep]],
            t_cols[t_keep] - cut,
            t_labels[t_keep],
            t_rows[t_keep],
            remap[kl_rows[active]] if has_kl else kl_rows,
            kl_cols[active] - cut if has_kl else kl_cols,
            active.nonzero().squeeze(1) if has_kl else kl_rows,  # no KL rows: no request has one
            P - cut,
        )

    # the steps run on the model itself, or on a copy in a lower precision (its matmuls are what a step costs)
    runner = model if cfg.precision == "model" else _copy_in(model, getattr(torch, cfg.precision))
    run_dtype = next(runner.parameters()).dtype
    run_base = getattr(runner, "base_model", runner)
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
            return out.index_put((rows, torch.full_like(rows, live.cut)), d, accumulate=True)

        return fn

    with ExitStack() as stack:
        stack.enter_context(frozen(runner))
        for p in paths:
            stack.enter_context(edit_output(runner, p, add_delta(p)))
        for _ in range(cfg.steps):
            with start_at_block(runner, spec.blocks, first_block, live.hidden, returns_tuple):
                hidden = run_base(
                    input_ids=live.input_ids,
                    attention_mask=live.mask,
                    position_ids=live.positions,
                    cache=_cache(live.past),
                    use_cache=live.past is not None,
                ).last_hidden_state
            # the LM head only where a loss is taken: target tokens, then the KL rows' last tokens
            logits = head_logits(runner, hidden[torch.cat([live.t_rows, live.kl_rows]), torch.cat([live.t_cols, live.kl_cols])])
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
