"""GRACE's defining properties on a tiny model: a codebook that answers only near its keys."""

import copy

import pytest
import torch
from test_editors import CONTRACT, assert_same_bits, build, snapshot

from editing import EditError, PatchSet, get_editor
from editing.grace.codebook import codebooks
from editing.grace.grace import ADD, GROW, REPLACE, SPLIT
from kedit.core.facts import EditRequest

FRANCE = EditRequest("a", "france", "the capital of {} is", "rome", "paris")
ALICE = EditRequest("b", "alice", "{} speaks", "german", "french")
BOB = EditRequest("c", "bob", "{} speaks", "german", "french")


def grace(radius, capacity=64):
    model, tok, _ = build("grace")
    cls = get_editor("grace")
    hp = cls.preset(model, CONTRACT["grace"] | {"codebook.radius": radius, "codebook.capacity": capacity})
    return model, tok, cls(model, tok, hp)


def logits(model, tok, text):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def book(model, editor):
    return codebooks(model.get_submodule(editor.path()))[0]


def test_an_input_far_from_every_key_gets_the_unedited_output_bit_for_bit():
    model, tok, editor = grace(radius=1e-3)
    base = copy.deepcopy(model)
    editor.edit([FRANCE])
    assert torch.equal(logits(model, tok, "bob speaks"), logits(base, tok, "bob speaks"))
    edited, unedited = logits(model, tok, FRANCE.text), logits(base, tok, FRANCE.text)
    assert not torch.equal(edited[0, -1], unedited[0, -1])  # the edited prompt's last token hits its key
    assert torch.equal(edited[0, :-1], unedited[0, :-1])  # and only that position changes


def test_a_conflicting_target_inside_a_radius_splits_both_radii_to_half_the_distance():
    model, tok, editor = grace(radius=10.0)  # every key of the tiny model lies within 10 of every other
    editor.edit([FRANCE, ALICE])
    assert editor.diagnostics["action"] == [ADD, SPLIT]
    d = editor.diagnostics["nearest_distance"][1]
    (cb,) = book(model, editor)
    assert cb.n_entries() == 2 and torch.allclose(cb.radii[:2], torch.tensor([d / 2, d / 2]))


def test_the_same_target_inside_a_radius_grows_the_entry_and_adds_none():
    model, tok, editor = grace(radius=10.0)
    editor.edit([ALICE])
    editor.edit([BOB])
    assert editor.diagnostics["action"] == [GROW] and "value_nll" not in editor.diagnostics
    (cb,) = book(model, editor)
    assert cb.n_entries() == 1 and float(cb.radii[0]) == pytest.approx(10.0)  # already wider than the distance


def test_a_reedit_of_a_held_fact_replaces_its_entry_and_the_chain_rebuilds_it(tmp_path):
    model, tok, editor = grace(radius=1e-3)
    base = copy.deepcopy(model)
    patches = [editor.edit([FRANCE, ALICE])]
    (cb,) = book(model, editor)
    value = cb.values[1].clone()
    patches.append(editor.edit([EditRequest("b2", "alice", "{} speaks", "english", "german")]))
    assert editor.diagnostics["action"] == [REPLACE] and cb.n_entries() == 2 and len(editor.state_dict()["slots"]) == 2
    assert not torch.equal(cb.values[1], value)
    assert patches[1].weights.parts.keys() == {f"{editor.path()}.{n}" for n in ("keys", "values", "radii")}  # rows, no install
    for i, p in enumerate(patches):
        PatchSet.load(tmp_path / str(i), p.save(tmp_path / str(i))).apply(base)
    assert_same_bits(snapshot(base), snapshot(model))


def test_a_full_codebook_is_wrapped_by_a_larger_one_and_the_chain_rebuilds_it(tmp_path):
    model, tok, editor = grace(radius=1e-3, capacity=1)
    base = copy.deepcopy(model)
    patches = [editor.edit([FRANCE]), editor.edit([ALICE, BOB])]
    assert [(cb.capacity, cb.n_entries()) for cb in book(model, editor)] == [(1, 1), (2, 2)]
    # a later edit changes rows in both: the inner one's entry (a re-edit) and a new one in a third codebook
    carol = EditRequest("d", "carol", "{} speaks", "english", "french")
    patches.append(editor.edit([carol, EditRequest("a2", "france", "the capital of {} is", "berlin", "rome")]))
    assert editor.diagnostics["action"] == [ADD, REPLACE]
    assert [(cb.capacity, cb.n_entries()) for cb in book(model, editor)] == [(1, 1), (2, 2), (4, 1)]
    # only the first codebook's rows changed, named as the model was before this edit wrapped a third around it
    inner = f"{editor.path()}.original"
    assert patches[2].weights.parts.keys() == {f"{inner}.{n}" for n in ("keys", "values", "radii")}
    for i, p in enumerate(patches):
        PatchSet.load(tmp_path / str(i), p.save(tmp_path / str(i))).apply(base)
    assert_same_bits(snapshot(base), snapshot(model))
    assert torch.equal(logits(base, tok, ALICE.text), logits(model, tok, ALICE.text))
    editor.revert()  # the last edit's codebook comes off, and the first one's entry is as it was
    assert [(cb.capacity, cb.n_entries()) for cb in book(model, editor)] == [(1, 1), (2, 2)]


