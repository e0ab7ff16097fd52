"""Target vectors shared through an exchange (FLEKE): text-free keys that the family's edits do not move,
a found vector that skips the optimization and gives the same edit, refusals that fall back to optimizing."""

from __future__ import annotations

import math

import pytest
import torch

from editing import make_editor
from editing.exchange import Found
from editing.stats import Corpus
from kedit.app.tiny import make_tokenizer, tiny_llama
from kedit.core.facts import EditRequest
from kedit.store.mkv import MKVExchange, MKVStore, compat_for

CORPUS = Corpus(
    "test",
    ("the capital of france is paris and alice speaks french", "bob speaks german and rome is a city in italy") * 4,
)
MEMIT = {"layers": (1, 2), "solve.mom2_weight": 1.0, "statistics.samples": 40, "statistics.length": 16}
MEMIT |= {"templates.count": 2, "templates.length": 3}
FACTS = [
    EditRequest("a", "france", "the capital of {} is", "rome", "paris"),
    EditRequest("b", "alice", "{} speaks", "german", "french"),
    EditRequest("c", "bob", "{} speaks", "french", "german"),
]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))


def client(method="memit", overrides=None):
    """A client: its own copy of the same base (one seed) and an editor on it."""
    tok = make_tokenizer()
    model = tiny_llama(len(tok), seed=0, init=0.05)
    return model, make_editor(method, model, tok, {**MEMIT, **(overrides or {})}, assets={"corpus": CORPUS})


def exchange(store, name, editor, threshold=0.99, min_share=0.0):
    return MKVExchange(store.client(name), compat_for(editor, "f" * 64), threshold, min_share)


def test_fact_keys_hold_no_text_and_do_not_move_when_the_family_edits():
    model, editor = client()
    before = editor.fact_keys(FACTS)
    assert before.shape == (3, editor.target_layout()[2]) and before.dtype == torch.float32
    editor.edit(FACTS[:1])  # MEMIT writes the MLP outputs of blocks 1-2; the key is read below them
    assert torch.allclose(editor.fact_keys(FACTS), before, atol=1e-6)
    sims = before @ before.T
    assert torch.allclose(sims.diagonal(), torch.ones(3), atol=1e-5)
    assert (sims - 2 * torch.eye(3)).max() < 0.99  # different facts fall under the exchange's threshold
    # another answer for the same question is another fact
    other = editor.fact_keys([EditRequest("a2", "france", "the capital of {} is", "berlin", "paris")])
    assert float(other[0] @ before[0]) < 0.99


def test_a_found_vector_skips_the_optimization_and_makes_the_same_edit(tmp_path):
    store = MKVStore(tmp_path)
    model_a, a = client()
    a.exchange = exchange(store, "a", a)
    a.edit(FACTS[:2])
    assert a.diagnostics["target_reused"] == [0.0, 0.0]  # nothing to find yet: both optimized, then offered
    a.exchange.upload(0)

    model_b, b = client()
    b.exchange = exchange(store, "b", b)
    patches = b.edit(FACTS)
    assert b.diagnostics["target_reused"] == [1.0, 1.0, 0.0]
    assert b.diagnostics["target_steps"][:2] == [0.0, 0.0] and b.diagnostics["target_steps"][2] > 0
    assert b.exchange.sources[:2] == ["a/slot-0#0", "a/slot-0#1"] and b.exchange.sources[2] is None
    assert len(b.exchange.pending_keys[0]) == 1  # only what b optimized itself is offered
    b.revert()

    model_c, c = client()  # the same two facts optimized by c itself: the edit b made with a's vectors
    c.edit(FACTS[:2])
    b.exchange.sources.clear()
    b.edit(FACTS[:2])
    assert b.diagnostics["target_reused"] == [1.0, 1.0]
    for name in patches.weights.parts:
        got = model_b.get_parameter(name)
        assert torch.allclose(got, model_c.get_parameter(name), atol=1e-5), name


