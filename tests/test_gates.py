"""Gates: strict gate files, the registry, the suite's hooks, and each gate's number computed by hand on a bigram model."""

from __future__ import annotations

import json
import math
from typing import ClassVar

import pytest
import torch
import yaml
from conftest import BigramLM, make_tokenizer

from evaluation.capability import CapabilityResult
from evaluation.gates import (
    GATES,
    ConfigError,
    Gate,
    GateReport,
    Outcome,
    Threshold,
    at_most,
    default_gates_path,
    edit_outcomes,
    load_gates,
    register_gate,
    regression,
    suite_from_mapping,
)
from evaluation.gates import capability as capability_gate
from kedit.core.config import StrictConfig
from kedit.core.facts import EditRequest, Fact, Neighbor
from kedit.core.paths import project_data_dir

EDITS = {"gate": "edits", "efficacy_min": 0.75, "generalization_min": 0.25, "specificity_max_drop": 0.3}
RETENTION = {"gate": "retention", "min": 0.8}
DRAWDOWN = {"gate": "drawdown", "base_max": 0.15, "step_max": 0.05, "retain_facts": None}
CAPABILITY = {"gate": "capability", "tasks": ["kedit_mc"], "limit": 40, "max_regression": {"kedit_mc/acc": 0.1}}


def suite(*gates: dict, bisect: bool = True):
    return suite_from_mapping({"gates": list(gates), "bisect": bisect})


def write(tmp_path, data) -> str:
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ----------------------------------------------------------------------------- the files


def test_the_shipped_files_keep_their_thresholds():
    shipped = load_gates(default_gates_path())
    assert shipped.names == ["edits", "retention", "drawdown", "memory", "capability"] and shipped.bisect
    params = shipped.params()
    assert params == {
        "bisect": True,
        "spent_at": 0.5,
        "precision": "model",
        "edits.efficacy_min": 0.75,
        "edits.generalization_min": 0.25,
        "edits.specificity_max_drop": 0.3,
        "retention.min": 0.8,
        "retention.sample": 50,
        "retention.full_every": 10,
        "retention.detect": 0.3,
        "drawdown.base_max": 0.15,
        "drawdown.step_max": 0.05,
        "drawdown.retain_facts": None,
        "memory.retain_hit_max": 0.02,
        "memory.retain_facts": None,
        "capability.tasks": ["kedit_mc", "kedit_ppl"],
        "capability.limit": 40,
        "capability.max_regression.kedit_mc/acc": 0.1,
        "capability.max_regression.kedit_ppl/word_perplexity": 0.05,
        "capability.sample": None,
        "capability.full_every": 10,
        "capability.detect": 0.3,
    }
    assert load_gates(project_data_dir() / "gates" / "long.yaml").precision == "auto"  # docs: "The gates on a bf16 copy"
    demo = load_gates(project_data_dir() / "gates" / "demo.yaml").params()
    # the demo logs paraphrases and neighbours without enforcing them; everything else is the default
    assert demo == {**params, "edits.generalization_min": None, "edits.specificity_max_drop": None}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"efficacy_min": 0.9, "bisect": True}, r"efficacy_min\) are the old layout; list gates by name"),
        ({"gates": [EDITS, {**DRAWDOWN, "base_maxx": 0.1}], "bisect": True}, r"gates\[1\]\.base_maxx: unknown key"),
        ({"gates": [EDITS, {"gate": "capabilty"}], "bisect": True}, r"gates\[1\]: unknown gate 'capabilty' \(registered: "),
        ({"gates": [{"efficacy_min": 0.5}], "bisect": True}, r"gates\[0\]: missing key 'gate'"),
        ({"gates": [{**RETENTION, "min": "high"}], "bisect": True}, r"gates\[0\]\.min: "),
        ({"gates": [{**DRAWDOWN, "base_max": -0.1}], "bisect": True}, r"gates\[0\]\.base_max: "),
        (
            {"gates": [{"gate": "drawdown", "base_max": 0.1, "retain_facts": None}], "bisect": True},
            r"gates\[0\]\.step_max: missing",
        ),
        ({"gates": [{**CAPABILITY, "tasks": "kedit_mc"}], "bisect": True}, r"gates\[0\]\.tasks: "),
        ({"gates": [{**CAPABILITY, "tasks": []}], "bisect": True}, r"gates\[0\]\.tasks: "),
        ({"gates": [{**CAPABILITY, "max_regression": {"acc": 0.1}}], "bisect": True}, "not 'task/metric'"),
        (
            {"gates": [{**CAPABILITY, "max_regression": {"hellaswag/acc": 0.1}}], "bisect": True},
            "'hellaswag', which is not in tasks",
        ),
        ({"gates": [{**CAPABILITY, "limit": 0}], "bisect": True}, r"gates\[0\]\.limit"),
        ({"gates": [EDITS, EDITS], "bisect": True}, "listed twice"),
        ({"gates": [EDITS], "bisect": "yes"}, "bisect: "),
        ({"gates": [EDITS]}, "bisect: missing key"),
        ({"gates": [EDITS], "bisect": True, "spent_at": 1.5}, "spent_at: "),
        ({"gates": [EDITS], "bisect": True, "spent_at": 0}, "spent_at: "),
        ({"gates": [EDITS], "bisect": True, "precision": "bf16"}, "precision: "),
        ({"gates": [EDITS], "bisect": True, "precision": "float16"}, "precision: "),  # overflows on some models
    ],
)
def test_bad_gate_files_name_the_file_and_the_key(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=message) as err:
        load_gates(path)
    assert str(err.value).startswith(f"{path}: ")


