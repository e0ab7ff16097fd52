"""Batched teacher-forced scoring of target continuations: one padded forward pass per batch.

Given prompts and targets, every metric in kedit reduces to three numbers per pair: the
summed log-probability of the target tokens, how many target tokens the model's argmax
predicts, and the argmax tokens themselves (for agreement with a reference model).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kedit.core.routing import decoding, sequences


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


@dataclass(frozen=True)
class _Row:
    """One packed row: a prompt followed by every target scored after it."""

    prompt: list[int]
    pairs: list[int]  # indices into Encoded, one per target
    targets: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.prompt) + sum(len(t) for t in self.targets)


def _pack(enc: Encoded) -> list[_Row]:
    """Group pairs that share a prompt: the prompt is computed once for all its targets."""
    rows: dict[tuple[int, ...], _Row] = {}
    for i, (ids, n_p) in enumerate(zip(enc.ids, enc.n_prompt)):
        key = tuple(ids[:n_p])
        row = rows.setdefault(key, _Row(list(key), [], []))
        row.pairs.append(i)
        row.targets.append(ids[n_p:])
    return sorted(rows.values(), key=lambda r: r.length)


def _packed_batch(rows: list[_Row], pad_id: int, side: str, device: torch.device, dtype: torch.dtype):
    """Input ids, a 4D additive attention mask and position ids for packed rows.

    Row layout: ``prompt | target_1 | target_2 | ...``. Each target's tokens see the prompt
    and their own earlier tokens, never another target; positions restart after the prompt
    for each target, so every target is scored exactly as if it followed the prompt alone.
    Returns also, per target token, its (row, column) of prediction and its label column.
    """
    seqs, segs, poss = [], [], []
    pred_rows, pred_cols, label_cols = [], [], []
    for b, r in enumerate(rows):
        seq, seg, pos = list(r.prompt), [0] * len(r.prompt), list(range(len(r.prompt)))
        for k, t in enumerate(r.targets, start=1):
            start = len(seq)
            # token j of target k is predicted at the column of token j-1 (the last prompt token for j = 0)
            pred_cols.append([len(r.prompt) - 1] + list(range(start, start + len(t) - 1)))
            label_cols.append(list(range(start, start + len(t))))
            pred_rows.append(b)
            seq += t
            seg += [k] * len(t)
            pos += range(len(r.prompt), len(r.prompt) + len(t))
        seqs.append(seq)
        segs.append(seg)
        poss.append(pos)
    input_ids, valid, _, offsets = pad_batch(seqs, pad_id, side, torch.device("cpu"))
    width = input_ids.shape[1]
    seg_t = torch.full((len(rows), width), -1, dtype=torch.long)
    pos_t = torch.zeros((len(rows), width), dtype=torch.long)
    flat = valid.bool()
    seg_t[flat] = torch.tensor([x for s in segs for x in s])
    pos_t[flat] = torch.tensor([x for p in poss for x in p])
    i = torch.arange(width)
    causal = i[None, :] <= i[:, None]  # (T, T): key j <= query i
    same = (seg_t[:, None, :] == 0) | (seg_t[:, None, :] == seg_t[:, :, None])  # (B, T, T)
    allowed = causal[None] & same & flat[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding queries attend to themselves: no NaN rows
    mask = additive_mask(allowed, dtype)
    lens = [len(c) for c in label_cols]
    tok_rows = torch.tensor([b for b, n in zip(pred_rows, lens) for _ in range(n)])
    shift = offsets[tok_rows]
    tok_pred = torch.tensor([c for cs in pred_cols for c in cs]) + shift
    tok_label = torch.tensor([c for cs in label_cols for c in cs]) + shift
    return (
        input_ids.to(device),
        mask.to(device),
        pos_t.to(device),
        tok_rows.to(device),
        tok_pred.to(device),
        tok_label.to(device),
        lens,
    )


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, K) booleans -> the (B, 1, Q, K) additive attention mask a model takes as is."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head (and Gemma's logit soft-capping) on final hidden states (N, d) -> (N, V) fp32."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def logits_at(model: nn.Module, input_ids, mask, positions, rows, cols) -> torch.Tensor:
    """Logits only where a target token is predicted: the LM head is skipped elsewhere.

    (N, V) in fp32. Falls back to the full forward for models without a separate base model.
    """
    base = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is model or head is None:
        return model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[rows, cols].float()
    hidden = base(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state
    return head_logits(model, hidden[rows, cols])


@torch.inference_mode()
def score_encoded(model: nn.Module, tokenizer, enc: Encoded, batch_size: int = 64, padding_side: str | None = None) -> Scores:
    """Score pre-encoded pairs: pairs sharing a prompt are packed into one row, rows of
    similar length are batched, and each batch is one forward pass."""
    n = len(enc.ids)
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    pad = pad_id_of(tokenizer)
    logprob = torch.zeros(n)
    n_correct = torch.zeros(n, dtype=torch.long)
    argmax: list[torch.Tensor | None] = [None] * n
    rows = _pack(enc)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        input_ids, mask, pos, tok_rows, tok_pred, tok_label, lens = _packed_batch(batch, pad, side, device, dtype)
        # a router that decides on a sequence sees each target after its prompt, as attention does
        with sequences(model, lambda m=mask: m[:, 0] == 0):
            logits = logits_at(model, input_ids, mask, pos, tok_rows, tok_pred)  # (N, V)
        labels = input_ids[tok_rows, tok_label]  # (N,)
        lp = torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
        top = logits.argmax(-1)
        pair = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
        sums = torch.zeros(len(lens), device=device).index_add_(0, pair, lp).cpu()
        hits = torch.zeros(len(lens), dtype=torch.long, device=device).index_add_(0, pair, (top == labels).long()).cpu()
        idx = [i for r in batch for i in r.pairs]
        logprob[idx] = sums
        n_correct[idx] = hits
        for i, chunk in zip(idx, top.cpu().split(lens)):
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


@torch.inference_mode()
def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the BOS token where the tokenizer's model expects one."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    return [bos + e for e in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def greedy_generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 40, batch_size: int = 32) -> list[str]:
    """Greedy continuations, batched with left padding; returns only the generated text."""
    enc = encode_prompts(tokenizer, prompts)
    device = model_device(model)
    pad = pad_id_of(tokenizer)
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]))
    for start in range(0, len(prompts), batch_size):
        idx = order[start : start + batch_size]
        input_ids, attn, _, _ = pad_batch([enc[i] for i in idx], pad, "left", device)
        with decoding(model, attn):  # a router that decides on a sequence carries it from the prompt on
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        texts = tokenizer.batch_decode(gen[:, input_ids.shape[1] :], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = t
    return out


# where a greedy continuation stops being the answer: a line break, a clause mark, or a full stop that ends a
# sentence: followed by a space or the end, and not closing a one- or two-letter capitalised abbreviation
# ("St. Louis", "Dr. Who", "U.S." keep theirs)
_ANSWER_END = re.compile(r"[\n,;:!?()\[\]\"“”]|(?<!\b[A-Z])(?<!\b[A-Z][a-z])\.(?=\s|$)")


# a value is a name ("Paris", "Tim Cook"): the articles a continuation opens with are not part of it
_ARTICLES = frozenset({"the", "a", "an"})


def cut_answer(text: str, max_words: int = 4) -> str | None:
    """The answer a continuation states: up to the first line break, clause mark (``, ; : ! ? ( ) [ ] "``)
    or sentence-ending full stop, without leading articles, then at most ``max_words`` words; None when
    nothing is left."""
    words = _ANSWER_END.split(text, maxsplit=1)[0].split()
    while words and words[0].lower() in _ARTICLES:
        words = words[1:]
    return " ".join(words[:max_words]) or None


def current_answers(
    model: nn.Module, tokenizer, prompts: list[str], max_words: list[int], max_new_tokens: int = 8, batch_size: int = 32
) -> list[str | None]:
    """What the model answers now after each prompt: a greedy continuation of ``max_new_tokens``, cut by
    ``cut_answer`` to at most ``max_words[i]`` words. One batched generation for all prompts."""
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [cut_answer(t, n) for t, n in zip(texts, max_words)]
