"""Edit-quality metrics: CounterFact, zsRE, locality, retention, knowledge drawdown, fluency.

Each protocol gathers all the prompts of all requests into one list and scores them with
one batched call, so the cost is a handful of padded forward passes, not one per prompt.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kedit.core.facts import EditRequest, Fact
from kedit.core.facts.schema import normalize
from kedit.core.lm import Scores, encode_prompts, greedy_generate, model_device, pad_batch, pad_id_of, score_targets
from kedit.core.routing import routers

# ----------------------------------------------------------------------------- CounterFact


def mean(x: torch.Tensor) -> float:
    """Mean of a bool or float tensor; NaN for an empty one (nothing was measured)."""
    return float(x.float().mean()) if x.numel() else float("nan")


def _pairs(requests: Sequence[EditRequest], which: str) -> tuple[list[str], list[int]]:
    """Prompts of one kind for all requests, with the owning request's index."""
    prompts, owner = [], []
    for i, r in enumerate(requests):
        ps = {"rewrite": [r.text], "paraphrase": list(r.paraphrase_prompts)}[which]
        prompts += ps
        owner += [i] * len(ps)
    return prompts, owner


def counterfact_metrics(model: nn.Module, tokenizer, requests: Sequence[EditRequest], batch_size: int = 64) -> dict[str, float]:
    """ROME's CounterFact protocol on requests that have ``target_true``.

    efficacy: P(new) > P(true) on the edit prompt; generalization: the same on paraphrases;
    specificity: neighbourhood prompts still prefer their own answer over ``target_new``.
    Probabilities are per-token geometric means; ``*_magnitude`` are the mean differences.
    """
    reqs = [r for r in requests if r.target_true is not None]
    pairs = counterfact_pairs(reqs)
    s = score_targets(model, tokenizer, pairs.prompts, pairs.targets, batch_size).prob
    return counterfact_from_probs(pairs, s)


@dataclass(frozen=True)
class CounterFactPairs:
    """All (prompt, target) pairs of the protocol, laid out as [edit x new, edit x true, nb x own, nb x new]."""

    prompts: list[str]
    targets: list[str]
    n_rewrite: int  # edit prompts that are the rewrite prompt itself (the rest are paraphrases)
    n_edit: int
    n_neighbor: int
    n_requests: int


def counterfact_pairs(reqs: Sequence[EditRequest]) -> CounterFactPairs:
    rw, rw_owner = _pairs(reqs, "rewrite")
    pp, pp_owner = _pairs(reqs, "paraphrase")
    nb_prompts = [n.prompt for r in reqs for n in r.neighborhood]
    owners = rw_owner + pp_owner
    targets = (
        [reqs[i].target_new for i in owners]
        + [reqs[i].target_true for i in owners]
        + [n.answer for r in reqs for n in r.neighborhood]
        + [r.target_new for r in reqs for _ in r.neighborhood]
    )
    edit = rw + pp
    return CounterFactPairs(edit * 2 + nb_prompts * 2, targets, len(rw), len(edit), len(nb_prompts), len(reqs))


def counterfact_from_probs(pairs: CounterFactPairs, s: torch.Tensor) -> dict[str, float]:
    n_e, n_n, k = pairs.n_edit, pairs.n_neighbor, pairs.n_rewrite
    p_new, p_true = s[:n_e], s[n_e : 2 * n_e]
    nb_own, nb_edit = s[2 * n_e : 2 * n_e + n_n], s[2 * n_e + n_n :]
    return {
        "efficacy": mean(p_new[:k] > p_true[:k]),
        "efficacy_magnitude": mean(p_new[:k] - p_true[:k]),
        "generalization": mean(p_new[k:] > p_true[k:]),
        "generalization_magnitude": mean(p_new[k:] - p_true[k:]),
        "specificity": mean(nb_own > nb_edit),
        "specificity_magnitude": mean(nb_own - nb_edit),
        "n_requests": float(pairs.n_requests),
    }


# ----------------------------------------------------------------------------- facts edited more than once


@dataclass(frozen=True)
class ReEditCase:
    """A fact's final request (``target_new``: the latest value; ``target_true``: the value before any
    edit) and the edited values it superseded, oldest first (empty for a fact edited once)."""

    request: EditRequest
    superseded: tuple[str, ...] = ()


