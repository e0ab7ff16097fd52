"""WISE's defining properties on a tiny model: a side memory that answers only the tokens its router sends there,
shards written through their own masks and TIES-merged, and a chain that rebuilds it bit for bit."""

import copy

import pytest
import torch
from peft.utils.merge_utils import ties
from test_editors import CONTRACT, assert_same_bits, build, snapshot

from editing import EditError, PatchSet, get_editor
from editing.hooks import capture
from editing.wise.memory import SideMemory, shard_mask
from editing.wise.wise import _seed
from kedit.core.facts import EditRequest
from kedit.core.facts.schema import normalize
from kedit.core.lm import encode_prompts, greedy_generate
from kedit.core.routing import Running, causal

FRANCE = EditRequest("a", "france", "the capital of {} is", "rome", "paris")
ALICE = EditRequest("b", "alice", "{} speaks", "german", "french")
BOB = EditRequest("c", "bob", "{} speaks", "english", "german")
CAROL = EditRequest("d", "carol", "{} leads the company", "eve", "dave")


def wise(**overrides):
    model, tok, _ = build("wise")
    cls = get_editor("wise")
    return model, tok, cls(model, tok, cls.preset(model, CONTRACT["wise"] | overrides))


def memory_of(model, editor) -> SideMemory:
    module = model.get_submodule(editor.path())
    assert isinstance(module, SideMemory)
    return module


def routed_tokens(model, tok, editor, text):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), capture(model, [editor.path()], "input") as seen:
        logits = model(input_ids=ids).logits
    return memory_of(model, editor).routed(seen[editor.path()][0]), logits[0]


def test_tokens_the_router_leaves_get_the_unedited_output_bit_for_bit_and_the_edit_is_routed():
    model, tok, editor = wise()
    base = copy.deepcopy(model)
    editor.edit([FRANCE])
    hit, edited = routed_tokens(model, tok, editor, FRANCE.text)
    assert bool(hit[-1]), "the edited prompt's last token, where the answer is read, goes to the side memory"
    assert not torch.equal(edited[-1], base(input_ids=tok(FRANCE.text, return_tensors="pt")["input_ids"]).logits[0, -1])
    # the unrelated texts it trained against stay on the main memory, every token of them
    for text in editor.irrelevant()[:4]:
        hit, edited = routed_tokens(model, tok, editor, text)
        with torch.no_grad():
            unedited = base(input_ids=tok(text, return_tensors="pt")["input_ids"]).logits[0]
        assert not bool(hit.any()), text
        assert torch.equal(edited, unedited), text


def test_a_shard_writes_only_its_own_masked_elements_and_the_next_shard_draws_another_mask():
    model, tok, editor = wise(**{"memory.shard_edits": 1})
    editor.edit([FRANCE])
    mem = memory_of(model, editor)
    written = mem.shards[0] != 0
    mask = shard_mask(tuple(written.shape), editor.hparams.memory.mask_ratio, _seed(0, 0, 1), written.device)
    assert bool(written.any()) and not bool((written & ~mask).any())
    assert mem.edits.tolist() == [0.0, 1.0, 0.0] and bool((mem.memory == 0).all())
    editor.edit([ALICE])  # shard 0 is full: the edit goes to shard 1, through a different mask
    second = mem.shards[1] != 0
    other = shard_mask(tuple(second.shape), editor.hparams.memory.mask_ratio, _seed(0, 0, 2), second.device)
    assert not torch.equal(mask, other) and not bool((second & ~other).any())


def test_closed_shards_are_ties_merged_into_the_side_memory_and_the_chain_rebuilds_it(tmp_path, monkeypatch):
    import editing.wise.wise as method

    merged = []
    real = method.merge
    monkeypatch.setattr(method, "merge", lambda parts, density: merged.append([p.clone() for p in parts]) or real(parts, density))
    model, tok, editor = wise(**{"memory.shard_edits": 1, "memory.density": 0.5})
    base = copy.deepcopy(model)
    patches = [editor.edit([FRANCE])]
    mem = memory_of(model, editor)
    first = mem.shards[0].detach().float().clone()
    patches.append(editor.edit([ALICE]))  # the second shard closes: both merge into the empty side memory
    assert editor.diagnostics["shard"] == [2.0] and len(merged) == 1
    (parts,) = merged
    assert len(parts) == 2 and torch.equal(parts[0], first) and bool(parts[1].any())
    assert torch.equal(mem.memory.float(), ties(parts, torch.ones(2), 0.5))  # peft's TIES, equal weights
    assert mem.edits.tolist() == [2.0, 0.0, 0.0] and all(bool((s == 0).all()) for s in mem.shards)
    patches += [editor.edit([BOB]), editor.edit([CAROL])]  # a second cycle merges with the side memory
    assert len(merged) == 2 and len(merged[1]) == 3 and mem.edits.tolist() == [4.0, 0.0, 0.0]
    for i, p in enumerate(patches):
        PatchSet.load(tmp_path / str(i), p.save(tmp_path / str(i))).apply(base)
    assert_same_bits(snapshot(base), snapshot(model))
    editor.revert()  # the merge comes off with the edit that made it
    assert mem.edits.tolist() == [2.0, 1.0, 0.0] and torch.equal(mem.memory.float(), ties(parts, torch.ones(2), 0.5))