def test_null_disables_a_threshold_and_a_left_out_gate_is_not_run():
    tok = make_tokenizer()
    model = bigram(tok, {"is": {"paris": 5.0}})  # the edit does not hold: efficacy 0
    s = suite({**EDITS, "efficacy_min": None})
    report = s.measure(model, tok, [REQ], [], s.before(model, tok, [REQ]))
    assert report.metrics["efficacy"] == 0.0 and "efficacy" not in {c.gate for c in report.results}
    assert set(report.metrics) == {"efficacy", "generalization", "specificity", "specificity_drop"}  # no retention, drawdown
    assert set(report.seconds) == {"edits"}


# ----------------------------------------------------------------------------- the numbers, by hand


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


def test_edit_outcomes_by_hand():
    tok = make_tokenizer()
    # after "is": rome > berlin > paris; after "city": paris > rome; after "speaks": french > rome
    model = bigram(tok, {"is": {"rome": 5.0, "berlin": 3.0, "paris": 1.0}, "city": {"paris": 4.0}, "speaks": {"french": 2.0}})
    outcomes = edit_outcomes(model, tok, [REQ])
    assert outcomes.rewrite_ok.tolist() == [True]  # P(rome | is) > P(paris | is)
    assert outcomes.paraphrase_ok.tolist() == [True, False]  # "... is": rome wins; "... city": paris wins
    assert outcomes.neighbor_ok.tolist() == [False, True]  # germany's "is" now prefers rome; alice keeps french
    assert (outcomes.efficacy, outcomes.generalization, outcomes.specificity) == (1.0, 0.5, 0.5)
    assert suite(EDITS).before(model, tok, [REQ]) == {"edits": outcomes.specificity}  # before: the neighbours alone, same number


def test_evaluate_reports_each_gate_against_its_threshold(tmp_path):
    tok = make_tokenizer()
    before_model = bigram(tok, {"is": {"paris": 5.0, "berlin": 6.0}, "speaks": {"french": 2.0}})
    after_model = bigram(tok, {"is": {"rome": 7.0, "berlin": 6.0, "paris": 5.0}, "speaks": {"french": 2.0}})
    retain = tmp_path / "retain.jsonl"
    facts = [Fact("the capital of germany is", "berlin"), Fact("alice speaks", "french")]
    retain.write_text("".join(json.dumps({"prompt": f.prompt, "answer": f.answer}) + "\n" for f in facts))
    s = suite({**EDITS, "generalization_min": 0.6}, RETENTION, {**DRAWDOWN, "retain_facts": str(retain)})
    s.on_base(before_model, tok)  # the base model knows both facts: the retain set
    before = s.before(before_model, tok, [REQ])
    report = s.measure(after_model, tok, [REQ], [], before)
    metrics = report.metrics
    assert metrics["efficacy"] == 1.0
    assert metrics["specificity"] == 0.5 and metrics["specificity_drop"] == pytest.approx(0.5)  # germany flipped to rome
    assert metrics["retain_accuracy"] == 0.5 and metrics["drawdown_base"] == 0.5 and metrics["drawdown_prev"] == 0.5
    failed = {c.gate for c in report.failed}
    assert failed == {"generalization", "specificity_drop", "drawdown_base", "drawdown_prev"}
    assert not report.passed and "drawdown_base=0.5" in report.reason()
    assert "retention" not in {c.gate for c in report.results}  # nothing earlier to retain: no check, not a pass
    assert report.holding == [REQ.key]
    assert "drawdown_prev=0.5 (FAILED; limit 0.05 max over 2 known facts)" in report.reason()

    s.on_accept(report)  # accepted anyway: the previous version now knows half, and losing nothing more passes
    again = s.measure(after_model, tok, [REQ], [REQ], s.before(after_model, tok, [REQ]))
    assert again.metrics["drawdown_prev"] == 0.0 and again.metrics["retention"] == 1.0


