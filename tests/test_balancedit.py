"""BalancEdit's defining properties on a tiny model: each fact's scope is learned from its own samples, and a
benchmark never scores what the editor used as a sample."""

import copy

import pytest
import torch
from conftest import make_tokenizer
from test_bench import write_zsre
from test_editors import CONTRACT, CORPUS, assert_same_bits, build, snapshot

from editing import EditError, get_editor
from editing.balancedit import balancedit as balancedit_module
from editing.balancedit.balancedit import Background
from editing.grace.codebook import Answers, Scope, codebooks
from editing.grace.grace import ADD, REPLACE
from editing.hooks import capture, start_at_block
from editing.keys import read_at_subject, read_every_position
from editing.patches import PatchSet
from editing.stats import Corpus
from kedit.core.errors import KeditError
from kedit.core.facts import EditRequest
from kedit.core.facts.schema import normalize
from kedit.core.lm import score_targets
from kedit.store.squash import squash_patches

ALICE = EditRequest("a", "alice", "{} speaks", "german", "french")
BOB = EditRequest("b", "bob", "{} speaks", "french", "german")
PARIS = EditRequest("c", "france", "the capital of {} is", "rome", "paris")


def balancedit(corpus=CORPUS, **overrides):
    model, tok, _ = build("balancedit")
    cls = get_editor("balancedit")
    return model, tok, cls(model, tok, cls.preset(model, CONTRACT["balancedit"] | overrides), corpus=corpus)


def the_book(model, editor):
    (cb,) = codebooks(model.get_submodule(editor.path()))[0]
    return cb


def routed(model, tok, editor, requests):
    """(n, T) which tokens of each request's prompt the codebook answers, the subject's last token per row."""
    states, at, real = read_every_position(model, tok, requests, editor.path())
    hit = the_book(model, editor).routed(states.reshape(-1, states.shape[-1])).reshape(real.shape)
    return hit & real, at


def test_the_scope_takes_in_the_positives_and_leaves_out_every_negative():
    model, tok, editor = balancedit()
    editor.edit([ALICE, BOB])
    d = editor.diagnostics
    assert d["action"] == [ADD, ADD] and min(d["positives"]) > 0
    # the radius sits strictly between what must be taken in and the nearest thing that must not
    for r, far, near, sep in zip(d["radius"], d["farthest_positive"], d["nearest_negative"], d["separable"]):
        assert r < near and (r > far if sep else True)
    # the edit prompt is answered at its subject's token only, and the other subject of the batch not at all
    pos = [EditRequest(q, "alice", p, "german") for q, p in [("p", "{} speaks"), ("q", "Q: {} speaks A:")]]
    hit, at = routed(model, tok, editor, pos)
    expected = torch.zeros_like(hit)
    expected[torch.arange(len(pos)), at] = True
    assert torch.equal(hit, expected)
    # the same prompt about the batch's other subject is a negative of each: there, only that subject's entry answers
    states, at, _ = read_every_position(model, tok, [ALICE, BOB], editor.path())
    idx, hit = the_book(model, editor).lookup(states[torch.arange(2), at])
    assert hit.all() and idx.tolist() == [0, 1]


def test_ordinary_text_bounds_every_scope_unless_it_names_the_subject():
    """The background: states of ordinary text at the key's layer are negatives of every fact, except in text that
    names the fact's subject (text about alice is not unrelated to her)."""
    window = {"scope.background_window": 8}
    radius = {}
    for name, corpus, tokens in [("none", CORPUS, 0), ("naming", Corpus("t", ("<s> alice speaks", "the weather is fine")), 64)]:
        model, tok, editor = balancedit(corpus, **{"scope.background_tokens": tokens} | window)
        editor.edit([ALICE])
        radius[name] = editor.diagnostics["radius"][0]
    # read as keys are read: that text's "alice" after <s> is her key itself, yet it leaves her scope as it was
    path = editor.path()
    key = read_at_subject(model, tok, [ALICE], ("{}",), [path], "input")[path].cpu()  # (1, d_in)
    assert torch.cdist(key, editor.background().states).min() < 1e-4
    assert radius["naming"] == radius["none"] > 0
    # a state of text that does not name alice, planted a quarter of her scope's radius from her key
    direction = torch.randn(key.shape, generator=torch.Generator().manual_seed(0))
    planted = key + 0.25 * radius["none"] * direction / direction.norm()
    hit = {}
    for name, tokens in [("none", 0), ("planted", 64)]:
        model, tok, editor = balancedit(CORPUS, **{"scope.background_tokens": tokens} | window)
        if tokens:
            editor._background = Background(planted, torch.zeros(1, dtype=torch.long), ("the weather is fine",))
        editor.edit([ALICE])
        hit[name] = bool(the_book(model, editor).routed(planted))
        radius[name] = editor.diagnostics["radius"][0]
    assert hit == {"none": True, "planted": False} and radius["planted"] < 0.25 * radius["none"]