def test_the_threshold_is_act_ratio_times_the_least_moved_edited_token():
    model, tok, editor = wise()
    acts = []
    for r in (FRANCE, CAROL):
        editor.edit([r])
        acts += editor.diagnostics["edit_act"]
    mem = memory_of(model, editor)
    assert float(mem.min_act) == pytest.approx(min(acts))
    assert float(mem.threshold()) == pytest.approx(editor.hparams.router.act_ratio * min(acts))


def test_a_side_memory_installed_with_other_settings_is_refused():
    model, tok, editor = wise()
    editor.edit([FRANCE])
    for change in ({"router.act_ratio": 0.5}, {"router.mode": "mean"}):
        other = get_editor("wise")(model, tok, get_editor("wise").preset(model, CONTRACT["wise"] | change))
        with pytest.raises(EditError, match=r"\(2, 0.88, 'token'\), the preset \(2, 0.(5|88), '(token|mean)'\)"):
            other.edit([ALICE])


def test_held_out_texts_are_never_samples():
    model, tok, editor = wise()
    held = editor.irrelevant()[0]
    framed = editor.templates()[1].replace("{}", FRANCE.text, 1)
    editor.edit([FRANCE])
    assert {normalize(held), normalize(framed)} <= {normalize(s) for s in editor.samples}  # used unless held out
    editor.revert()
    editor.held_out = frozenset({normalize(held), normalize(framed)})
    editor.edit([FRANCE])
    seen = {normalize(s) for s in editor.samples}
    assert editor.samples and not seen & editor.held_out


def test_a_reedit_moves_its_tokens_more_than_the_memory_holding_the_old_value():
    from kedit.core.lm import score_targets

    model, tok, editor = wise(**{"memory.shard_edits": 1, "memory.shards": 3})
    editor.edit([FRANCE])  # rome, into shard 0, which closes
    editor.edit([EditRequest("a2", "france", "the capital of {} is", "berlin", "rome")])  # into shard 1
    ids = tok(FRANCE.text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), capture(model, [editor.path()], "input") as seen:
        model(input_ids=ids)
    _, act = memory_of(model, editor).activations(seen[editor.path()][0][-1:])  # (1, 2): shard 0, shard 1
    assert float(act[0, 1]) > float(act[0, 0]), "the router picks the shard holding the latest value"
    lp = score_targets(model, tok, [FRANCE.text] * 2, ["berlin", "rome"]).mean_logprob
    assert float(lp[0]) > float(lp[1])


def test_a_later_edit_of_the_same_shard_keeps_what_the_shard_wrote_there():
    """The shard's earlier edits' tokens are kept (the editor's state): projected, a second edit into the same
    shard leaves the shard's output there as it was; as a penalty, it moves it less than with neither."""
    moved = {}
    for name, settings in {"project": (0.0, True), "penalty": (1.0, False), "neither": (0.0, False)}.items():
        keep, project = settings
        model, tok, editor = wise(**{"memory.shard_edits": 4, "train.keep": keep, "train.project": project})
        editor.edit([FRANCE])
        kept = editor.state_dict()["keys"]  # (k, d_in): the first edit's tokens
        assert len(kept) and editor.state_dict()["key_shard"].tolist() == [1] * len(kept)
        before = memory_of(model, editor).shards[0].detach().float().clone()
        editor.edit([ALICE])
        after = memory_of(model, editor).shards[0].detach().float()
        assert bool((after != before).any())
        moved[name] = float(((after - before) @ kept.T).norm() / (before @ kept.T).norm())
    assert moved["project"] < 1e-4 < moved["penalty"] < moved["neither"]


def test_a_malformed_state_is_refused():
    _, _, editor = wise()
    with pytest.raises(EditError, match="keys, key_shard, key_slot of one length"):
        editor.load_state_dict({})
    with pytest.raises(EditError, match="of one length"):
        editor.load_state_dict({"keys": torch.zeros(2, 3), "key_shard": torch.zeros(1), "key_slot": torch.zeros(2)})


NULL = {"null_space": {"leak": 0.05, "statistics": {"samples": 16, "length": 16}}}


def test_low_energy_projector_keeps_at_most_the_leak_of_the_moments_energy():
    from editing.stats import low_energy_projector

    x = torch.randn(500, 12) * torch.logspace(0, -2, 12)  # (n, d): energy falls off across the directions
    mom2 = x.T @ x / len(x)
    p = low_energy_projector(mom2, 0.05)
    assert torch.allclose(p, p.T) and torch.allclose(p @ p, p, atol=1e-5)
    assert 0 < float(torch.trace(p @ mom2)) <= 0.05 * float(torch.trace(mom2))
    assert float(torch.trace(low_energy_projector(mom2, 0.5) @ mom2)) > float(torch.trace(p @ mom2))  # more leak, more room
    with pytest.raises(ValueError, match="leak 1.0"):
        low_energy_projector(mom2, 1.0)