def test_drawdown_counts_a_retain_fact_an_edit_restates_and_reports_the_rest_apart(tmp_path):
    tok = make_tokenizer()
    before_model = bigram(tok, {"is": {"paris": 5.0}, "speaks": {"french": 2.0}})
    # after: "is" -> rome everywhere (france's capital was edited on purpose), alice forgot french
    after_model = bigram(tok, {"is": {"rome": 7.0, "paris": 5.0}, "speaks": {"german": 3.0, "french": 2.0}})
    retain = tmp_path / "retain.jsonl"
    facts = [Fact("The Capital of  France is", "paris"), Fact("alice speaks", "french")]
    retain.write_text("".join(json.dumps({"prompt": f.prompt, "answer": f.answer}) + "\n" for f in facts))
    s = suite(EDITS, RETENTION, {**DRAWDOWN, "retain_facts": str(retain)})
    s.on_base(before_model, tok)
    report = s.measure(after_model, tok, [REQ], [], s.before(before_model, tok, [REQ]))
    # both facts lost: the gate counts the restated one (an edit rewrote a fact listed as stable) ...
    assert report.metrics["drawdown_base"] == 1.0 and "drawdown_base" in {c.gate for c in report.failed}
    # ... and reports apart the one no edit asked to change (case and spacing folded when matching the prompt)
    assert report.metrics["retain_restated"] == 1.0 and report.metrics["drawdown_base_unrestated"] == 1.0
    kept = bigram(tok, {"is": {"rome": 7.0, "paris": 5.0}, "speaks": {"french": 2.0}})
    report = s.measure(kept, tok, [REQ], [], s.before(before_model, tok, [REQ]))
    assert report.metrics["drawdown_base"] == 0.5 and report.metrics["drawdown_base_unrestated"] == 0.0
    # an earlier edit of the chain restates it just as the batch's own does
    other = EditRequest("r2", "alice", "{} speaks", "german", "french")
    report = s.measure(kept, tok, [other], [REQ], s.before(before_model, tok, [other]))
    assert report.metrics["retain_restated"] == 2.0 and math.isnan(report.metrics["drawdown_base_unrestated"])  # none left


def test_retention_counts_only_edits_that_held_before():
    tok = make_tokenizer()
    model = bigram(tok, {"is": {"rome": 5.0, "paris": 1.0}, "speaks": {"french": 3.0, "german": 1.0}})
    held = EditRequest("e1", "france", "the capital of {} is", "rome", "paris")  # holds now
    broken = EditRequest("e2", "bob", "{} speaks", "german", "french")  # does not hold now
    never = EditRequest("e3", "alice", "{} speaks", "german", "french")  # never took: tolerated in its batch
    s = suite(EDITS, {**RETENTION, "min": 0.9})
    s.on_accept(GateReport([], {}, {}, [held.key, broken.key]))  # the previous version: e1 and e2 held there
    before = s.before(model, tok, [REQ])
    report = s.measure(model, tok, [REQ], [held, broken, never], before)
    assert report.metrics["retention"] == 0.5  # e1 still holds, e2 broke; e3 is not counted
    assert report.metrics["retention_all"] == pytest.approx(1 / 3)
    assert "retention" in {c.gate for c in report.failed}
    assert set(report.holding) == {held.key, REQ.key}

    s.on_production(model, tok, [held, broken, never])  # restored: what holds is measured on the model
    assert s.measure(model, tok, [REQ], [held, broken, never], before).metrics["retention"] == 1.0


def test_regression_direction():
    assert regression(0.5, 0.4, higher_is_better=True) == pytest.approx(0.2)
    assert regression(20.0, 22.0, higher_is_better=False) == pytest.approx(0.1)
    assert regression(20.0, 18.0, higher_is_better=False) < 0


