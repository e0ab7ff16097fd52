"""Gates: strict configuration, and each gate's number computed by hand on a bigram model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import BigramLM, make_tokenizer

from evaluation.gates import (
    Baselines,
    GateConfig,
    GateConfigError,
    default_gates_path,
    edit_checks,
    evaluate,
    gates_from_dict,
    load_gates,
    regression,
)
from kedit.core.facts import EditRequest, Fact, Neighbor


def test_the_shipped_defaults_are_the_code_defaults():
    shipped = load_gates(default_gates_path())
    assert dataclasses.replace(shipped, source="") == dataclasses.replace(GateConfig(), source="")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"efficacy_minimum": 0.9}, "unknown key 'efficacy_minimum'"),
        ({"retention_min": "high"}, "retention_min: expected a non-negative number"),
        ({"drawdown_max": -0.1}, "drawdown_max"),
        ({"capability_tasks": "kedit_mc"}, "capability_tasks: expected a list"),
        ({"capability_max_regression": {"acc": 0.1}}, "not 'task/metric'"),
        ({"capability_max_regression": {"hellaswag/acc": 0.1}}, "'hellaswag' is not in capability_tasks"),
        ({"capability_limit": 0}, "capability_limit"),
        ({"bisect": "yes"}, "bisect: expected true or false"),
    ],
)
def test_bad_gate_files_name_the_file_and_the_key(tmp_path, data, message):
    import yaml

    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(GateConfigError, match=message) as err:
        load_gates(path)
    assert str(path) in str(err.value)


def test_null_disables_a_gate():
    cfg = gates_from_dict({"efficacy_min": None, "capability_tasks": [], "capability_max_regression": {}})
    assert cfg.efficacy_min is None and cfg.capability_tasks == ()


def bigram(tok, favourites: dict[str, dict[str, float]]):
    """P(next | last word): uniform-ish, with chosen log-odds boosts."""
    v = len(tok)
    table = torch.zeros(v, v)
    for prev, nexts in favourites.items():
        for word, logit in nexts.items():
            table[tok.convert_tokens_to_ids(prev), tok.convert_tokens_to_ids(word)] = logit
    return BigramLM(table)


REQ = EditRequest(
    "r1",
    "france",
    "the capital of {} is",
    "rome",
    "paris",
    paraphrase_prompts=("france capital is", "in france the capital city"),
    neighborhood=(Neighbor("the capital of germany is", "berlin"), Neighbor("alice speaks", "french")),
)


def test_edit_checks_by_hand():
    tok = make_tokenizer()
    # after "is": rome > berlin > paris; after "city": paris > rome; after "speaks": french > rome
    model = bigram(tok, {"is": {"rome": 5.0, "berlin": 3.0, "paris": 1.0}, "city": {"paris": 4.0}, "speaks": {"french": 2.0}})
    c = edit_checks(model, tok, [REQ])
    assert c.rewrite_ok.tolist() == [True]  # P(rome | is) > P(paris | is)
    assert c.paraphrase_ok.tolist() == [True, False]  # "... is": rome wins; "... city": paris wins
    assert c.neighbor_ok.tolist() == [False, True]  # germany's "is" now prefers rome; alice keeps french
    assert (c.efficacy, c.generalization, c.specificity) == (1.0, 0.5, 0.5)


def test_evaluate_reports_each_gate_against_its_threshold():
    tok = make_tokenizer()
    before_model = bigram(tok, {"is": {"paris": 5.0, "berlin": 6.0}, "speaks": {"french": 2.0}})
    after_model = bigram(tok, {"is": {"rome": 7.0, "berlin": 6.0, "paris": 5.0}, "speaks": {"french": 2.0}})
    retain = [Fact("the capital of germany is", "berlin"), Fact("alice speaks", "french")]
    before = edit_checks(before_model, tok, [REQ])
    cfg = gates_from_dict({"capability_tasks": [], "capability_max_regression": {}, "generalization_min": 0.6})
    report = evaluate(after_model, tok, cfg, [REQ], before, [], Baselines(retain, 1.0))
    m = report.metrics
    assert m["efficacy"] == 1.0
    assert m["specificity"] == 0.5 and m["specificity_drop"] == pytest.approx(0.5)  # germany flipped to rome
    assert m["retain_accuracy"] == 0.5 and m["drawdown_base"] == 0.5 and m["drawdown_prev"] == 0.5
    failed = {c.gate for c in report.failed}
    assert failed == {"generalization", "specificity_drop", "drawdown_base", "drawdown_prev"}
    assert not report.passed and "drawdown_base=0.5" in report.reason()
    assert "retention" not in {c.gate for c in report.checks}  # nothing earlier to retain: no check, not a pass
    assert report.holding == ["r1"]


def test_retention_counts_only_edits_that_held_before():
    tok = make_tokenizer()
    model = bigram(tok, {"is": {"rome": 5.0, "paris": 1.0}, "speaks": {"french": 3.0, "german": 1.0}})
    held = EditRequest("e1", "france", "the capital of {} is", "rome", "paris")  # holds now
    broken = EditRequest("e2", "bob", "{} speaks", "german", "french")  # does not hold now
    never = EditRequest("e3", "alice", "{} speaks", "german", "french")  # never took: tolerated in its batch
    cfg = gates_from_dict({"capability_tasks": [], "capability_max_regression": {}, "retention_min": 0.9})
    before = edit_checks(model, tok, [REQ])
    report = evaluate(model, tok, cfg, [REQ], before, [held, broken, never], Baselines([], 1.0, {"e1", "e2"}))
    assert report.metrics["retention"] == 0.5  # e1 still holds, e2 broke; e3 is not counted
    assert report.metrics["retention_all"] == pytest.approx(1 / 3)
    assert "retention" in {c.gate for c in report.failed}
    assert set(report.holding) == {"e1", "r1"}


def test_regression_direction():
    assert regression(0.5, 0.4, higher_is_better=True) == pytest.approx(0.2)
    assert regression(20.0, 22.0, higher_is_better=False) == pytest.approx(0.1)
    assert regression(20.0, 18.0, higher_is_better=False) < 0
