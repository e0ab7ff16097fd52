"""Batched teacher-forced scoring of target continuations: one padded forward pass per batch.

Given prompts and targets, every metric in kedit reduces to three numbers per pair: the
summed log-probability of the target tokens, how many target tokens the model's argmax
predicts, and the argmax tokens themselves (for agreement with a reference model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + target pairs (no padding yet)."""

    ids: list[list[int]]  # prompt followed by target tokens
    n_prompt: list[int]
    n_target: list[int]


@dataclass(frozen=True)
class Scores:
    logprob: torch.Tensor  # (n,) sum of target-token log-probabilities
    n_tokens: torch.Tensor  # (n,) target length in tokens
    n_correct: torch.Tensor  # (n,) target tokens that are the argmax given the true prefix
    argmax: list[torch.Tensor]  # n tensors of (n_tokens,): the model's argmax at each target position

    @property
    def mean_logprob(self) -> torch.Tensor:
        return self.logprob / self.n_tokens.clamp(min=1)

    @property
    def prob(self) -> torch.Tensor:
        """Per-token geometric-mean probability, the CounterFact convention."""
        return self.mean_logprob.exp()

    @property
    def token_accuracy(self) -> torch.Tensor:
        return self.n_correct / self.n_tokens.clamp(min=1)

    @property
    def exact(self) -> torch.Tensor:
        """All target tokens are the argmax: greedy decoding would produce the target."""
        return self.n_correct == self.n_tokens


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a plain encode."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    return len(with_special) > 0 and with_special[0] == bos


def _joiner(prompt: str, target: str) -> str:
    return "" if (not prompt or prompt[-1].isspace() or target[:1].isspace()) else " "


def encode_pairs(tokenizer, prompts: list[str], targets: list[str]) -> Encoded:
    """Tokenize ``prompt + " " + target`` and split it where the prompt's own tokens end.

    Tokenizing the joined string (rather than the target alone) keeps the target's tokens
    what the model sees in running text; if the prompt's tokens are not a prefix of the
    joined string's (a merge across the boundary), the target is tokenized on its own.
    Only a BOS is added, never an EOS, whatever the tokenizer's post-processor does.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if any(not t for t in targets):
        raise ValueError("empty target")
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    fulls = [p + _joiner(p, t) + t for p, t in zip(prompts, targets)]
    enc = tokenizer(prompts + fulls, add_special_tokens=False)["input_ids"]
    p_ids, f_ids = enc[: len(prompts)], enc[len(prompts) :]
    ids, n_prompt, n_target = [], [], []
    for p, f, prompt, target in zip(p_ids, f_ids, prompts, targets):
        if f[: len(p)] == p and len(f) > len(p):
            tgt = f[len(p) :]
        else:
            tgt = tokenizer(_joiner(prompt, target) + target, add_special_tokens=False)["input_ids"]
        ids.append(bos + p + tgt)
        n_prompt.append(len(bos) + len(p))
        n_target.append(len(tgt))
    return Encoded(ids, n_prompt, n_target)


def pad_batch(
    ids: list[list[int]], pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to a rectangle; returns input_ids, attention_mask, position_ids (B, T) and the left offsets (B,)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    lengths = torch.tensor([len(x) for x in ids])
    width = int(lengths.max())
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    offsets = (width - lengths) if side == "left" else torch.zeros_like(lengths)
    cols = torch.arange(width)
    mask = (cols >= offsets[:, None]) & (cols < (offsets + lengths)[:, None])  # (B, T)
    input_ids[mask] = torch.tensor([t for x in ids for t in x], dtype=torch.long)
    # positions count real tokens only, so left padding does not shift them
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.long().to(device), position_ids.to(device), offsets


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id_of(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return t
    return 0


@torch.inference_mode()
def score_encoded(model: nn.Module, tokenizer, enc: Encoded, batch_size: int = 64, padding_side: str | None = None) -> Scores:
    """Score pre-encoded pairs; batches are formed from similar lengths to waste little padding."""
    n = len(enc.ids)
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    device = model_device(model)
    pad = pad_id_of(tokenizer)
    logprob = torch.zeros(n)
    n_correct = torch.zeros(n, dtype=torch.long)
    argmax: list[torch.Tensor | None] = [None] * n
    order = sorted(range(n), key=lambda i: len(enc.ids[i]))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        input_ids, attn, pos, offsets = pad_batch([enc.ids[i] for i in idx], pad, side, device)
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits[:, :-1]  # (B, T-1, V)
        # position t predicts token t+1; target token j of row b sits at offset + n_prompt + j
        first = offsets + torch.tensor([enc.n_prompt[i] for i in idx]) - 1  # (B,)
        length = torch.tensor([enc.n_target[i] for i in idx])  # (B,)
        cols = torch.arange(logits.shape[1])
        sel = ((cols >= first[:, None]) & (cols < (first + length)[:, None])).to(device)  # (B, T-1)
        picked = logits[sel].float()  # (N, V), rows in (batch, position) order
        labels = input_ids[:, 1:][sel]  # (N,)
        lp = torch.log_softmax(picked, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
        top = picked.argmax(-1)
        row = torch.arange(len(idx), device=device)[:, None].expand_as(sel)[sel]  # (N,) batch row per token
        sums = torch.zeros(len(idx), device=device).index_add_(0, row, lp).cpu()
        hits = torch.zeros(len(idx), dtype=torch.long, device=device).index_add_(0, row, (top == labels).long()).cpu()
        logprob[idx] = sums
        n_correct[idx] = hits
        for i, chunk in zip(idx, top.cpu().split(length.tolist())):
            argmax[i] = chunk
    return Scores(logprob, torch.tensor(enc.n_target), n_correct, argmax)  # type: ignore[arg-type]


def score_targets(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    targets: list[str],
    batch_size: int = 64,
    padding_side: str | None = None,
) -> Scores:
    """Teacher-forced scores of each target after its prompt, in input order."""
    if not prompts:
        empty = torch.zeros(0)
        return Scores(empty, empty.long(), empty.long(), [])
    return score_encoded(model, tokenizer, encode_pairs(tokenizer, prompts, targets), batch_size, padding_side)