def test_capability_gate_regresses_against_the_base_and_moves_its_previous_values(monkeypatch):
    values = iter([{"kedit_mc/acc": 0.5}, {"kedit_mc/acc": 0.4}, {"kedit_mc/acc": 0.45}])

    class FakeSuite:  # lm-eval stands aside: the gate's arithmetic and names are what is tested here
        def __init__(self, tasks, limit):
            assert (tuple(tasks), limit) == (("kedit_mc",), 40)

        def evaluate(self, model, tok):
            return CapabilityResult(next(values), {"kedit_mc/acc": True}, {"kedit_mc": 40}, 0.0)

    monkeypatch.setattr(capability_gate, "CapabilitySuite", FakeSuite)
    s = suite(CAPABILITY)
    s.on_base(None, None)  # base: 0.5
    report = s.measure(None, None, [], [], s.before(None, None, []))  # 0.4: 20% worse than the base
    assert report.metrics == {"cap/kedit_mc/acc": 0.4, "cap_regression_base/kedit_mc/acc": pytest.approx(0.2)} | {
        "cap_regression_prev/kedit_mc/acc": pytest.approx(0.2),
        "cap_all_regression_base/kedit_mc/acc": pytest.approx(0.2),  # a full check: the whole is what it checked
    }
    assert [str(c) for c in report.failed] == ["capability:kedit_mc/acc=0.2 (FAILED; limit 0.1 max relative to base)"]
    s.on_accept(report)
    report = s.measure(None, None, [], [], {})  # 0.45: better than the previous version, still 10% under the base
    assert report.metrics["cap_regression_prev/kedit_mc/acc"] == pytest.approx(-0.125)
    assert report.metrics["cap_regression_base/kedit_mc/acc"] == pytest.approx(0.1) and report.passed


def test_a_fact_that_fails_only_a_budget_production_has_mostly_spent_finds_the_budget_spent(monkeypatch):
    # base 0.5; production 0.46 (8% of the 10% allowed: 80% spent); the next fact takes it to 0.4 (20%)
    values = iter([{"kedit_mc/acc": 0.5}, {"kedit_mc/acc": 0.46}, {"kedit_mc/acc": 0.4}, {"kedit_mc/acc": 0.4}])

    class FakeSuite:
        def __init__(self, tasks, limit):
            pass

        def evaluate(self, model, tok):
            return CapabilityResult(next(values), {"kedit_mc/acc": True}, {"kedit_mc": 40}, 0.0)

    monkeypatch.setattr(capability_gate, "CapabilitySuite", FakeSuite)
    tok = make_tokenizer()
    model = bigram(tok, {"is": {"rome": 5.0}})  # REQ's edit holds: the edits gate passes
    spent = suite_from_mapping({"gates": [EDITS, CAPABILITY], "bisect": True, "spent_at": 0.5})
    spent.on_base(model, tok)
    assert spent.gates[1].spent() == {"capability:kedit_mc/acc": 0.0}  # nothing used on the base
    spent.on_accept(spent.measure(model, tok, [REQ], [], spent.before(model, tok, [REQ])))  # production: 0.46
    assert spent.gates[1].spent() == {"capability:kedit_mc/acc": pytest.approx(0.08)}
    report = spent.measure(model, tok, [REQ], [], spent.before(model, tok, [REQ]))
    assert [c.gate for c in report.failed] == ["capability:kedit_mc/acc"] and report.failed[0].budget
    assert spent.budget_spent(report) == (
        "budget spent: capability:kedit_mc/acc is at 0.08 on production, 0.2 with this fact (limit 0.1 relative to base)"
    )
    # the same report, with production at 80% of the budget, under a stricter share, or with no share set
    assert suite_from_mapping({"gates": [CAPABILITY], "bisect": True, "spent_at": 0.9}).budget_spent(report) is None
    assert suite_from_mapping({"gates": [CAPABILITY], "bisect": True}).budget_spent(report) is None
    # a failure that is not a budget's (the fact's own edit) is the fact's: quarantined, whatever the budget
    not_held = bigram(tok, {"is": {"paris": 5.0}})
    both = spent.measure(not_held, tok, [REQ], [], spent.before(not_held, tok, [REQ]))
    assert {"efficacy", "capability:kedit_mc/acc"} <= {c.gate for c in both.failed} and spent.budget_spent(both) is None
    assert spent.budget_spent(GateReport([], {}, {})) is None  # nothing failed


# ----------------------------------------------------------------------------- adding a gate