def reedit_metrics(model: nn.Module, tokenizer, cases: Sequence[ReEditCase], batch_size: int = 64) -> dict[str, float]:
    """Whether the latest value wins over every earlier one (the original and each superseded edit).

    ``latest_wins``: on the edit prompt, P(latest) above P(v) for every earlier value v;
    ``latest_wins_paraphrase``: the same on the paraphrases; ``*_prob``: mean per-token probability on the
    edit prompt of the latest value, of the superseded edited values (NaN when none) and of the original;
    ``specificity``: neighbourhood prompts prefer their own answer over the latest value.
    One batched scoring call: every (prompt, value) pair of every case."""
    prompts, targets, row, kind = [], [], [], []
    n_rows = 0
    rewrite_rows: list[int] = []
    for c in cases:
        r = c.request
        values = [(r.target_new, "latest"), (r.target_true, "original"), *((v, "superseded") for v in c.superseded)]
        values = [(v, k) for v, k in values if v is not None]
        for j, p in enumerate([r.text, *r.paraphrase_prompts]):
            if j == 0:
                rewrite_rows.append(n_rows)
            for v, k in values:
                prompts.append(p)
                targets.append(v)
                row.append(n_rows)
                kind.append(k)
            n_rows += 1
    nb = [(n.prompt, n.answer, c.request.target_new) for c in cases for n in c.request.neighborhood]
    n_pairs = len(prompts)
    prompts += [p for p, _, _ in nb] * 2
    targets += [a for _, a, _ in nb] + [t for _, _, t in nb]
    prob = score_targets(model, tokenizer, prompts, targets, batch_size).prob
    pair, nb_prob = prob[:n_pairs], prob[n_pairs:]
    rows = torch.tensor(row, dtype=torch.long)
    kinds = torch.tensor([{"latest": 0, "original": 1, "superseded": 2}[k] for k in kind], dtype=torch.long)
    latest_mask = kinds == 0
    latest = torch.zeros(n_rows).index_put_((rows[latest_mask],), pair[latest_mask])  # (n_rows,)
    earlier = torch.full((n_rows,), -1.0).scatter_reduce(0, rows[~latest_mask], pair[~latest_mask], "amax")
    wins = latest > earlier  # (n_rows,)
    on_rewrite = torch.zeros(n_rows, dtype=torch.bool)
    on_rewrite[rewrite_rows] = True
    pair_on_rewrite = on_rewrite[rows]

    def prob_of(k: int) -> float:
        return mean(pair[pair_on_rewrite & (kinds == k)])

    n_nb = len(nb)
    return {
        "latest_wins": mean(wins[on_rewrite]),
        "latest_wins_paraphrase": mean(wins[~on_rewrite]),
        "latest_prob": prob_of(0),
        "original_prob": prob_of(1),
        "superseded_prob": prob_of(2),
        "specificity": mean(nb_prob[:n_nb] > nb_prob[n_nb:]),
        "n_cases": float(len(cases)),
    }


# ----------------------------------------------------------------------------- multi-hop portability (MQuAKE)

QUESTION_FORM = "Q: {question} A:"  # a question as a cloze: the answer is the prompt's continuation


def multihop_metrics(
    model: nn.Module, tokenizer, cases: Sequence[tuple[Sequence[str], str, str]], batch_size: int = 64
) -> dict[str, float]:
    """Per (questions, old answer, new answer) case, whether the model answers its multi-hop questions with the
    new answer: P(new) > P(old) after ``QUESTION_FORM`` (per-token probability, as efficacy is scored).

    ``multihop``: share of questions; ``multihop_cases``: share of cases with at least one question answered
    with the new answer (MQuAKE's case-level rule). One batched scoring call."""
    prompts, new, old, owner = [], [], [], []
    for i, (questions, answer, new_answer) in enumerate(cases):
        for q in questions:
            prompts.append(QUESTION_FORM.format(question=q))
            new.append(new_answer)
            old.append(answer)
            owner.append(i)
    if not prompts:
        return {"multihop": float("nan"), "multihop_cases": float("nan"), "n_questions": 0.0}
    p = score_targets(model, tokenizer, prompts * 2, new + old, batch_size).prob
    ok = p[: len(prompts)] > p[len(prompts) :]  # (n_questions,)
    per_case = torch.zeros(len(cases), dtype=torch.long).index_add_(0, torch.tensor(owner), ok.long()) > 0
    return {"multihop": mean(ok), "multihop_cases": mean(per_case), "n_questions": float(len(prompts))}


# ----------------------------------------------------------------------------- zsRE