def test_a_pmet_vector_travels_as_the_top_blocks_output_so_a_reuser_with_other_edits_aims_where_its_maker_did(tmp_path):
    """PMET sets its target at the top MLP's output, but shares it as the top block's output (the residual stream
    above which no client's weights differ): a reuser whose own earlier edit moved the stream below takes its own
    state off, where sharing the MLP output as it is would land the fact elsewhere."""
    from editing.keys import read_at_subject

    def states(model, editor):  # (1, d) each: the top block's output and its MLP's, at the subject of FACTS[0]
        return {p: read_at_subject(model, editor.tok, FACTS[:1], ("{}",), [p], "output")[p] for p in (top, mlp)}

    store = MKVStore(tmp_path)
    model_a, a = client("pmet")
    a.exchange = exchange(store, "a", a)
    top, mlp = a.shared_path(), a.target_path()
    assert a.target_layout()[0] == [top] == [a.spec.block(2)] and mlp != top
    a_before = states(model_a, a)
    a.edit(FACTS[:1])
    shared = store.load(a.exchange.upload(0)).vectors[top]  # (1, d): the state a's edit aims for at the block
    model_b, b = client("pmet")
    b.edit(FACTS[2:])  # b's own earlier edit, in the blocks below the top one
    b.commit()
    b.exchange = exchange(store, "b", b)
    before = states(model_b, b)  # b's, the fact not yet edited
    aimed = {}
    targets = b.targets
    b.targets = lambda requests, h0: aimed.setdefault("z", targets(requests, h0))  # z at the MLP output
    b.edit(FACTS[:1])
    assert b.diagnostics["target_reused"] == [1.0]
    at_block = before[top] + (aimed["z"] - before[mlp])  # where b's MLP target puts b's block output
    assert torch.allclose(at_block, shared, atol=1e-5)
    # the MLP output shared as it is would land b's block output off by what b's earlier edit moved below it
    resid_a, resid_b = a_before[top] - a_before[mlp], before[top] - before[mlp]  # (1, d) each
    assert float((resid_b - resid_a).norm()) > 1e-3 * float(resid_a.norm())


def test_vectors_of_other_hparams_are_refused_and_the_fact_is_optimized(tmp_path):
    store = MKVStore(tmp_path)
    _, a = client()
    a.exchange = exchange(store, "a", a)
    a.edit(FACTS[:1])
    a.exchange.upload(0)
    _, b = client(overrides={"targets.steps": 7})  # another target optimization: a's vector is not b's
    b.exchange = exchange(store, "b", b)
    b.edit(FACTS[:1])
    assert b.diagnostics["target_reused"] == [0.0] and b.diagnostics["target_steps"][0] > 0
    assert b.exchange.refused == {"hparams_sha256": 1}


def test_an_editor_whose_target_depends_on_its_own_state_does_not_share():
    _, memit = client()
    _, come = client("come-memit")
    assert memit.shares_targets and not come.shares_targets


def _encodings(tok, text: str) -> list[bytes]:
    """The byte forms a fact's text could take in an upload: the text itself, and its token ids as integers."""
    forms = [text.encode("utf-8"), text.encode("utf-16-le")]
    for variant in (text, " " + text):
        ids = tok(variant, add_special_tokens=False)["input_ids"]
        for dtype in (torch.int32, torch.int64, torch.int16):
            forms.append(torch.tensor(ids, dtype=dtype).numpy().tobytes())
    return forms


def test_nothing_a_client_uploads_holds_the_text_or_the_token_ids_of_its_facts(tmp_path):
    store = MKVStore(tmp_path)
    model, a = client()
    a.exchange = exchange(store, "a", a)
    facts = [*FACTS, EditRequest("d", "carol", "the ceo of the company is {}", "eve", "carol")]
    a.edit(facts)
    a.exchange.upload(0)
    uploaded = b"".join(p.read_bytes() for p in sorted((tmp_path / "a").rglob("*")) if p.is_file())
    assert len(uploaded) > 4 * 3 * len(facts)  # the vectors are there
    for r in facts:
        for text in (r.subject, r.text, r.prompt.replace("{}", "").strip(), r.target_new, r.target_true):
            for form in _encodings(a.tok, text):
                assert form not in uploaded, (r.id, text, form)


class Handed:
    """An exchange that hands the facts marked ``found`` (all by default) the vectors given (z at the shared path,
    (n, d)); keeps what is offered."""

    def __init__(self, z: torch.Tensor, refine: bool, found: list[bool] | None = None):
        self.z, self.refine, self.offered = z, refine, []
        self.found = torch.ones(len(z), dtype=torch.bool) if found is None else torch.tensor(found)

    def lookup(self, keys: torch.Tensor) -> Found:
        return Found(self.found, self.z)

    def offer(self, keys: torch.Tensor, z: torch.Tensor) -> None:
        self.offered.append(z)