class ToyConfig(StrictConfig):
    max_batch: Threshold


class ToyGate(Gate):
    """A gate on the batch size, recording the hooks it sees."""

    name = "toy"
    Config = ToyConfig
    calls: ClassVar[list[str]] = []

    seen: ClassVar[list] = []  # the model each hook was handed

    def on_base(self, model, tok):
        self.calls.append("on_base")
        self.seen.append(model)

    def on_production(self, model, tok, earlier):
        self.calls.append("on_production")
        self.seen.append(model)

    def before(self, model, tok, batch):
        self.calls.append("before")
        self.seen.append(model)
        return len(batch)

    def measure(self, step, before):
        self.calls.append("measure")
        self.seen.append(step.model)
        return Outcome({"toy_batch": float(before)}, [at_most("toy", float(len(step.batch)), self.cfg.max_batch)])

    def on_accept(self, report):
        self.calls.append(f"on_accept:{report.metrics['toy_batch']:g}")


@pytest.fixture
def toy_gate():
    register_gate(ToyGate)
    ToyGate.calls.clear()
    ToyGate.seen.clear()
    yield ToyGate
    GATES.pop("toy")


def test_a_new_gate_is_one_class_and_one_entry_in_the_file(tmp_path, toy_gate):
    tok = make_tokenizer()
    model = bigram(tok, {"is": {"rome": 5.0}})
    s = load_gates(write(tmp_path, {"gates": [{"gate": "toy", "max_batch": 1}, EDITS], "bisect": False}))
    assert s.names == ["toy", "edits"] and not s.bisect and s.params()["toy.max_batch"] == 1
    s.on_base(model, tok)
    s.on_production(model, tok, [])
    report = s.measure(model, tok, [REQ, REQ], [], s.before(model, tok, [REQ, REQ]))
    assert report.metrics["toy_batch"] == 2.0 and list(report.seconds) == ["toy", "edits"]
    assert [c.gate for c in report.failed] == ["toy"] and report.reason().startswith("toy=2 (FAILED; limit 1 max")
    s.on_accept(report)
    assert toy_gate.calls == ["on_base", "on_production", "before", "measure", "on_accept:2"]
    with pytest.raises(ValueError, match="already registered"):
        register_gate(ToyGate)


def test_gates_in_a_lower_precision_score_a_fresh_copy_and_leave_the_model_as_it_is(toy_gate):
    """``precision: bfloat16``: every hook is handed a bf16 copy of the model as it is at that hook (an edit between
    ``before`` and ``measure`` is seen), the model keeps its fp32 bits, and scores that bf16 represents exactly are
    the same as on the model itself."""
    tok = make_tokenizer()
    unedited = {"is": {"paris": 5.0, "berlin": 6.0}, "speaks": {"french": 2.0}}
    model = bigram(tok, unedited)
    bits = model.table.detach().clone()
    on_copy = suite_from_mapping({"gates": [{"gate": "toy", "max_batch": 4}, EDITS], "bisect": True, "precision": "bfloat16"})
    on_model = suite({"gate": "toy", "max_batch": 4}, EDITS)
    assert on_copy.params()["precision"] == "bfloat16" and on_model.params()["precision"] == "model"

    on_copy.on_base(model, tok)
    on_copy.on_production(model, tok, [])
    before = on_copy.before(model, tok, [REQ])
    with torch.no_grad():  # the edit: "is" now prefers rome
        model.table[tok.convert_tokens_to_ids("is"), tok.convert_tokens_to_ids("rome")] = 7.0
    edited = model.table.detach().clone()
    report = on_copy.measure(model, tok, [REQ], [], before)

    copies = ToyGate.seen
    assert len(copies) == 4 and all(m is not model and m.table.dtype == torch.bfloat16 for m in copies)
    assert len({id(m) for m in copies}) == 4  # one copy per hook: none outlives a change of the model
    assert torch.equal(copies[2].table.float(), bits) and torch.equal(copies[3].table.float(), edited)
    assert model.table.dtype == torch.float32 and torch.equal(model.table.detach(), edited)
    assert report.metrics["efficacy"] == 1.0 and report.metrics["specificity_drop"] == pytest.approx(0.5)

    ToyGate.seen.clear()
    unedited_model = bigram(tok, unedited)
    same = on_model.measure(model, tok, [REQ], [], on_model.before(unedited_model, tok, [REQ]))
    assert ToyGate.seen == [unedited_model, model]  # "model": the models themselves
    assert {k: report.metrics[k] for k in ("efficacy", "generalization", "specificity", "specificity_drop")} == {
        k: same.metrics[k] for k in ("efficacy", "generalization", "specificity", "specificity_drop")
    }