def zsre_metrics(model: nn.Module, tokenizer, requests: Sequence[EditRequest], batch_size: int = 64) -> dict[str, float]:
    """MEND/ROME zsRE protocol: teacher-forced token accuracy of ``target_new`` on the question
    and its rephrasings, and of the recorded answer on the unrelated (locality) question."""
    rw, rw_owner = _pairs(requests, "rewrite")
    pp, pp_owner = _pairs(requests, "paraphrase")
    loc = [(n.prompt, n.answer) for r in requests for n in r.neighborhood]
    prompts = rw + pp + [p for p, _ in loc]
    targets = [requests[i].target_new for i in rw_owner + pp_owner] + [a for _, a in loc]
    acc = score_targets(model, tokenizer, prompts, targets, batch_size).token_accuracy
    k, m = len(rw), len(rw) + len(pp)
    shared = shared_subject(requests)  # (n,)
    return {
        "efficacy": mean(acc[:k]),
        "generalization": mean(acc[k:m]),
        "generalization_distinct_subject": mean(acc[k:m][~shared[pp_owner]]),
        "locality": mean(acc[m:]),
        "shared_subject": mean(shared),
        "n_requests": float(len(requests)),
    }


def shared_subject(requests: Sequence[EditRequest]) -> torch.Tensor:
    """(n,) bool: another request names the same subject. zsRE asks about one subject several times, mostly
    the same relation reworded with a different new answer each time, so a rephrasing of one such record is
    as much a rephrasing of its siblings: scores over the records whose subject is theirs alone separate
    what an editor generalizes from what the data contradicts."""
    ids = subject_ids(requests)  # (n,)
    return torch.bincount(ids)[ids] > 1


def subject_ids(requests: Sequence[EditRequest]) -> torch.Tensor:
    """(n,) int64: each request's subject as a number, one per distinct subject (case and spacing folded)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(normalize(r.subject), len(ids)) for r in requests], dtype=torch.long)


def begins_with(
    model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """(n,) bool: greedy decoding after each prompt begins with its target, case and spacing folded (what a
    user of the edited model sees; teacher forcing can score an edit that generation never produces)."""
    if not prompts:
        return torch.zeros(0, dtype=torch.bool)
    n_new = max(len(ids) for ids in tokenizer([" " + t for t in targets], add_special_tokens=False)["input_ids"]) + 1
    texts = greedy_generate(model, tokenizer, list(prompts), n_new, batch_size)
    return torch.tensor([normalize(t).startswith(normalize(target)) for t, target in zip(texts, targets)])


# ----------------------------------------------------------------------------- locality as agreement


def reference_predictions(
    model: nn.Module, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 64
) -> list[torch.Tensor]:
    """The unedited model's argmax tokens along each teacher-forced answer (EasyEdit's locality reference)."""
    return score_targets(model, tokenizer, prompts, answers, batch_size).argmax


def locality_agreement(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    reference: list[torch.Tensor],
    batch_size: int = 64,
) -> float:
    """Mean over prompts of the fraction of positions where the model's argmax equals the reference's."""
    if not prompts:
        return float("nan")
    now = score_targets(model, tokenizer, prompts, answers, batch_size).argmax
    return sum(float((a == b).float().mean()) for a, b in zip(now, reference)) / len(prompts)


# ----------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class Holds:
    """Per prompt: whether an edit holds there, and the two probabilities it was decided on."""

    ok: torch.Tensor  # (n,) bool
    p_new: torch.Tensor  # (n,) per-token probability of the new target
    p_true: torch.Tensor  # (n,) of the old answer; NaN where none is known


def prompt_scores(
    model: nn.Module, tokenizer, prompts: Sequence[str], new: Sequence[str], true: Sequence[str | None], batch_size: int = 64
) -> Holds:
    """Per prompt, whether an edit holds there: P(new) > P(true) when the old answer is known,
    otherwise greedy decoding gives the new target (all tokens argmax). One batched scoring call."""
    if not prompts:
        empty = torch.zeros(0)
        return Holds(empty.bool(), empty, empty)
    with_true = [i for i, t in enumerate(true) if t is not None]
    s = score_targets(
        model, tokenizer, list(prompts) + [prompts[i] for i in with_true], list(new) + [true[i] for i in with_true], batch_size
    )
    n = len(prompts)
    ok = s.exact[:n].clone()
    p_true = torch.full((n,), float("nan"))
    if with_true:
        idx = torch.tensor(with_true)
        p_true[idx] = s.prob[n:]
        ok[idx] = s.prob[idx] > s.prob[n:]
    return Holds(ok, s.prob[:n], p_true)


def edit_success(model: nn.Module, tokenizer, requests: Sequence[EditRequest], batch_size: int = 64) -> torch.Tensor:
    """Per request, whether the edit holds on its own prompt (see ``prompt_scores``)."""
    return prompt_scores(
        model,
        tokenizer,
        [r.text for r in requests],
        [r.target_new for r in requests],
        [r.target_true for r in requests],
        batch_size,
    ).ok


def retention(model: nn.Module, tokenizer, earlier: Sequence[EditRequest], batch_size: int = 64) -> float:
    """Fraction of earlier accepted edits that still hold on the current model."""
    return mean(edit_success(model, tokenizer, earlier, batch_size)) if earlier else float("nan")


# ----------------------------------------------------------------------------- knowledge drawdown


def knows(model: nn.Module, tokenizer, facts: Sequence[Fact], batch_size: int = 64) -> torch.Tensor:
    """Per fact, whether greedy decoding after the prompt produces the answer (all tokens argmax)."""
    return score_targets(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts], batch_size).exact


def build_retain_set(model: nn.Module, tokenizer, candidates: Sequence[Fact], batch_size: int = 64) -> list[Fact]:
    """The facts the (unedited) model answers correctly: drawdown is measured on these."""
    ok = knows(model, tokenizer, candidates, batch_size)
    return [f for f, k in zip(candidates, ok.tolist()) if k]


def restated_by(prompts: Sequence[str], requests: Sequence[EditRequest]) -> torch.Tensor:
    """(n_prompts,) bool: the prompts one of ``requests`` asks, case and spacing folded (a retain fact an edit
    rewrites on purpose)."""
    asked = {normalize(r.text) for r in requests}
    return torch.tensor([normalize(p) in asked for p in prompts], dtype=torch.bool)


def knowledge_accuracy(model: nn.Module, tokenizer, facts: Sequence[Fact], batch_size: int = 64) -> float:
    return mean(knows(model, tokenizer, facts, batch_size)) if facts else float("nan")


def drawdown(reference_accuracy: float, accuracy: float) -> float:
    """Knowledge drawdown: the relative drop in accuracy, (ref - now) / ref; 0 is no loss."""
    if not reference_accuracy > 0:
        return float("nan")
    return (reference_accuracy - accuracy) / reference_accuracy


# ----------------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency score: weighted mean of the n-gram entropies (bits) of one text."""
    words = _WORD.findall(text.lower())
    out = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        out.append(w * h)
    return sum(out) / len(out)


