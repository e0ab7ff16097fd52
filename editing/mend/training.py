"""MEND's meta-training (Mitchell et al., 2022, Alg. 1): learn the network so that one mapped gradient step
makes the edit hold on the fact and its rephrasing while unrelated text keeps its distribution.

One step over a batch of facts:
1. the unedited model runs once over the edit prompts, their rephrasings and unrelated prompts; the hidden
   states entering the lowest edited block are kept, and the unrelated prompts' next-token distributions;
2. the edit loss's gradient factors at the edited weights (only the blocks from the lowest edited one run);
3. the network maps them to an update ΔW per weight;
4. the edited model runs from that block again, with ΔW added: L = c_edit·NLL(targets | prompt, rephrasing)
   + c_loc·KL(unedited || edited on unrelated text, and on what follows the new target); Adam on the network
   and its edit rates.

Checkpoints hold the network, the optimizer and the step; the batch of step s depends on s and the seed only,
so a resumed run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from editing.hooks import capture, frozen, output_kind, start_at_block
from kedit.core.arch import ArchSpec
from kedit.core.facts import EditRequest
from kedit.core.lm import encode_pairs, model_device, pad_batch, pad_id_of

from .gradients import added_updates, gradient_factors, kept, target_nll
from .hparams import MENDHyperParams, TrainHyperParams
from .network import HyperNet

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


def trainable(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """The facts a training step can use: with a rephrasing and an unrelated prompt."""
    return [r for r in requests if r.paraphrase_prompts and r.neighborhood]


class Augment:
    """What a step adds to each of its facts, from the training facts alone:

    - ``negatives`` other facts of the same prompt template (the same relation, another subject), whose
      prompts join the locality KL: an edit must move its subject, not its relation;
    - with probability ``prefixed``, an unrelated sentence before the rephrasing, taken from the training
      facts' own rephrasings that start with one: an edit must hold after unrelated context.

    Draws depend on the seed and a key (the step, or a validation fact's index) only, so a resumed run
    draws what an uninterrupted one would.
    """

    def __init__(self, facts: Sequence[EditRequest], negatives: int, prefixed: float, seed: int):
        self.negatives, self.prefixed, self.seed = negatives, prefixed, seed
        self.groups: dict[str, list[EditRequest]] = {}
        for r in facts:
            if r.target_true:
                self.groups.setdefault(r.prompt, []).append(r)
        heads = (_prefix(q, r.subject) for r in facts for q in r.paraphrase_prompts)
        self.prefixes = sorted({h for h in heads if h})

    def __call__(self, key: int, batch: Sequence[EditRequest]) -> tuple[list[str], list[EditRequest]]:
        """The batch's rephrasings and its negatives (``negatives`` per fact at most, no subject of the batch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        rephrasings = [r.paraphrase_prompts[0] for r in batch]
        if self.prefixes:
            draw = torch.rand(len(batch), generator=g) < self.prefixed
            picks = torch.randint(len(self.prefixes), (len(batch),), generator=g)
            rephrasings = [
                self.prefixes[int(i)] + q if d and not _prefix(q, r.subject) else q
                for q, r, d, i in zip(rephrasings, batch, draw, picks)
            ]
        subjects = {r.subject for r in batch}
        negatives = []
        for r in batch:
            pool = [o for o in self.groups.get(r.prompt, ()) if o.subject not in subjects]
            if pool and self.negatives:
                picks = torch.randperm(len(pool), generator=g)[: self.negatives]
                negatives += [pool[int(i)] for i in picks]
        return rephrasings, negatives


def _prefix(prompt: str, subject: str) -> str:
    """The unrelated sentence a prompt starts with before its subject ("Last updated 2017. "), or ""."""
    at = prompt.find(subject)
    head = prompt[:at] if at > 0 else ""
    return head if head.rstrip().endswith(".") else ""


@dataclass
class StepRows:
    """One step's rows, padded together: B edit prompts, B rephrasings, the unrelated prompts (each fact's own,
    then its negatives), then each fact's subject in the subject templates. Columns index ``keep``, the positions
    whose logits a loss reads."""

    ids: torch.Tensor  # (2B + n_unrelated_rows + n_subject_rows, L)
    mask: torch.Tensor
    pos: torch.Tensor
    n: int  # B
    keep: torch.Tensor  # (K,) positions passed as logits_to_keep
    rows: torch.Tensor  # target tokens of the first 2B rows: row, predicting column (into keep), label
    cols: torch.Tensor
    labels: torch.Tensor
    # the KL positions: row, column (into keep); in three groups, in this order: the unrelated rows', the
    # after-target ones (in the edit rows), the subject templates'
    loc_rows: torch.Tensor
    loc_cols: torch.Tensor
    n_unrelated: int  # how many of the KL positions are in unrelated rows
    n_after: int = 0  # how many are after-target positions; the rest are in the subject rows


def _spans(starts: Sequence[int], lengths: Sequence[int], first_row: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every position in the spans ``[start, start + length)``, one span per row from ``first_row``."""
    rows = torch.repeat_interleave(torch.arange(first_row, first_row + len(starts)), torch.tensor(list(lengths)))
    cols = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    return rows.to(device), cols.to(device)


def step_rows(
    tok,
    requests: Sequence[EditRequest],
    device: torch.device,
    loc_positions: str = "answer",
    rephrasings: Sequence[str] | None = None,
    negatives: Sequence[EditRequest] = (),
    after_target: bool = False,
    subject_templates: Sequence[str] = (),
) -> StepRows:
    n = len(requests)
    prompts = [r.text for r in requests] + list(rephrasings or [r.paraphrase_prompts[0] for r in requests])
    prompts += [r.neighborhood[0].prompt for r in requests] + [o.text for o in negatives]
    targets = [r.target_new for r in requests] * 2 + [r.neighborhood[0].answer for r in requests]
    targets += [o.target_true for o in negatives]
    n_rows = len(prompts)  # edit, rephrasing and unrelated rows; the subject rows follow
    # a subject template "{} is a" splits into the text up to the subject and the rest ("is a"), which
    # encode_pairs puts after it as it puts a target after a prompt
    heads, rests = zip(*(t.split("{}", 1) for t in subject_templates)) if subject_templates else ((), ())
    prompts += [h + r.subject for r in requests for h in heads]
    targets += [rest.strip() for _ in requests for rest in rests]
    enc = encode_pairs(tok, prompts, targets)
    ids, mask, pos, _ = pad_batch(enc.ids, pad_id_of(tok), "right", device)
    rows, cols = _spans([p - 1 for p in enc.n_prompt[: 2 * n]], enc.n_target[: 2 * n], 0, device)
    labels = ids[rows, cols + 1]
    if loc_positions == "all":
        loc = mask[2 * n : n_rows].bool().nonzero()  # (n_loc_tokens, 2): row within the unrelated rows, column
        loc_rows, loc_cols = loc[:, 0] + 2 * n, loc[:, 1]
    else:  # the positions that predict the unrelated prompt's answer tokens
        loc_rows, loc_cols = _spans([p - 1 for p in enc.n_prompt[2 * n : n_rows]], enc.n_target[2 * n : n_rows], 2 * n, device)
    n_unrelated = len(loc_cols)
    groups_rows, groups_cols = [loc_rows], [loc_cols]
    if after_target:  # each edit row's last target token, which predicts what follows the target
        ends = [p + t - 1 for p, t in zip(enc.n_prompt[: 2 * n], enc.n_target[: 2 * n])]
        after_rows, after_cols = _spans(ends, [1] * (2 * n), 0, device)
        groups_rows.append(after_rows)
        groups_cols.append(after_cols)
    n_after = 2 * n if after_target else 0
    if subject_templates:  # from the subject's last token to the template's end: all of it predicts text about the subject
        subj = range(n_rows, len(prompts))
        sub_rows, sub_cols = _spans([enc.n_prompt[i] - 1 for i in subj], [enc.n_target[i] + 1 for i in subj], n_rows, device)
        groups_rows.append(sub_rows)
        groups_cols.append(sub_cols)
    loc_rows, loc_cols = torch.cat(groups_rows), torch.cat(groups_cols)
    keep, where = kept(torch.cat([cols, loc_cols]))
    return StepRows(ids, mask, pos, n, keep, rows, where[: len(cols)], labels, loc_rows, where[len(cols) :], n_unrelated, n_after)


def _rows(tok, batch: Sequence[EditRequest], device, t: TrainHyperParams, extra: tuple) -> StepRows:
    """A step's rows as the training settings ``t`` ask, with ``extra`` = (rephrasings, negatives) from ``Augment``."""
    return step_rows(tok, batch, device, t.loc_positions, *extra, t.after_target, t.subject_templates)


def _logits(model: nn.Module, b: StepRows, rows: slice = slice(None)) -> torch.Tensor:
    """The logits of ``rows`` at ``b.keep``: (rows, K, V)."""
    return model(input_ids=b.ids[rows], attention_mask=b.mask[rows], position_ids=b.pos[rows], logits_to_keep=b.keep).logits


def meta_step(
    model: nn.Module, spec: ArchSpec, net: HyperNet, b: StepRows, first: int, c_edit: float, c_loc: float
) -> dict[str, torch.Tensor]:
    """The losses of one step (``loss`` differentiable in the network) and detached accuracies; ``first`` is
    the lowest edited block."""
    paths = list(net.weights)
    block = spec.block(first)
    n = b.n
    with frozen(model):
        # 1. the unedited model, once over every row
        with torch.no_grad(), capture(model, [block], "input") as seen, output_kind(model, block) as kind:
            base = _logits(model, b)
        hidden = seen[block].detach()  # (rows, L, d) entering the lowest edited block
        base_loc = torch.log_softmax(base[b.loc_rows, b.loc_cols].float(), -1)  # (n_loc, V)
        edit = b.rows < n
        # 2. the edit loss's gradient factors, from the lowest edited block on
        with start_at_block(model, spec.blocks, first, hidden[:n], kind["tuple"]):

            def edit_nll():
                return target_nll(_logits(model, b, slice(0, n)), b.rows[edit], b.cols[edit], b.labels[edit]).mean()

            factors = gradient_factors(model, paths, edit_nll, b.mask[:n])
        # 3. the network's updates
        updates = net.updates(factors)
        # 4. the edited model on every row
        with start_at_block(model, spec.blocks, first, hidden, kind["tuple"]), added_updates(model, updates):
            post = _logits(model, b)
    nll = target_nll(post, b.rows, b.cols, b.labels)
    post_loc = torch.log_softmax(post[b.loc_rows, b.loc_cols].float(), -1)
    kls = (base_loc.exp() * (base_loc - post_loc)).sum(-1)  # (n_loc,)
    # each group its own mean, so that adding one leaves the unrelated text's weight as it was
    kl, kl_after, kl_subject = (
        part.mean() if len(part) else kls.new_zeros(())
        for part in kls.split([b.n_unrelated, b.n_after, len(kls) - b.n_unrelated - b.n_after])
    )
    with torch.no_grad():
        right = (post[b.rows, b.cols].argmax(-1) == b.labels).float()
        wrong = torch.zeros(2 * n, device=right.device).index_add_(0, b.rows, 1 - right)  # (2B,) wrong tokens per row
        per_row = (wrong == 0).float()
        r, c = b.loc_rows[: b.n_unrelated], b.loc_cols[: b.n_unrelated]  # agreement on unrelated text only
        agree = (post[r, c].argmax(-1) == base[r, c].argmax(-1)).float().mean()
    return {
        "loss": c_edit * nll.mean() + c_loc * (kl + kl_after + kl_subject),
        "edit_loss": nll.mean().detach(),
        "loc_loss": kl.detach(),
        "after_target_loss": kl_after.detach(),
        "subject_loss": kl_subject.detach(),
        "edit_success": per_row[:n].mean(),  # every target token the argmax, on the edit prompt
        "rephrase_success": per_row[n:].mean(),
        "loc_agreement": agree,
    }


def _metrics(out: dict[str, torch.Tensor]) -> dict[str, float]:
    return {("total_loss" if k == "loss" else k): float(v.detach()) for k, v in out.items()}


class BatchOrder:
    """Step s's facts: a fresh permutation per epoch, drawn from the seed and the epoch only."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __call__(self, step: int) -> list[int]:
        out = []
        for i in range(step * self.batch, (step + 1) * self.batch):
            epoch = i // self.n
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))}
            out.append(int(self._perms[epoch][i % self.n]))
        return out


@dataclass
class Progress:
    step: int = 0  # steps done
    best: float = math.inf  # the lowest validation loss so far
    best_step: int = 0
    bad: int = 0  # validations since the best
    stopped: str = ""  # why training ended: "" while it runs


VALIDATION_KEYS = 10**9  # validation batch i draws its augmentation with key VALIDATION_KEYS + i, apart from steps


def validate(
    model, tok, spec, net: HyperNet, requests: Sequence[EditRequest], hp: MENDHyperParams, augment: Augment | None = None
) -> dict[str, float]:
    """The step's losses and successes averaged over the validation facts, in batches as in training (with
    ``augment``'s rephrasings and negatives; without it, each fact's own)."""
    was = net.training
    net.eval()
    sums: dict[str, float] = {}
    batches = [requests[i : i + hp.train.batch] for i in range(0, len(requests), hp.train.batch)]
    try:
        with torch.no_grad():
            for i, chunk in enumerate(batches):
                extra = augment(VALIDATION_KEYS + i, chunk) if augment else (None, ())
                rows = _rows(tok, chunk, model_device(model), hp.train, extra)
                out = _metrics(meta_step(model, spec, net, rows, min(hp.layers), hp.train.c_edit, hp.train.c_loc))
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v * len(chunk)
    finally:
        net.train(was)
    return {f"val_{k}": v / len(requests) for k, v in sums.items()}


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint


def optimizer(net: HyperNet, hp: MENDHyperParams) -> torch.optim.Optimizer:
    maps = [p for n, p in net.named_parameters() if n != "edit_lrs"]
    return torch.optim.Adam([{"params": maps, "lr": hp.train.lr}, {"params": [net.edit_lrs], "lr": hp.train.lr_lr}])


def train(
    model: nn.Module,
    tok,
    spec: ArchSpec,
    net: HyperNet,
    train_facts: Sequence[EditRequest],
    val_facts: Sequence[EditRequest],
    hp: MENDHyperParams,
    directory: Path,
    on_metrics: Callable[[int, dict[str, float]], None] = lambda step, m: None,
    max_seconds: float | None = None,
) -> Progress:
    """Train ``net`` in place, checkpointing into ``directory`` (resumed from there when a checkpoint exists);
    at the end ``net`` holds the best validated weights. ``on_metrics(step, metrics)`` sees every step's
    losses and every validation. Returns where training stopped and why."""
    t = hp.train
    directory.mkdir(parents=True, exist_ok=True)
    opt = optimizer(net, hp)
    state = Progress()
    if (directory / CHECKPOINT).is_file():
        ck = torch.load(directory / CHECKPOINT, weights_only=True)  # our own file; still never unpickle code
        if ck.get("hparams") != hp.model_dump(mode="json"):
            raise ValueError(f"{directory / CHECKPOINT} was made with other hparams; train into a new directory")
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        state = Progress(**ck["progress"])
        if state.stopped == "time":  # a time budget ends a sitting, not the training
            state.stopped = ""
        log.info(
            "resuming MEND training at step %d (best validation loss %.4g at step %d)", state.step, state.best, state.best_step
        )
    order = BatchOrder(len(train_facts), t.batch, t.seed)
    augment = Augment(train_facts, t.negatives, t.prefixed, t.seed)
    device = model_device(model)
    t0 = time.monotonic()

    def checkpoint() -> None:
        saved = {"net": net.state_dict(), "opt": opt.state_dict(), "progress": asdict(state)}
        _save(directory / CHECKPOINT, saved | {"hparams": hp.model_dump(mode="json")})

    net.train()
    bar = tqdm(total=t.steps, initial=state.step, desc="MEND training", unit="step")
    try:
        while not state.stopped:
            if state.step >= t.steps:
                state.stopped = "steps"
                break
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                state.stopped = "time"
                break
            batch = [train_facts[i] for i in order(state.step)]
            rows = _rows(tok, batch, device, t, augment(state.step, batch))
            out = meta_step(model, spec, net, rows, min(hp.layers), t.c_edit, t.c_loc)
            opt.zero_grad()
            out["loss"].backward()
            metrics = _metrics(out)
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip))
            opt.step()
            state.step += 1
            on_metrics(state.step, metrics)
            bar.update(1)
            bar.set_postfix(edit=f"{metrics['edit_loss']:.3f}", loc=f"{metrics['loc_loss']:.4f}")
            if state.step % t.val_every == 0:
                val = validate(model, tok, spec, net, val_facts, hp, augment)
                if val["val_total_loss"] < state.best:
                    state.best, state.best_step, state.bad = val["val_total_loss"], state.step, 0
                    _save(directory / BEST, {"net": net.state_dict(), "step": state.step})
                else:
                    state.bad += 1
                    if state.bad >= t.patience:
                        state.stopped = "early"
                on_metrics(state.step, val)
                log.info("step %d: %s", state.step, {k: round(v, 4) for k, v in val.items()})
            if state.step % t.checkpoint_every == 0 or state.step % t.val_every == 0 or state.stopped:
                checkpoint()
    finally:
        bar.close()
    checkpoint()
    if (directory / BEST).is_file():
        net.load_state_dict(torch.load(directory / BEST, weights_only=True)["net"])
    net.eval()
    return state