class _Memory(torch.nn.Module):
    """An installed memory as kedit.core.routing sees one: it routes and counts."""

    def routed(self, x):
        return torch.zeros(x.shape[:-1], dtype=torch.bool)

    def n_entries(self):
        return 257  # not a bfloat16 number


def test_gates_refuse_a_rounded_copy_of_a_model_with_installed_memories():
    """A memory's keys, radii and counts decide by margins rounding moves: with a lower precision the suite refuses a
    memory editor at the stream's start, and a model that has memories installed at any hook; ``model`` scores it."""
    tok = make_tokenizer()
    model = bigram(tok, {"is": {"rome": 5.0}})
    lowered = suite_from_mapping({"gates": [EDITS], "bisect": True, "precision": "bfloat16"}, "g.yaml")
    lowered.refuse_memories(None, model)  # no memory yet, none announced: fine
    with pytest.raises(ConfigError, match=r"g.yaml: precision: bfloat16 .* grace installs memories"):
        lowered.refuse_memories("grace", model)
    suite(EDITS).refuse_memories("grace", model)  # scored as it is: nothing to refuse
    model.add_module("memory", _Memory())
    with pytest.raises(ConfigError, match=r"installed memories \(memory\).*use precision: model"):
        lowered.before(model, tok, [REQ])
    assert suite(EDITS).before(model, tok, [REQ]) == {"edits": 0.0}  # scored on the model itself


def test_a_gate_not_registered_is_an_error_listing_the_registered_ones(tmp_path):
    path = write(tmp_path, {"gates": [{"gate": "toy", "max_batch": 1}], "bisect": True})
    with pytest.raises(
        ConfigError, match=r"unknown gate 'toy' \(registered: capability, drawdown, edits, memory, portability, retention\)"
    ):
        load_gates(path)


# ----------------------------------------------------------------------------- sampled retention


def test_detection_power_counts_every_sample():
    """The hypergeometric tail against enumerating every sample of 4 of 10 edits, 3 of them broken."""
    import itertools

    from evaluation.gates.retention import detection_power

    broken = set(range(3))
    samples = list(itertools.combinations(range(10), 4))
    failing = sum(len(broken & set(s)) / 4 > 1 - 0.75 for s in samples)  # retention 1 - broken share < 0.75
    assert detection_power(10, 4, 0.3, 0.75) == pytest.approx(failing / len(samples))
    assert detection_power(10, 10, 0.3, 0.75) == 1.0 and detection_power(10, 4, 0.0, 0.75) == 0.0


def test_sampled_retention_catches_a_planted_regression_at_the_stated_rate(monkeypatch):
    """200 earlier edits held; a planted step breaks 60 of them (30%). Each step scores a sample of 20 drawn from
    its batch, and over 300 steps the gate fails as often as ``detection_power`` says; every 5th accepted
    version scores all 200."""
    from evaluation.gates import retention as retention_gate

    tok = make_tokenizer()
    model = bigram(tok, {"is": {"rome": 5.0, "paris": 1.0}})
    earlier = [EditRequest(f"e{i}", f"s{i}", "the capital of {} is", "rome", "paris") for i in range(200)]
    broken = {r.key for r in earlier[::10]} | {r.key for r in earlier[1::10]} | {r.key for r in earlier[2::10]}
    scored: list[int] = []

    def planted(model, tok, requests):
        scored.append(len(requests))
        return torch.tensor([r.key not in broken for r in requests])

    monkeypatch.setattr(retention_gate, "edit_success", planted)
    s = suite({**RETENTION, "min": 0.8, "sample": 20, "full_every": 5, "detect": 0.3})
    s.on_accept(GateReport([], {}, {}, [r.key for r in earlier]))  # the previous version: all 200 held
    failed = 0
    for i in range(300):
        batch = [EditRequest(f"b{i}", f"t{i}", "the capital of {} is", "rome", "paris")]
        report = s.measure(model, tok, batch, earlier, s.before(model, tok, batch))
        failed += "retention" in {c.gate for c in report.failed}
    assert scored == [20] * 300  # a sample per step, never the whole chain
    power = retention_gate.detection_power(200, 20, 0.3, 0.8)
    assert report.metrics["retention_power"] == pytest.approx(power)
    assert 0.5 < power < 0.95  # a rate the check below can tell from 0 and from 1
    sd = (power * (1 - power) / 300) ** 0.5
    assert abs(failed / 300 - power) < 4 * sd, (failed, power)

    for _ in range(3):  # versions 2..4 accepted (all 200 held there): the 5th's step scores all of them
        s.on_accept(GateReport([], {}, {}, [r.key for r in earlier]))
    scored.clear()
    report = s.measure(model, tok, batch, earlier, s.before(model, tok, batch))
    assert scored == [200] and report.metrics["retention"] == pytest.approx(0.7)
    assert not set(report.holding) & broken


