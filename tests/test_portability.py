"""Multi-hop portability: the metric against one-question-at-a-time scoring, the MQuAKE loader and the optional gate."""

from __future__ import annotations

import json
import math

import pytest
from conftest import make_tokenizer, tiny_llama

from evaluation.gates import Step, suite_from_mapping
from evaluation.metrics import QUESTION_FORM, multihop_metrics
from kedit.core.facts import FactFileError
from kedit.core.facts.formats.mquake import load_multihop
from kedit.core.lm import score_targets


def rewrite(subject: str, prompt: str, new: str, old: str) -> dict:
    return {
        "prompt": prompt,
        "relation_id": "P1",
        "subject": subject,
        "target_new": {"str": new},
        "target_true": {"str": old},
        "question": f"who is {subject}?",
    }


CASES = [
    {
        "case_id": 1,
        "requested_rewrite": [rewrite("alice", "{} speaks", "german", "french"), rewrite("bob", "{} speaks", "french", "german")],
        "questions": ["what does alice speak", "which language is alice speaking"],
        "answer": "french",
        "new_answer": "german",
    },
    {
        "case_id": 2,
        "requested_rewrite": [rewrite("carol", "the ceo of {} is", "eve", "dave")],
        "questions": ["who leads carol"],
        "answer": "dave",
        "new_answer": "eve",
    },
]


@pytest.fixture
def model_tok():
    tok = make_tokenizer()
    return tiny_llama(len(tok), seed=3), tok


def test_multihop_metrics_equal_scoring_each_question_alone(model_tok):
    model, tok = model_tok
    cases = [(c["questions"], c["answer"], c["new_answer"]) for c in CASES]
    m = multihop_metrics(model, tok, cases)
    wins = []
    for questions, old, new in cases:
        one = [
            score_targets(model, tok, [QUESTION_FORM.format(question=q)], [new]).prob[0]
            > score_targets(model, tok, [QUESTION_FORM.format(question=q)], [old]).prob[0]
            for q in questions
        ]
        wins.append(one)
    flat = [w for ws in wins for w in ws]
    assert m["n_questions"] == 3
    assert m["multihop"] == pytest.approx(sum(flat) / 3)
    assert m["multihop_cases"] == pytest.approx(sum(any(ws) for ws in wins) / 2)
    assert math.isnan(multihop_metrics(model, tok, [])["multihop"])


def test_load_multihop_validates_each_rewrite_and_names_the_case(tmp_path):
    path = tmp_path / "mq.json"
    path.write_text(json.dumps(CASES))
    cases = load_multihop(path)
    assert [len(c.requests) for c in cases] == [2, 1] and cases[0].new_answer == "german"
    assert cases[1].requests[0].text == "the ceo of carol is"
    bad = [dict(CASES[0], requested_rewrite=[rewrite("alice", "no placeholder", "german", "french")])]
    path.write_text(json.dumps(bad))
    with pytest.raises(FactFileError, match=r"case 0: field 'prompt'"):
        load_multihop(path)


def test_portability_gate_measures_only_cases_whose_rewrites_are_all_live(model_tok, tmp_path):
    model, tok = model_tok
    path = tmp_path / "mq.json"
    path.write_text(json.dumps(CASES))
    suite = suite_from_mapping({"gates": [{"gate": "portability", "questions": str(path), "min": 0.0}], "bisect": False})
    suite.on_base(model, tok)
    (gate,) = suite.gates
    first, second = gate.cases[0].requests
    (third,) = gate.cases[1].requests
    # half of case 1 live: nothing complete, nothing checked
    out = gate.measure(Step(model, tok, [first], []), None)
    assert out.metrics["portability_cases"] == 0 and math.isnan(out.metrics["portability"]) and out.results == []
    # the rest of case 1 in this batch, case 2 earlier: both complete
    out = gate.measure(Step(model, tok, [second], [first, third]), None)
    assert out.metrics["portability_cases"] == 2 and out.results[0].passed
    # a later value of one slot makes its case incomplete again
    moved = type(first)(first.id, first.subject, first.prompt, "english", "german")
    out = gate.measure(Step(model, tok, [moved], [first, second, third]), None)
    assert out.metrics["portability_cases"] == 1
