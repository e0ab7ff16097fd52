"""Facts that change again: resolving against what a chain holds, reading the model's answer, the re-edit metric
(against values computed by hand on a bigram model) and the benchmark's schedule."""

from __future__ import annotations

import math

import pytest

from evaluation.metrics import ReEditCase, reedit_metrics
from kedit.app.bench_reedit import schedule
from kedit.core.facts import EditRequest, Neighbor
from kedit.core.facts.reedit import Held, live_facts, noop_reason, resolve
from kedit.core.lm import cut_answer


def req(
    id: str, subject: str = "Acme", target_new: str = "Ann", target_true: str | None = None, prompt: str = "The CEO of {} is"
):
    return EditRequest(id, subject, prompt, target_new, target_true)


def test_live_facts_keep_the_last_value_per_slot():
    # (edits that did not hold never reach live_facts: Chain.applied leaves them out, see test_flow)
    a, b = req("1", target_new="Ann"), req("2", subject=" acme ", target_new="Bob")
    other = req("4", subject="Initech")
    live = live_facts([(a, "1"), (other, "1"), (b, "2")])
    assert live[a.slot] == Held(b, "2")  # the slot folds case and spacing
    assert live[other.slot].request is other and len(live) == 2


def test_resolve_sorts_first_edits_re_edits_and_no_ops():
    live = live_facts([(req("1", target_new="Ann", target_true="Zed"), "4")])
    fresh = req("n", subject="Initech")
    again = req("r", target_new="Bob", target_true="Zed")  # the feed still believes the old value is Zed
    same = req("s", target_new=" ann ")
    res = resolve([fresh, again, same], live)
    assert res.first == [fresh]
    (reedit,) = res.reedits
    assert reedit.request.target_true == "Ann" and reedit.feed_target_true == "Zed"
    assert reedit.request.key == again.key  # target_true is not part of the fact's identity
    assert reedit.supersedes.version == "4" and reedit.to_dict()["supersedes_version"] == "4"
    assert [r for r, _ in res.noops] == [same]
    assert noop_reason(res.noops[0][1]).startswith("no-op: v4 already holds 'Ann'")
    assert res.to_edit == [fresh, reedit.request]


@pytest.mark.parametrize(
    "text, words, answer",
    [
        (" Tim Cook, who has led it since 2011", 2, "Tim Cook"),
        (" Paris. It is the largest city", 1, "Paris"),
        (" St. Louis and more", 2, "St. Louis"),  # a full stop inside a name is not the end
        (" the U.S.\nNext line", 3, "U.S."),
        (" the heart of the city", 1, "heart"),  # a leading article is not a word of the answer
        (" The", 1, None),
        (" French (a Romance language)", 3, "French"),
        ("\nnothing on the first line", 3, None),
        (" x y z w", 3, "x y z"),
    ],
)
def test_cut_answer(text, words, answer):
    assert cut_answer(text, words) == answer


def p_after(logit: float, others: list[float], v: int) -> float:
    return math.exp(logit) / (sum(math.exp(x) for x in others) + v - len(others))


def test_reedit_metrics_by_hand(bigram):
    tok, model, v = bigram
    r = EditRequest(
        "r",
        "france",
        "the capital of {} is",
        "paris",  # the latest value
        "berlin",  # the value before any edit
        paraphrase_prompts=("france city in",),
        neighborhood=(Neighbor("capital of", "berlin"),),
    )
    m = reedit_metrics(model, tok, [ReEditCase(r, ("london",))])
    # after "is": paris 2 > london 1 > berlin 0; after "in": london 3 beats paris
    assert m["latest_wins"] == 1.0 and m["latest_wins_paraphrase"] == 0.0
    assert m["latest_prob"] == pytest.approx(p_after(2, [2, 1], v), rel=1e-4)
    assert m["superseded_prob"] == pytest.approx(p_after(1, [2, 1], v), rel=1e-4)
    assert m["original_prob"] == pytest.approx(p_after(0, [2, 1], v), rel=1e-4)
    assert m["specificity"] == 1.0  # "capital of" still prefers berlin to paris
    # a fact edited once to london: its original (berlin) is the only earlier value, and paris is not one of them
    once = ReEditCase(EditRequest("o", "france", "the capital of {} is", "london", "berlin"))
    assert reedit_metrics(model, tok, [once])["latest_wins"] == 1.0
    lost = ReEditCase(EditRequest("l", "france", "the capital of {} is", "london", "paris"))
    both = reedit_metrics(model, tok, [ReEditCase(r, ("london",)), lost])
    assert both["latest_wins"] == 0.5 and math.isnan(reedit_metrics(model, tok, [lost])["superseded_prob"])


def test_schedule_spaces_updates_by_the_gap_and_never_repeats_a_slot_in_a_batch():
    relation = {}
    reqs, pool = [], []
    for i in range(40):
        r = req(f"cf-{i}", subject=f"Co{i}", target_new=f"New{i}", target_true=f"Old{i}")
        relation[r.id] = "P1" if i % 2 else "P2"
        reqs.append(r)
    pool = reqs + [req(f"cf-x{i}", subject=f"X{i}", target_new=f"Other{i}") for i in range(6)]
    relation |= {f"cf-x{i}": "P1" for i in range(6)}
    s = schedule(reqs, pool, relation, n_twice=12, n_thrice=4, batch_size=5, gap=2, seed=1)
    flat = [(b, r) for b, batch in enumerate(s.batches) for r in batch]
    assert len(flat) == 40 + 12 + 4 and all(len(b) <= 5 for b in s.batches)
    assert sum(len(v) == 2 for v in s.values.values()) == 8 and sum(len(v) == 3 for v in s.values.values()) == 4
    first_seen: dict[str, int] = {}
    for b, r in flat:
        base, _, k = r.id.partition("@")
        if k:
            assert b - first_seen[f"{base}@{int(k) - 1}" if int(k) > 2 else base] >= 2  # the gap, at least
            assert r.target_new == s.values[base][int(k) - 1]
            assert relation[base] == relation[next(p.id for p in pool if p.target_new == r.target_new)]  # same relation
        first_seen[r.id] = b
    for batch in s.batches:
        assert len({r.slot for r in batch}) == len(batch)