def test_the_end_of_a_stream_scores_in_full_what_steps_only_sampled(monkeypatch):
    from evaluation.gates import retention as retention_gate

    tok = make_tokenizer()
    model = bigram(tok, {"is": {"rome": 5.0, "paris": 1.0}})
    earlier = [EditRequest(f"e{i}", f"s{i}", "the capital of {} is", "rome", "paris") for i in range(30)]
    broken = {r.key for r in earlier[:6]}
    monkeypatch.setattr(retention_gate, "edit_success", lambda m, t, reqs: torch.tensor([r.key not in broken for r in reqs]))
    s = suite({**RETENTION, "min": 0.5, "sample": 5, "full_every": 100, "detect": 0.3})
    s.on_accept(GateReport([], {}, {}, [r.key for r in earlier]))
    assert s.on_end(model, tok, earlier) == {}  # nothing accepted on a sample yet: nothing to check again
    report = s.measure(model, tok, [REQ], earlier, s.before(model, tok, [REQ]))
    assert report.metrics["retention_scored"] == 5
    s.on_accept(report)
    final = s.on_end(model, tok, earlier)
    held = {r.key for r in earlier} & set(report.holding)  # all 30 less the broken ones the sample found
    lost = len(broken & held)  # the broken edits the sample did not see
    assert lost > 0 and final == {"retention_final": pytest.approx(1 - lost / len(held)), "retention_final_lost": lost}


# ----------------------------------------------------------------------------- the sampled capability gate


class WorldSuite(capability_gate.CapabilitySuite):
    """The project's kedit_mc task (its documents and lm-eval's aggregation, for real) answered by a planted
    world: ``world[doc]`` is 1 where the model answers right. Records the documents each evaluation scored."""

    world: ClassVar[dict[int, int]] = {}
    scored: ClassVar[list[int]] = []

    def evaluate(self, model, tok, docs=None):
        ids = docs if docs is not None else self.doc_ids()
        per_doc = {"kedit_mc/acc": {i: self.world[i] for i in ids["kedit_mc"]}}
        WorldSuite.scored.append(len(ids["kedit_mc"]))
        values = self.aggregate(per_doc, ids)
        return CapabilityResult(values, {"kedit_mc/acc": True}, {"kedit_mc": len(ids["kedit_mc"])}, 0.0, per_doc)


def sampled_suite(monkeypatch, **cfg):
    monkeypatch.setattr(capability_gate, "CapabilitySuite", WorldSuite)
    WorldSuite.world = {i: int(i % 5 < 3) for i in range(60)}  # 24 of the 40 scored documents right
    WorldSuite.scored = []
    s = suite({**CAPABILITY, **cfg})
    tok = make_tokenizer()
    model = bigram(tok, {"is": {"rome": 5.0, "paris": 1.0}})
    s.on_base(model, tok)
    return s, model, tok


def batch_of(i: int) -> list[EditRequest]:
    return [EditRequest(f"b{i}", f"t{i}", "the capital of {} is", "rome", "paris")]


def test_capability_detection_power_is_the_exact_tail():
    from itertools import combinations

    right, total, sample = 6, 10, 4
    docs = ["b"] * 2 + ["r"] * 4 + ["w"] * 4  # 2 of the 6 right answers broken (a share 1/3), 4 wrong on the base
    caught = 0
    for picked in combinations(range(total), sample):
        b = sum(docs[i] == "b" for i in picked)
        k = sum(docs[i] == "r" for i in picked)
        caught += b + k > 0 and b / (b + k) > 0.1
    subsets = math.comb(total, sample)
    assert capability_gate.detection_power(right, total, sample, 1 / 3, 0.1) == pytest.approx(caught / subsets)
    assert capability_gate.detection_power(right, total, total, 1 / 3, 0.1) == 1.0  # the whole set sees it
    assert capability_gate.detection_power(right, total, sample, 0.0, 0.1) == 0.0