def test_bypassed_runs_the_base_layer_under_nested_codebooks_and_puts_them_back():
    """``editing.patches.bypassed`` (what the bench's latency ratio times against): the model without its
    installs computes the base's outputs bit for bit, and every codebook is back afterwards."""
    from editing.patches import bypassed

    model, tok, editor = grace(radius=1e-3, capacity=1)
    base = copy.deepcopy(model)
    editor.edit([FRANCE])
    editor.edit([ALICE, BOB])  # a second codebook around the first
    stack = book(model, editor)
    assert not torch.equal(logits(model, tok, ALICE.text), logits(base, tok, ALICE.text))
    with bypassed(model):
        assert book(model, editor) == []
        assert torch.equal(logits(model, tok, ALICE.text), logits(base, tok, ALICE.text))
    assert book(model, editor) == stack and all(a is b for a, b in zip(book(model, editor), stack))


def test_state_that_does_not_match_the_model_is_refused():
    model, tok, editor = grace(radius=1e-3)
    editor.edit([FRANCE])
    fresh = get_editor("grace")(model, tok, editor.hparams)  # an empty state, a model with one entry
    with pytest.raises(EditError, match="holds 1 codebook entries .* state 0"):
        fresh.edit([ALICE])
    with pytest.raises(EditError, match="'slots' and 'labels'"):
        fresh.load_state_dict({})


def test_the_memory_gate_logs_the_codebook_and_fails_a_leaking_one(tmp_path):
    from evaluation.gates import Step
    from evaluation.gates.memory import MemoryConfig, MemoryGate
    from kedit.app.tiny import write_jsonl

    retain = write_jsonl(
        tmp_path / "retain.jsonl", [{"prompt": "bob speaks", "answer": "german"}, {"prompt": "rome is a", "answer": "city"}]
    )
    gate = MemoryGate(MemoryConfig(retain_hit_max=0.0, retain_facts=str(retain)))
    for radius, rate in [(1e-3, 0.0), (1e3, 1.0)]:  # a radius that takes in everything answers every prompt
        model, tok, editor = grace(radius)
        gate.on_base(model, tok)
        assert gate.measure(Step(model, tok, [], []), None).metrics == {}  # no memory installed: nothing measured
        editor.edit([FRANCE])
        out = gate.measure(Step(model, tok, [], []), None)
        assert out.metrics == {"memory_entries": 1.0, "memory_retain_hit_rate": rate}
        assert [r.passed for r in out.results] == [rate == 0.0]


def test_the_memory_gate_leaves_out_a_retain_prompt_an_edit_restates(tmp_path):
    from evaluation.gates import Step
    from evaluation.gates.memory import MemoryConfig, MemoryGate
    from kedit.app.tiny import write_jsonl

    restated = FRANCE.text  # the retain set lists the fact the edit rewrites
    retain = write_jsonl(
        tmp_path / "retain.jsonl", [{"prompt": restated, "answer": "paris"}, {"prompt": "bob speaks", "answer": "german"}]
    )
    gate = MemoryGate(MemoryConfig(retain_hit_max=0.0, retain_facts=str(retain)))
    model, tok, editor = grace(1e-3)  # a radius that takes in the edit's own prompt and nothing else
    gate.on_base(model, tok)
    editor.edit([FRANCE])
    assert gate.measure(Step(model, tok, [], []), None).metrics["memory_retain_hit_rate"] == 0.5  # no edit named: a leak
    for step in (Step(model, tok, [FRANCE], []), Step(model, tok, [], [FRANCE])):  # the batch's or an earlier edit
        out = gate.measure(step, None)
        assert out.metrics["memory_retain_hit_rate"] == 0.0 and out.results[0].passed