# the tiny random model moves "alice speaks german" from NLL 4.20 to 4.02 at most: a stop it reaches in 6 steps
REACH = {"targets.steps": 100, "targets.lr": 0.02, "targets.clamp_norm": 100.0, "targets.weight_decay": 0.0}
REACH |= {"targets.stop_loss": 4.1}


def test_a_refined_reuse_is_checked_on_the_reuser_and_stepped_only_where_it_falls_short(tmp_path):
    from editing.keys import read_at_subject

    fact = FACTS[1:2]
    store = MKVStore(tmp_path)
    model_a, a = client(overrides=REACH)
    a.exchange = exchange(store, "a", a)
    top = a.shared_path()
    h = read_at_subject(model_a, a.tok, fact, ("{}",), [top], "output")[top]  # (1, d) the base's state there
    a.edit(fact)
    z = store.load(a.exchange.upload(0)).vectors[top]  # (1, d)
    stop = a.hparams.targets.stop_loss
    assert a.diagnostics["target_steps"][0] > 0 and a.diagnostics["target_nll"][0] <= stop

    # the maker's vector on the same base already passes here: one forward checks it, no step, nothing offered
    model_b, b = client(overrides=REACH)
    b.exchange = Handed(z, refine=True)
    patches = b.edit(fact)
    assert b.diagnostics["target_steps"] == [0.0] and b.diagnostics["target_nll"][0] <= stop
    assert b.exchange.offered == []  # another client's vector is never offered again
    model_c, c = client(overrides=REACH)
    c.exchange = Handed(z, refine=False)
    c.edit(fact)
    for name in patches.weights.parts:  # the same edit as the vector used as it is
        assert torch.equal(model_b.get_parameter(name), model_c.get_parameter(name)), name

    # a vector a quarter of the way there: used as it is, no step is taken and nothing reads its NLL; refined, its
    # NLL is read, falls short, and it is stepped until it passes
    short = h + 0.25 * (z - h)
    _, d = client(overrides=REACH)
    d.exchange = Handed(short, refine=False)
    d.edit(fact)
    assert d.diagnostics["target_steps"] == [0.0] and math.isnan(d.diagnostics["target_nll"][0])
    _, e = client(overrides=REACH)
    e.exchange = Handed(short, refine=True)
    e.edit(fact)
    assert e.diagnostics["target_nll"][0] <= stop
    assert 0 < e.diagnostics["target_steps"][0] < a.diagnostics["target_steps"][0]  # from the vector, not from zero


def test_a_refined_vector_that_passes_stays_exactly_as_checked_while_the_rest_of_its_batch_steps(tmp_path):
    """A batch of a found fact and one of the client's own: the found vector passes the check and keeps its value,
    even over the norm bound (the bound is for the steps), while the other fact is optimized and offered."""
    from editing.keys import read_at_subject

    fact = FACTS[1:2]
    store = MKVStore(tmp_path)
    model_a, a = client(overrides=REACH)
    a.exchange = exchange(store, "a", a)
    top = a.shared_path()
    h = read_at_subject(model_a, a.tok, FACTS[1:3], ("{}",), [top], "output")[top]  # (2, d)
    a.edit(fact)
    z = store.load(a.exchange.upload(0)).vectors[top]  # (1, d)
    over = h[:1] + 2 * (z - h[:1])  # further along than the maker went: passes, and over the reuser's bound
    tight = REACH | {"targets.clamp_norm": 0.5}
    assert float((over - h[:1]).norm()) > 0.5 * float(h[:1].norm())
    _, b = client(overrides=tight)
    b.exchange = Handed(torch.cat([over, torch.zeros_like(over)]), refine=True, found=[True, False])
    aimed = {}
    targets = b.targets
    b.targets = lambda requests, h0: aimed.setdefault("z", targets(requests, h0))
    b.edit(FACTS[1:3])
    steps = b.diagnostics["target_steps"]
    assert b.diagnostics["target_reused"] == [1.0, 0.0] and steps[0] == 0 and steps[1] > 0
    assert torch.allclose(aimed["z"][0], over[0], atol=1e-6)  # not shrunk to the bound by the other fact's steps
    assert float((aimed["z"][1] - h[1]).norm()) <= 0.5 * float(h[1].norm()) * (1 + 1e-5)  # the stepped one is bound
    assert len(b.exchange.offered) == 1 and len(b.exchange.offered[0]) == 1  # only its own fact is offered
