"""Edit metrics against values computed by hand on a bigram model (next token depends on the last word only)."""

import math

import pytest
import torch
from conftest import make_tokenizer, tiny_llama

from evaluation.metrics import (
    build_retain_set,
    counterfact_metrics,
    drawdown,
    edit_success,
    fluency,
    knowledge_accuracy,
    locality_agreement,
    ngram_entropy,
    reference_predictions,
    retention,
    shared_subject,
    zsre_metrics,
)
from kedit.core.facts import EditRequest, Fact, Neighbor
from kedit.core.lm import greedy_generate


@pytest.fixture
def setup(bigram):
    return bigram


def softmax_p(logits_of_target: float, others: dict[int, float], v: int) -> float:
    """P(target) under a softmax whose nonzero logits are ``others`` (all else 0)."""
    z = sum(math.exp(x) for x in others.values()) + (v - len(others))
    return math.exp(logits_of_target) / z


def request(**kw):
    base = dict(id="r", subject="france", prompt="the capital of {} is", target_new="london", target_true="paris")
    base.update(kw)
    return EditRequest(**base)


def test_counterfact_by_hand(setup):
    tok, model, v = setup
    r = request(
        paraphrase_prompts=("france city in", "france city is"),
        neighborhood=(Neighbor("germany capital is", "berlin"), Neighbor("capital of", "berlin")),
    )
    m = counterfact_metrics(model, tok, [r])
    after_is = {0: 2.0, 1: 1.0}
    p_paris, p_london = softmax_p(2, after_is, v), softmax_p(1, after_is, v)
    assert m["efficacy"] == 0.0
    assert m["efficacy_magnitude"] == pytest.approx(p_london - p_paris, abs=1e-6)
    assert m["generalization"] == 0.5
    p_in_london, p_in_paris = softmax_p(3, {0: 3.0}, v), softmax_p(0, {0: 3.0}, v)
    assert m["generalization_magnitude"] == pytest.approx(((p_in_london - p_in_paris) + (p_london - p_paris)) / 2, abs=1e-6)
    assert m["specificity"] == 0.5
    p_berlin_is = softmax_p(0, after_is, v)
    p_of_berlin, p_of_london = softmax_p(1, {0: 1.0}, v), softmax_p(0, {0: 1.0}, v)
    assert m["specificity_magnitude"] == pytest.approx(((p_berlin_is - p_london) + (p_of_berlin - p_of_london)) / 2, abs=1e-6)


def test_counterfact_skips_requests_without_target_true(setup):
    tok, model, _ = setup
    m = counterfact_metrics(model, tok, [request(), request(id="b", target_true=None)])
    assert m["n_requests"] == 1.0


def test_zsre_token_accuracy_by_hand(setup):
    tok, model, _ = setup
    a = request(
        target_new="paris london",
        target_true=None,
        paraphrase_prompts=("france city in",),
        neighborhood=(Neighbor("capital of", "berlin"),),
    )
    b = request(id="b", target_new="london paris", target_true=None)
    m = zsre_metrics(model, tok, [a, b])
    # a: after "is" argmax paris (hit), after "paris" argmax london (hit) -> 1.0
    # b: after "is" argmax paris (miss), after "london" argmax <pad> (miss) -> 0.0
    assert m["efficacy"] == 0.5
    # "france city in" -> "paris london": after "in" argmax london (miss), after "paris" london (hit)
    assert m["generalization"] == 0.5
    assert m["locality"] == 1.0


def test_zsre_generalization_over_records_whose_subject_is_their_own(setup):
    tok, model, _ = setup
    # a and b both ask about france (zsRE's reworded siblings); c alone asks about germany
    a = request(target_new="paris london", target_true=None, paraphrase_prompts=("france city in",))
    b = request(id="b", target_new="london paris", target_true=None)
    c = request(id="c", subject="germany", target_new="paris london", target_true=None, paraphrase_prompts=("france city is",))
    assert shared_subject([a, b, c]).tolist() == [True, True, False]
    assert shared_subject([request(subject="France"), request(subject=" france")]).tolist() == [True, True]
    m = zsre_metrics(model, tok, [a, b, c])
    # a's rephrasing scores 0.5 (by hand above); c's: after "is" paris (hit), after "paris" london (hit)
    assert m["generalization"] == 0.75
    assert m["generalization_distinct_subject"] == 1.0
    assert m["shared_subject"] == pytest.approx(2 / 3)
    # no record with a subject of its own: nothing measured, not a zero
    assert math.isnan(zsre_metrics(model, tok, [a, b])["generalization_distinct_subject"])


def test_retention_and_edit_success(setup):
    tok, model, _ = setup
    held = request(target_new="paris", target_true="london")  # P(paris) > P(london) after "is"
    lost = request(id="l")  # P(london) < P(paris)
    no_true = request(id="n", target_true=None, target_new="paris london")  # greedy gives it
    assert edit_success(model, tok, [held, lost, no_true]).tolist() == [True, False, True]
    assert retention(model, tok, [held, lost, no_true]) == pytest.approx(2 / 3)
    assert math.isnan(retention(model, tok, []))


def test_drawdown_on_retain_set(setup):
    tok, model, _ = setup
    facts = [Fact("france is", "paris"), Fact("capital of", "berlin"), Fact("france in", "paris")]
    retain = build_retain_set(model, tok, facts)
    assert retain == facts[:2]  # after "in" the argmax is london
    assert knowledge_accuracy(model, tok, retain) == 1.0
    with torch.no_grad():  # the model forgets berlin
        model.table[tok.convert_tokens_to_ids("of"), tok.convert_tokens_to_ids("berlin")] = -1.0
    acc = knowledge_accuracy(model, tok, retain)
    assert acc == 0.5
    assert drawdown(1.0, acc) == 0.5
    assert drawdown(0.8, 0.8) == 0.0
    assert math.isnan(drawdown(0.0, 0.0))


def test_locality_agreement_with_the_unedited_model(setup):
    tok, model, _ = setup
    prompts, answers = ["france is", "capital of"], ["paris london", "berlin"]
    ref = reference_predictions(model, tok, prompts, answers)
    assert locality_agreement(model, tok, prompts, answers, ref) == 1.0
    with torch.no_grad():  # change the argmax after "paris": 1 of 2 positions in prompt 0
        model.table[tok.convert_tokens_to_ids("paris"), tok.convert_tokens_to_ids("rome")] = 5.0
    assert locality_agreement(model, tok, prompts, answers, ref) == pytest.approx((0.5 + 1.0) / 2)


def test_ngram_entropy_by_hand():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams ab, ba, ab
    h3 = 1.0  # trigrams aba, bab
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("the the the the the") == 0.0
    assert ngram_entropy("") == 0.0


def test_batched_greedy_generation_matches_single_prompts():
    tok = make_tokenizer()
    model = tiny_llama(len(tok), seed=3)
    prompts = ["the capital of france is", "alice", "who leads the company"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert any(t.split() for t in batched)  # the tiny model does produce words
    assert fluency(model, tok, prompts, max_new_tokens=6) == pytest.approx(sum(map(ngram_entropy, single)) / 3)