def test_an_input_outside_every_scope_gets_the_unedited_output_bit_for_bit():
    model, tok, editor = balancedit()
    base = copy.deepcopy(model)
    editor.edit([PARIS])
    ids = tok("bob speaks german", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_a_reedit_replaces_the_entry_and_recomputes_its_scope():
    model, tok, editor = balancedit()
    editor.edit([ALICE])
    editor.commit()
    editor.edit([EditRequest("a2", "alice", "{} speaks", "english", "german")])
    assert editor.diagnostics["action"] == [REPLACE] and the_book(model, editor).n_entries() == 1


@pytest.mark.parametrize("batches", ["one after the other", "in one batch"])
def test_a_second_fact_about_a_subject_that_opens_its_prompt_is_keyed_where_its_prompt_ends(batches):
    """Prompts that open with one subject read one key there (a causal state sees only the tokens up to it): at
    distance 0 neither entry is nearer, so the later fact is keyed at its prompt's end (GRACE's key), and both
    facts hold."""
    home = EditRequest("h", "alice", "{} lives in", "rome", "paris")
    model, tok, editor = balancedit()
    prompts = [ALICE.text, home.text]
    before = score_targets(model, tok, prompts, [ALICE.target_new, home.target_new]).mean_logprob
    if batches == "in one batch":
        editor.edit([ALICE, home])
        assert editor.diagnostics["keyed_at_prompt_end"] == [0.0, 1.0]
    else:
        editor.edit([ALICE])
        editor.commit()
        editor.edit([home])
        assert editor.diagnostics["keyed_at_prompt_end"] == [1.0] and editor.diagnostics["action"] == [ADD]
    n = 2 if batches == "in one batch" else 1
    assert all(len(v) == n for v in editor.diagnostics.values()), "diagnostics: one value per request"
    new = score_targets(model, tok, prompts, [ALICE.target_new, home.target_new]).mean_logprob
    old = score_targets(model, tok, prompts, [ALICE.target_true, home.target_true]).mean_logprob
    # keyed at the subject as well, the second fact would get the first one's value: its target would not move
    assert (new > before + 0.25).all() and (new > old).all(), f"new {before.tolist()} -> {new.tolist()}, old {old.tolist()}"
    # the second fact's prompt is answered at its last token, the subject's token by the first fact's entry
    hit, at = routed(model, tok, editor, [home])
    assert hit[0, at[0]] and hit[0, -1]


def test_a_subject_that_is_its_prompts_first_token_is_keyed_where_its_prompt_ends():
    """Without BOS a prompt that opens with a one-token subject reads its key where nothing precedes it: the
    token's state alone, near every text's first token. Such a fact is keyed at its prompt's end, and holds."""
    model, _, _ = build("balancedit")
    tok = make_tokenizer(add_bos=False)
    cls = get_editor("balancedit")
    editor = cls(model, tok, cls.preset(model, CONTRACT["balancedit"]), corpus=CORPUS)
    before = score_targets(model, tok, [ALICE.text], [ALICE.target_new]).mean_logprob
    editor.edit([ALICE, PARIS])
    assert editor.diagnostics["keyed_at_prompt_end"] == [1.0, 0.0]  # "the capital of france is": france is not first
    new = score_targets(model, tok, [ALICE.text], [ALICE.target_new]).mean_logprob
    old = score_targets(model, tok, [ALICE.text], [ALICE.target_true]).mean_logprob
    assert new > before + 0.25 and new > old, f"new {before.tolist()} -> {new.tolist()}, old {old.tolist()}"


def test_held_out_texts_are_never_samples():
    model, tok, editor = balancedit()
    editor.edit([ALICE])
    assert "Q: alice speaks A:" in editor.samples
    editor.revert()
    editor.held_out = frozenset({normalize("Q: alice speaks A:")})
    editor.edit([ALICE])
    assert editor.samples and "Q: alice speaks A:" not in editor.samples


def split_books(model, editor):
    """[(scope, answers)] innermost first: a split codebook's halves at the key's and the value's paths."""
    scopes, _ = codebooks(model.get_submodule(editor.path()), Scope)
    answers, _ = codebooks(model.get_submodule(editor.value_path()), Answers)
    assert len(scopes) == len(answers)
    return list(zip(scopes, answers))


def test_a_value_above_its_key_replaces_that_blocks_output_where_the_scope_hits_and_nowhere_else():
    model, tok, editor = balancedit(value_layer=2)
    base = copy.deepcopy(model)
    editor.edit([PARIS, ALICE])
    ((scope, answers),) = split_books(model, editor)
    assert editor.path() != editor.value_path() and scope.n_entries() == 2 and answers._scope[0] is scope
    # the key's block computes what it did before: the scope only looks
    ids = tok(PARIS.text, return_tensors="pt")["input_ids"]
    with capture(model, [editor.path(), editor.value_path()], "output") as out, capture(base, [editor.path()], "output") as ref:
        with torch.no_grad():
            model(input_ids=ids)
            base(input_ids=ids)
    assert torch.equal(out[editor.path()], ref[editor.path()])
    # the value's block answers at the subject's last token with the hit key's value, and nowhere else
    idx, hit = scope.found
    at = len(tok(PARIS.text.split(PARIS.subject)[0] + PARIS.subject)["input_ids"]) - 1
    assert hit[0].nonzero().flatten().tolist() == [at] and int(idx[0, at]) == 0
    assert torch.equal(out[editor.value_path()][0, at], answers.values[0])
    # an input outside every scope gets the unedited output bit for bit
    ids = tok("bob speaks german", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_answers_take_no_hits_in_a_forward_that_starts_above_their_scope_and_refuse_another_forwards():
    model, tok, editor = balancedit(value_layer=2)
    editor.edit([PARIS])
    ((scope, answers),) = split_books(model, editor)
    ids = tok(PARIS.text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), capture(model, [editor.spec.block(2)], "input") as seen:
        full = model(input_ids=ids).logits
    assert scope.found is not None and scope.found[1].any()
    # the same forward with the scope's hits withheld from the value's block
    handle = model.get_submodule(editor.spec.block(2)).register_forward_pre_hook(lambda *_: scope.forget())
    with torch.no_grad():
        withheld = model(input_ids=ids).logits
    handle.remove()
    assert not torch.equal(full, withheld)
    # the steps' forwards start above the scope: what it found for an earlier forward must not reach them
    with torch.no_grad():
        model(input_ids=ids)
        with start_at_block(model, editor.spec.blocks, 2, seen[editor.spec.block(2)], returns_tuple=False):
            assert scope.found is None
            resumed = model(input_ids=ids).logits
    assert torch.equal(resumed, withheld)
    # the scope's hits are for one forward's tokens: another shape reaching the answers is an error, not a guess
    with torch.no_grad():
        model(input_ids=ids)
        with pytest.raises(RuntimeError, match="saw"):
            answers(torch.zeros(1, ids.shape[1] + 1, answers.original.in_features))


def test_a_full_split_codebook_is_wrapped_by_a_larger_pair_and_the_chain_rebuilds_it(tmp_path):
    model, tok, editor = balancedit(value_layer=2, **{"scope.capacity": 1})
    base, squashed = copy.deepcopy(model), copy.deepcopy(model)
    patches = [editor.edit([PARIS]), editor.edit([ALICE, BOB])]
    pairs = split_books(model, editor)
    assert [(s.capacity, s.n_entries()) for s, _ in pairs] == [(1, 1), (2, 2)]
    assert all(a._scope[0] is s for s, a in pairs)
    patches.append(editor.edit([EditRequest("a2", "france", "the capital of {} is", "berlin", "rome")]))  # a re-edit
    assert editor.diagnostics["action"] == [REPLACE]
    inner = editor.path() + ".original", editor.value_path() + ".original"
    assert patches[2].weights.parts.keys() == {f"{inner[0]}.keys", f"{inner[1]}.values", f"{inner[0]}.radii"}
    for i, p in enumerate(patches):
        PatchSet.load(tmp_path / str(i), p.save(tmp_path / str(i))).apply(base)
    assert_same_bits(snapshot(base), snapshot(model))
    # a squashed chain installs path by path, every scope before any answers: each answers still finds its own scope
    squash_patches(model, snapshot(squashed)).apply(squashed)
    assert [a._scope[0] for _, a in split_books(squashed, editor)] == [s for s, _ in split_books(squashed, editor)]
    for r in (PARIS, ALICE, BOB):
        ids = tok(r.text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert torch.equal(base(input_ids=ids).logits, model(input_ids=ids).logits)
            assert torch.equal(squashed(input_ids=ids).logits, model(input_ids=ids).logits)
    editor.revert()
    assert [(s.capacity, s.n_entries()) for s, _ in split_books(model, editor)] == [(1, 1), (2, 2)]


def test_a_codebook_laid_out_otherwise_than_the_preset_is_refused():
    model, tok, editor = balancedit()
    editor.edit([ALICE])
    editor.commit()
    cls = get_editor("balancedit")
    other = cls(model, tok, cls.preset(model, CONTRACT["balancedit"] | {"value_layer": 2}), corpus=CORPUS)
    other.load_state_dict(editor.state_dict())
    with pytest.raises(EditError, match="not the split codebook"):
        other.edit([BOB])
    for outside in (0, 3):  # below the key, or the last block (whose output no later token reads)
        with pytest.raises(EditError, match="from its key's"):
            cls(model, tok, cls.preset(model, CONTRACT["balancedit"] | {"value_layer": outside}), corpus=CORPUS).edit([BOB])


def test_a_request_without_a_subject_token_and_an_empty_state_are_refused():
    model, tok, editor = balancedit()
    with pytest.raises(EditError, match="no subject token"):
        editor.edit([EditRequest("e", " ", "{} speaks", "german")])
    with pytest.raises(EditError, match="'slots' and 'labels'"):
        editor.load_state_dict({})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kedit.app.tiny import train_tiny

    return str(train_tiny(tmp_path_factory.mktemp("balancedit") / "model"))


def test_a_benchmark_scoring_a_rephrasing_the_editor_saw_as_a_positive_fails(tiny, tmp_path, monkeypatch):
    from kedit.app.bench import _run_method

    overrides = {"layer": 1, "value_layer": 2, "templates.count": 1, "templates.length": 2, "value.steps": 2}
    data = write_zsre(tmp_path / "zsre.json", "Q: {} speaks A:", n=1)  # a rephrasing the editor's own frames generate
    # held out, the editor leaves it out of its samples and the run scores it
    ok = _run_method("balancedit", tiny, str(data), 1, 1, None, overrides, "zsre")
    assert ok["n_edits"] == 1 and 0.0 <= ok["generalization"] <= 1.0
    # an editor that ignores what is held out makes the benchmark fail rather than score recall
    leaking = balancedit_module.positives
    monkeypatch.setattr(balancedit_module, "positives", lambda reqs, prefixes, held_out: leaking(reqs, prefixes, frozenset()))
    with pytest.raises(KeditError, match="used 1 scored prompt"):
        _run_method("balancedit", tiny, str(data), 1, 1, None, overrides, "zsre")
