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
of about 20 tokens keeps 3 to 9), several rows' packed into one sequence whose cache holds their prefixes.
A rewrite row's last token (the last target token, which no loss reads) is left out of the steps.
The blocks below the first edited module run once as well.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from dataclasses import replace as replace_fields

import torch
from torch import nn
from transformers import DynamicCache

from kedit.core.arch import ArchSpec
from kedit.core.facts import EditRequest
from kedit.core.lm import additive_mask, encode_pairs, head_logits, model_device, pad_id_of
from kedit.core.precision import low_precision, low_precision_copy

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


def _without_last_target(lay: _Layout, n_rewrite: int) -> _Layout:
    """The layout the steps run: each rewrite row (the first ``n_rewrite``) without its last token. No loss is taken
    at or after it (it is the last target token, predicted at the column before), and under causal attention no
    earlier token sees it. A step runs every token from the subject on (3 to 9 in a CounterFact row), so that is one
    token in 3 to 9 of a row's matmuls. KL rows keep theirs: their last token is where the KL is taken."""
    rewrite = (torch.arange(len(lay.lengths), device=lay.lengths.device) < n_rewrite).long()  # (R,)
    return replace_fields(lay, lengths=lay.lengths - rewrite)


@dataclass
class _Step:
    """What one step's forward runs (B sequences of T tokens) and where each live layout row r sits in it: layout
    column c of row r is column ``c - shift[r]`` of sequence ``seq[r]``."""

    input_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, 1, T, T_past + T)
    positions: torch.Tensor  # (B, T)
    hidden: torch.Tensor  # (B, T, d): the first edited block's input, computed once
    past: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer: (B, heads, T_past, d_head) keys and values
    seq: torch.Tensor  # (R,) -1 for a row not in the step
    shift: torch.Tensor  # (R,)


def _full_step(lay: _Layout, hidden_in: torch.Tensor, sel: torch.Tensor, n_rows: int, dtype: torch.dtype) -> _Step:
    """Every column of every live row, each row its own sequence (what runs without the prefix cache)."""
    end = int((lay.offsets + lay.lengths)[sel].max())  # columns after every live row's last token are padding
    seq = torch.full((n_rows,), -1, dtype=torch.long, device=sel.device)
    seq[sel] = torch.arange(len(sel), device=sel.device)
    return _Step(
        lay.input_ids[sel, :end],
        additive_mask(lay.allowed[sel][:, :end, :end], dtype),
        lay.positions[sel, :end],
        hidden_in[sel, :end].to(dtype),
        None,
        seq,
        torch.zeros(n_rows, dtype=torch.long, device=sel.device),
    )


def _bins(sizes: list[int], capacity: int) -> list[int]:
    """First-fit decreasing: a bin per item, no bin over ``capacity``."""
    room: list[int] = []
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        b = next((b for b, r in enumerate(room) if r >= sizes[i]), len(room))
        if b == len(room):
            room.append(capacity)
        room[b] -= sizes[i]
        out[i] = b
    return out