def test_with_null_space_the_shard_reads_only_where_general_text_barely_lies(tmp_path, monkeypatch):
    """The change (d_out, d_in) is zero on every direction outside the null space, so an input there moves no
    memory; with project as well, a later edit of the shard still keeps the earlier edit's tokens exactly."""
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))
    model, tok, editor = wise(**NULL, **{"memory.shard_edits": 4, "train.project": True})
    p = editor.null_projector()  # (d_in, d_in)
    outside = torch.eye(p.shape[0]) - p
    editor.edit([FRANCE])
    first = memory_of(model, editor).shards[0].detach().float().clone()
    assert float(first.norm()) > 0 and float((first @ outside).norm()) < 1e-4 * float(first.norm())
    kept = editor.state_dict()["keys"]
    editor.edit([ALICE])
    after = memory_of(model, editor).shards[0].detach().float()
    assert float(((after - first) @ outside).norm()) < 1e-4 * float((after - first).norm())
    assert float(((after - first) @ kept.T).norm()) < 1e-4 * float((first @ kept.T).norm())


# ----------------------------------------------------------------------------- mode "mean": a sequence's running mean


@pytest.mark.parametrize("how", ["mean", "max"])
def test_a_running_statistic_follows_packed_sequences_and_carries_over_decoding_steps(how):
    torch.manual_seed(0)
    values = torch.rand(2, 6, 3)  # (B, T, memories)

    def of(tokens):  # the statistic over a whole sequence's tokens (n, k) -> (k,)
        return tokens.mean(0) if how == "mean" else tokens.amax(0)

    # packed: row 0 holds a prompt (3 tokens) then two targets (2 + 1): each target sees the prompt and itself
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    i = torch.arange(6)
    visible = (i[None, :] <= i[:, None])[None] & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    got = Running(visible=visible)(values, how)
    prompt = values[0, :3]
    assert torch.allclose(got[0, 5], of(torch.cat([prompt, values[0, 5:6]])))  # never the first target's tokens
    assert torch.allclose(got[0, 4], of(torch.cat([prompt, values[0, 3:5]])))
    assert torch.allclose(got[1], causal(values[1:], how)[0])
    assert torch.allclose(got[1, 3], of(values[1, :4]))
    # decoding: a left-padded prefill, then one token per call, as a full forward of each unpadded row
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    run = Running(mask=mask)
    steps = [run(values[:, :4], how)] + [run(values[:, t : t + 1], how) for t in (4, 5)]
    full0, full1 = causal(values[:1, 2:], how)[0], causal(values[1:], how)[0]
    assert torch.allclose(steps[0][0, 2:], full0[:2]) and torch.allclose(steps[0][1], full1[:4])
    assert torch.allclose(torch.cat(steps[1:], 1)[0], full0[2:]) and torch.allclose(torch.cat(steps[1:], 1)[1], full1[4:])
    with pytest.raises(ValueError, match="laid out for"):
        Running(visible=visible)(values[:, :5], how)


def _greedy_without_cache(model, tok, prompt: str, n: int) -> str:
    ids = encode_prompts(tok, [prompt])[0]
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):  # every step the whole text, one row from column 0: no layout needed
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return tok.decode(ids[start:], skip_special_tokens=True)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_sequence_routing_decodes_from_a_cache_as_full_forwards_route(mode, tmp_path):
    model, tok, editor = wise(**{"router.mode": mode})
    base = copy.deepcopy(model)
    patch = editor.edit([FRANCE])
    mem = memory_of(model, editor)
    assert mem.mode == mode and mem.config()["mode"] == mode
    hit, _ = routed_tokens(model, tok, editor, FRANCE.text)
    assert bool(hit[-1]), "the edited prompt's last token reads the side memory"
    # left-padded, batched, from a cache: the same text as a full forward per step
    prompts = [FRANCE.text, ALICE.text, "the capital of alice is", CAROL.text]
    assert greedy_generate(model, tok, prompts, max_new_tokens=4) == [_greedy_without_cache(model, tok, p, 4) for p in prompts]
    # the rule is installed with the memory: a chain rebuilds it
    PatchSet.load(tmp_path, patch.save(tmp_path)).apply(base)
    assert memory_of(base, editor).mode == mode
    assert_same_bits(snapshot(base), snapshot(model))


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_sequence_routing_sets_the_threshold_below_every_edited_tokens_running_statistic(mode):
    model, tok, editor = wise(**{"router.mode": mode})
    editor.edit([FRANCE])
    ids = encode_prompts(tok, [FRANCE.text + " " + FRANCE.target_new])[0]
    n_prompt = len(encode_prompts(tok, [FRANCE.text])[0])
    with torch.no_grad(), capture(model, [editor.path()], "input") as seen:
        model(input_ids=torch.tensor([ids]))
    mem = memory_of(model, editor)
    _, act = mem.activations(seen[editor.path()])  # (1, T, memories)
    running = causal(act, mode)[0, n_prompt - 1 : -1].amax(-1)  # the edit's tokens: the prompt's last, then the target's
    assert float(mem.min_act) == pytest.approx(float(running.min()), rel=1e-4)
    assert bool((running > mem.threshold()).all())