def test_sampled_capability_catches_a_planted_regression_at_the_stated_rate(monkeypatch):
    """24 of 40 documents right on the base; a planted step turns 7 of them (30%) wrong. Each step scores 8 of
    the 40, paired with the same 8 on the base: over 300 steps the gate fails as often as ``detection_power``
    says, and a step that changes nothing never fails (the same documents on both sides: no sampling noise)."""
    s, model, tok = sampled_suite(monkeypatch, sample=8, full_every=100, detect=0.3)
    base = dict(WorldSuite.world)
    right = [i for i in range(40) if base[i]]
    for i in range(50):
        report = s.measure(model, tok, batch_of(i), [], s.before(model, tok, batch_of(i)))
        assert report.passed and not report.metrics["cap_regression_base/kedit_mc/acc"] > 0  # 0 (NaN: no right one drawn)
    WorldSuite.world = base | {i: 0 for i in right[::3][:7]}
    WorldSuite.scored.clear()
    failed = 0
    for i in range(300):
        report = s.measure(model, tok, batch_of(1000 + i), [], s.before(model, tok, batch_of(1000 + i)))
        failed += "capability:kedit_mc/acc" in {c.gate for c in report.failed}
    assert WorldSuite.scored == [8] * 300 and report.metrics["cap_scored/kedit_mc"] == 8.0
    power = capability_gate.detection_power(24, 40, 8, 0.3, 0.1)
    assert report.metrics["cap_power/kedit_mc/acc"] == pytest.approx(power)
    assert 0.5 < power < 0.95  # a rate the check below can tell from 0 and from 1
    sd = (power * (1 - power) / 300) ** 0.5
    assert abs(failed / 300 - power) < 4 * sd, (failed, power)
    # cap/ is over all 40 documents, the ones not drawn at their last scored (base) value
    assert report.metrics["cap/kedit_mc/acc"] >= 17 / 40


def test_sampled_capability_full_checks_and_what_production_has_spent(monkeypatch):
    """Every full_every-th accepted version scores all 40; an accepted sample moves production's values by the
    documents it scored; the stream's end scores all of them once more."""
    s, model, tok = sampled_suite(monkeypatch, sample=5, full_every=3)
    right = [i for i in range(40) if WorldSuite.world[i]]
    WorldSuite.world = WorldSuite.world | {i: 0 for i in right[:12]}  # half the right answers lost
    WorldSuite.scored.clear()
    gate = s.gates[0]
    assert s.on_end(model, tok, []) == {}  # nothing accepted on a sample yet
    report = s.measure(model, tok, batch_of(0), [], s.before(model, tok, batch_of(0)))
    s.on_accept(report)
    lost_seen = sum(1 for i in right[:12] if gate.prev_docs["kedit_mc/acc"][i] == 0)  # the lost ones the sample drew
    assert WorldSuite.scored == [5]
    assert gate.spent() == {"capability:kedit_mc/acc": pytest.approx(lost_seen / 24)}
    assert report.metrics["cap/kedit_mc/acc"] == pytest.approx((24 - lost_seen) / 40)
    # the whole's estimate against the base's whole (24 of 40), where the checked regression is the sample's
    assert report.metrics["cap_all_regression_base/kedit_mc/acc"] == pytest.approx(lost_seen / 24)
    s.on_accept(s.measure(model, tok, batch_of(1), [], s.before(model, tok, batch_of(1))))
    report = s.measure(model, tok, batch_of(2), [], s.before(model, tok, batch_of(2)))  # the 3rd version: all 40
    assert WorldSuite.scored == [5, 5, 40] and "cap_scored/kedit_mc" not in report.metrics
    assert report.metrics["cap_regression_base/kedit_mc/acc"] == pytest.approx(0.5)
    s.on_accept(report)
    assert gate.spent() == {"capability:kedit_mc/acc": pytest.approx(0.5)}
    assert s.on_end(model, tok, []) == {}  # the last version was checked in full
    s.on_accept(s.measure(model, tok, batch_of(3), [], s.before(model, tok, batch_of(3))))  # on a sample again
    final = s.on_end(model, tok, [])
    assert WorldSuite.scored[-1] == 40
    assert final == {
        "cap_final/kedit_mc/acc": pytest.approx(12 / 40),
        "cap_final_regression_base/kedit_mc/acc": pytest.approx(0.5),
    }