def _ragged(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For counts (m,): the item of every unit and its index within the item, both (sum counts,)."""
    item = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return item, torch.arange(int(counts.sum()), device=counts.device) - first[item]


def _packed_step(lay: _Layout, hidden_in: torch.Tensor, past, sel: torch.Tensor, n_rows: int, dtype: torch.dtype) -> _Step:
    """The live rows' tokens from the subject's last token on, packed several rows to a sequence (a row's suffix
    is 3 to 9 tokens; padding every row to the longest would compute up to twice the tokens), each packed
    sequence's cache holding its rows' prefixes. A token sees its own row's prefix and its own row's earlier tokens.
    ``hidden_in`` (R, S, d) starts at the subject's column; ``past`` per layer (R, heads, P, d_head)."""
    dev = sel.device
    suffix = (lay.offsets + lay.lengths - lay.P)[sel]  # (R',) tokens from the subject's last token on
    prefix = (lay.P - lay.offsets)[sel]  # (R',) tokens before it
    seq_of = torch.tensor(_bins(suffix.tolist(), int(suffix.max())), device=dev)  # (R',)
    n_seq = int(seq_of.max()) + 1
    # each row's first column in its sequence's tokens and in its cache: the sizes of the rows before it there
    order = torch.argsort(seq_of, stable=True)
    start, pstart = torch.empty_like(suffix), torch.empty_like(prefix)
    for sizes, out in ((suffix, start), (prefix, pstart)):
        cum = torch.cumsum(sizes[order], 0) - sizes[order]
        seq_first = cum[torch.searchsorted(seq_of[order], torch.arange(n_seq, device=dev))]  # every bin holds a row
        out[order] = cum - seq_first[seq_of[order]]
    width = int((start + suffix).max())
    p_width = max(int((pstart + prefix).max()), 1)

    # query tokens: (row i, j-th token from the subject on) -> (seq_of[i], start[i] + j)
    i, j = _ragged(suffix)
    rows, sq, sc = sel[i], seq_of[i], start[i] + j
    input_ids = torch.zeros((n_seq, width), dtype=torch.long, device=dev)
    input_ids[sq, sc] = lay.input_ids[rows, lay.P + j]
    positions = torch.zeros((n_seq, width), dtype=torch.long, device=dev)
    positions[sq, sc] = lay.positions[rows, lay.P + j]
    hidden = torch.zeros((n_seq, width, hidden_in.shape[-1]), dtype=dtype, device=dev)
    hidden[sq, sc] = hidden_in[rows, j].to(dtype)
    q_row = torch.full((n_seq, width), -1, dtype=torch.long, device=dev)
    q_row[sq, sc] = i
    # cached tokens: (row i, k-th token before the subject's last) -> (seq_of[i], pstart[i] + k)
    pi, pk = _ragged(prefix)
    k_row = torch.full((n_seq, p_width), -1, dtype=torch.long, device=dev)
    k_row[seq_of[pi], pstart[pi] + pk] = pi
    packed_past = []
    for k, v in past:
        pair = []
        for t in (k, v):
            out = torch.zeros((n_seq, p_width, t.shape[1], t.shape[3]), dtype=dtype, device=dev)  # (B, T_past, heads, d_head)
            out[seq_of[pi], pstart[pi] + pk] = t[sel[pi], :, lay.offsets[sel[pi]] + pk].to(dtype)
            pair.append(out.transpose(1, 2))
        packed_past.append(tuple(pair))
    real = q_row >= 0
    cols = torch.arange(width, device=dev)
    sees_prefix = (q_row[:, :, None] == k_row[:, None, :]) & real[:, :, None]  # (B, T, T_past)
    sees_suffix = (q_row[:, :, None] == q_row[:, None, :]) & real[:, :, None] & (cols[None, :] <= cols[:, None])[None]
    sees_suffix |= torch.eye(width, dtype=torch.bool, device=dev)[None]  # padding sees itself: no empty softmax
    seq = torch.full((n_rows,), -1, dtype=torch.long, device=dev)
    seq[sel] = seq_of
    shift = torch.zeros(n_rows, dtype=torch.long, device=dev)
    shift[sel] = lay.P - start
    mask = additive_mask(torch.cat([sees_prefix, sees_suffix], -1), dtype)
    return _Step(input_ids, mask, positions, hidden, packed_past, seq, shift)


@dataclass
class _Live:
    """The requests still optimizing: the step's layout, and the loss's positions in it."""

    step: _Step
    own: torch.Tensor  # (R,) request of each layout row
    t_seq: torch.Tensor  # (N',) target tokens: sequence, column, label, rewrite row in the full batch
    t_cols: torch.Tensor
    t_labels: torch.Tensor
    t_rw: torch.Tensor
    kl_seq: torch.Tensor  # (n',) the last token of one KL row per live request
    kl_cols: torch.Tensor
    kl_req: torch.Tensor  # (n',) which requests
    d_rows: torch.Tensor  # (R',) live layout rows: δ of request own[row] enters at (seq, column) there
    d_seq: torch.Tensor
    d_cols: torch.Tensor


@contextmanager
def _step_attention(runner: nn.Module, choice: str, copied: bool):
    """The attention the steps run with on ``runner`` (``copied``: a lower-precision copy made for them); its own
    implementation is put back after.

    "plain": the plain matmul and softmax (softmax in fp32). "auto": plain on a CPU copy, whose bf16 flash-attention
    backward over the few dozen tokens of a step costs several times the plain path's (BalancEdit's steps 1.22x
    faster per edit); in fp32 the plain path was slower (MEMIT at batch 10, 2.60 against 2.43 s per edit), and on a
    GPU the model's own is kept (docs/benchmarks.md). "model": the runner's own."""
    own = runner.config._attn_implementation  # transformers keeps the choice only here (5.x has no public getter)
    on_cpu = next(runner.parameters()).device.type == "cpu"
    switch = (choice == "plain" or (choice == "auto" and copied and on_cpu)) and own != "eager"
    if switch:
        runner.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            runner.set_attn_implementation(own)


class _NormalizedSteps:
    """``optimizer: normalized``: per request (a row of each (n, d) δ), a step of its own size along -g/‖g‖. The
    size starts at ``step_size`` × ‖h‖ and is multiplied by ``grow`` while the row's direction holds (cosine with
    its last step's > 0) and by ``shrink`` when it turns back: Rprop on the vector. Adam moves every coordinate by
    about lr a step, so its δ grows along all 576 of them at once; this one moves along the loss's descent only."""

    def __init__(self, params: list[torch.Tensor], sizes: list[torch.Tensor], grow: float, shrink: float):
        self.params, self.grow, self.shrink = params, grow, shrink
        self.size = [s.detach().clone()[:, None] for s in sizes]  # (n, 1) each
        self.last: list[torch.Tensor | None] = [None] * len(params)  # (n, d) each: the last step's direction

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            u = p.grad / p.grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (n, d)
            if self.last[i] is not None:
                holds = (u * self.last[i]).sum(-1, keepdim=True) > 0  # (n, 1)
                self.size[i] = torch.where(holds, self.size[i] * self.grow, self.size[i] * self.shrink)
            self.last[i] = u
            p.sub_(self.size[i] * u)


def _optimizer(cfg: TargetHyperParams, deltas: list[torch.Tensor], norms: list[torch.Tensor]):
    if cfg.optimizer == "normalized":
        return _NormalizedSteps(deltas, [cfg.step_size * n for n in norms], cfg.grow, cfg.shrink)
    return torch.optim.Adam(deltas, lr=cfg.lr)


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
    replace: bool = False,
    start: dict[str, torch.Tensor] | None = None,
    step_scale: dict[str, torch.Tensor] | None = None,
) -> Targets:
    """Jointly optimize one δ per request for each module in ``paths`` (all in blocks >= first_block).

    A request that reaches ``stop_loss`` leaves the batch: its rows are dropped from later forwards,
    so the joint run does the per-request loop's arithmetic, not n rows for the slowest request's steps.

    ``replace``: in every row the module's output at the subject is replaced by the request's output in template
    "{}" plus δ, as a codebook's value replaces it whatever the context (otherwise δ is added to each row's own
    output, as a weight edit shifts it). The two are the same for the "{}" rows and differ where a prefix, a
    frame or the KL prompt changed the output at the subject.

    ``start``: where δ starts, (n, d) per path (zero for a path not given): a vector reused from elsewhere is
    checked before any step, and a request it already brings under ``stop_loss`` runs none.

    ``step_scale``: per path, (d,) factors each coordinate's step is multiplied by (a learning rate per coordinate):
    where the change can only be delivered more cheaply along some coordinates than others, the steps go there.
    """
    n = len(requests)
    device = model_device(model)
    kl_prompt = cfg.kl_prompt if cfg.kl_factor > 0 else None
    ids, n_prompt, n_target, subject_pos, owner, n_rw = _batch(tokenizer, requests, templates, kl_prompt)
    lay = _align(ids, subject_pos, pad_id_of(tokenizer), device)
    n_rows, P = len(ids), lay.P
    step_lay = _without_last_target(lay, n_rw)
    own = torch.tensor(owner, device=device)

    # target-token positions of the rewrite rows: token j of row b is predicted at n_prompt[b] - 1 + j
    lens = torch.tensor(n_target, device=device)
    t_rows = torch.repeat_interleave(torch.arange(n_rw, device=device), lens)
    t_cols = torch.cat([torch.arange(p - 1, p - 1 + t) for p, t in zip(n_prompt, n_target)]).to(device) + lay.offsets[t_rows]
    t_labels = lay.input_ids[t_rows, t_cols + 1]
    kl_rows = torch.arange(n_rw, n_rows, device=device)
    kl_cols = (lay.offsets + lay.lengths - 1)[n_rw:]  # last real token of each KL row

    # the steps run on the model itself, or on a copy in a lower precision (a step over a few tokens streams every
    # weight it passes through: half the bytes is half the time)
    low = low_precision(cfg.precision, model)
    runner = model if low is None else low_precision_copy(model, low)
    run_dtype = next(runner.parameters()).dtype
    run_base = getattr(runner, "base_model", runner)

    # one forward of the unedited model: the prefix cache, the first edited block's input, the outputs at
    # the subject and the KL rows' reference distribution. It runs on the runner: in the steps' precision the
    # KL is zero at δ = 0 and the cache is what the steps' own forward would compute (and a batch of 10 runs
    # twice as fast on a bf16 copy: this forward is ~20% of the target phase in fp32, every row's every token)
    first_path = spec.block(first_block)
    # δ at a block's own output (MEMIT's z) enters as the next block's input: the steps start there, one block
    # fewer of forward and backward per step than running the block whose output is already known
    at_output = set(paths) == {first_path} and first_block + 1 < len(runner.get_submodule(spec.blocks))
    run_from = first_block + 1 if at_output else first_block
    with torch.no_grad(), output_kind(runner, first_path) as kind, capture(runner, list(paths), "output") as out0:
        with capture(runner, [spec.block(run_from)], "input") as in0:
            out = run_base(
                input_ids=lay.input_ids,
                attention_mask=additive_mask(lay.allowed, run_dtype),
                position_ids=lay.positions,
                use_cache=cfg.prefix_cache,
            )
            base_kl_logits = head_logits(runner, out.last_hidden_state[kl_rows, kl_cols])  # (n, V) fp32
    cut = P if cfg.prefix_cache else 0
    past = None
    if cfg.prefix_cache:
        # (R, heads, P, d_head) per layer: the keys and values of every token before the subject's last
        past = [(layer.keys[:, :, :P], layer.values[:, :, :P]) for layer in out.cache.layers]
    hidden_in = in0[spec.block(run_from)][:, cut:].detach()  # (R, W - cut, d)
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
        if past is None:
            step = _full_step(step_lay, hidden_in, sel, n_rows, run_dtype)
        else:
            step = _packed_step(step_lay, hidden_in, past, sel, n_rows, run_dtype)
        t_keep = keep[t_rows]
        tr, kr = t_rows[t_keep], kl_rows[active] if has_kl else kl_rows
        return _Live(
            step,
            own,
            step.seq[tr],
            t_cols[t_keep] - step.shift[tr],
            t_labels[t_keep],
            tr,
            step.seq[kr],
            (kl_cols[active] if has_kl else kl_cols) - step.shift[kr],
            active.nonzero().squeeze(1) if has_kl else kl_rows,  # no KL rows: no request has one
            sel,
            step.seq[sel],
            P - step.shift[sel],
        )

    start = start or {}
    zeros = {p: torch.zeros(n, originals[p].shape[-1], device=device) for p in paths}  # (n, d) each
    deltas = {p: (start[p].to(zeros[p]).clone() if p in start else zeros[p]).requires_grad_(True) for p in paths}
    opt = _optimizer(cfg, list(deltas.values()), [norms[p] for p in paths])
    active = torch.ones(n, dtype=torch.bool, device=device)
    live = live_view(active)
    steps = torch.zeros(n, dtype=torch.long)
    nll_req = torch.full((n,), float("inf"), device=device)

    def add_delta(p):
        def fn(out):
            req = live.own[live.d_rows]  # (R',) the request of each live row
            if replace:  # the value, whatever the row's own output there
                return out.index_put((live.d_seq, live.d_cols), (originals[p][req] + deltas[p][req]).to(out.dtype))
            return out.index_put((live.d_seq, live.d_cols), deltas[p][req].to(out.dtype), accumulate=True)

        return fn

    with ExitStack() as stack:
        stack.enter_context(frozen(runner))
        stack.enter_context(_step_attention(runner, cfg.attention, runner is not model))
        if not at_output:
            for p in paths:
                stack.enter_context(edit_output(runner, p, add_delta(p)))
        for _ in range(cfg.steps):
            step = live.step
            hidden_first = add_delta(first_path)(step.hidden) if at_output else step.hidden
            with start_at_block(runner, spec.blocks, run_from, hidden_first, returns_tuple):
                hidden = run_base(
                    input_ids=step.input_ids,
                    attention_mask=step.mask,
                    position_ids=step.positions,
                    cache=_cache(step.past),
                    use_cache=step.past is not None,
                ).last_hidden_state
            # the LM head only where a loss is taken: target tokens, then the KL rows' last tokens
            logits = head_logits(runner, hidden[torch.cat([live.t_seq, live.kl_seq]), torch.cat([live.t_cols, live.kl_cols])])
            n_t = len(live.t_seq)
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
                    if step_scale is not None and p in step_scale:
                        d.copy_(keep[p] + (d - keep[p]) * step_scale[p].to(d))  # (n, d): the step, per coordinate
                    d[~active] = keep[p][~active]  # finished requests stay where they stopped
                    limit = cfg.clamp_norm * norms[p]
                    scale = (limit / d.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)
                    # only the requests that stepped: one that stopped at its start (a vector reused from elsewhere
                    # that already passed here) keeps the start it was checked at, whatever its norm
                    d.mul_(torch.where(active, scale, 1.0)[:, None])
    nll = nll_req.detach().cpu()
    log.info(
        "targets: NLL of target_new mean %.3f max %.3f after %.1f steps on average", nll.mean(), nll.max(), steps.float().mean()
    )
    return Targets({p: d.detach() for p, d in deltas.items()}, originals, nll, steps)