def fluency(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 40, batch_size: int = 32) -> float:
    """Mean n-gram entropy of greedy generations; repetitive, degenerate text scores low."""
    if not prompts:
        return float("nan")
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def scores_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per name, one column per metric (numbers only: provenance and other
    records in a result are for the JSON)."""
    cols = sorted({k for r in rows.values() for k, v in r.items() if v is None or isinstance(v, int | float)})
    head = ["", *cols]
    body = [[name, *("-" if r.get(c) is None else f"{r[c]:.3f}" for c in cols)] for name, r in rows.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *body])


# ----------------------------------------------------------------------------- installed memories


@torch.no_grad()
def memory_routing(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> dict[str, float]:
    """How full the model's installed memories are, and the share of ``prompts`` that any of them answers at
    any token (a router hit on an unrelated prompt is a leak); {} when the model has no memory installed."""
    found = routers(model)
    if not found:
        return {}
    ids = encode_prompts(tokenizer, prompts)
    hits = []
    for i in range(0, len(ids), batch_size):
        input_ids, mask, positions, _ = pad_batch(ids[i : i + batch_size], pad_id_of(tokenizer), "right", model_device(model))
        routed = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)  # (B, T)

        def hook(module, args, _routed=routed):
            _routed |= module.routed(args[0])  # (B, T, d_in) -> (B, T): right padded, each row one sequence

        handles = [m.register_forward_pre_hook(hook) for m in found.values()]
        try:
            model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        finally:
            for h in handles:
                h.remove()
        hits.append((routed & mask.bool()).any(-1))
    hit = torch.cat(hits)
    # each memory counts its own entries (a full codebook wrapped by a larger one keeps its own)
    return {"memory_entries": float(sum(m.n_entries() for m in found.values())), "memory_retain_hit_rate": mean(hit)}


__all__ = [
    "Scores",
    "build_retain_set",
    "counterfact_metrics",
    "drawdown",
    "edit_success",
    "fluency",
    "knowledge_accuracy",
    "knows",
    "locality_agreement",
    "begins_with",
    "memory_routing",
    "mean",
    "multihop_metrics",
    "ngram_entropy",
    "ReEditCase",
    "reedit_metrics",
    "Holds",
    "prompt_scores",
    "reference_predictions",
    "retention",
    "scores_table",
    "shared_subject",
    "subject_ids",
    "zsre_metrics",
]
