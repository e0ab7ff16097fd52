"""MEND on a tiny model: the gradient identity, training that works and resumes exactly, networks refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer

from editing import EditError, make_editor
from editing.mend.files import MANIFEST, TENSORS, load_network, save_network
from editing.mend.gradients import target_nll
from editing.mend.mend import MEND, MENDNetwork, edit_loss
from editing.mend.training import Augment, meta_step, step_rows, train, validate
from editing.patches import PatchIntegrityError
from kedit.app.tiny import tiny_llama, train_tiny, training_facts
from kedit.core.arch import spec_for
from kedit.core.facts import EditRequest
from kedit.core.lm import adds_bos
from kedit.core.models import load_model

TINY = {"layers": (2, 3), "network.rank": 16, "edit_lr": 0.01, "stem_dtype": None, "head_dtype": None}  # exact: fp32 throughout
TRAIN = {"train.batch": 2, "train.lr": 1e-3, "train.lr_lr": 1e-2, "train.val_facts": 6, "train.checkpoint_every": 5}


def setup(overrides=None, seed=0):
    tok = make_tokenizer()
    model = tiny_llama(len(tok), seed=seed, init=0.05)
    hp = MEND.preset(model, {**TINY, **(overrides or {})})
    return model, tok, hp


def facts():
    return [EditRequest.from_dict(r) for r in training_facts()]


def test_an_untrained_network_makes_the_fine_tuning_step_exactly():
    """MEND's identity: with the maps at the identity and no normalization, ΔW = -α Σ_t δ_t u_tᵀ = -α ∇_W L."""
    model, tok, hp = setup({"network.norm": False})
    net = MEND.new_network(model, hp)
    reqs = facts()[:2]
    from editing.finetune import target_batch

    batch = target_batch(tok, reqs, torch.device("cpu"))
    names = [f"{p}.weight" for p in net.weights]
    params = [model.get_parameter(n) for n in names]
    grads = torch.autograd.grad(edit_loss(model, batch), params)
    editor = MEND(model, tok, hp, MENDNetwork(net, {}))
    delta = editor.edit(reqs).weights
    assert sorted(delta.parts) == sorted(names)
    for name, g in zip(names, grads):
        assert torch.allclose(delta.parts[name].dense(), -hp.edit_lr * g, atol=1e-6, rtol=1e-4), name


def test_edit_scale_multiplies_the_networks_update_and_must_be_positive():
    """``edit_scale`` s: the same edit's weight delta, s times over (the network and its factors unchanged)."""
    model, tok, hp = setup({"network.norm": False})
    net = MEND.new_network(model, hp)
    reqs = facts()[:2]
    deltas = {}
    for scale in (1.0, 0.25):
        editor = MEND(model, tok, hp.model_copy(update={"edit_scale": scale}), MENDNetwork(net, {}))
        deltas[scale] = editor.edit(reqs).weights
        editor.revert()
    for name, part in deltas[1.0].parts.items():
        full, quarter = part.dense(), deltas[0.25].parts[name].dense()
        assert full.abs().max() > 0 and torch.allclose(quarter, 0.25 * full, atol=1e-7, rtol=1e-5), name
    with pytest.raises(ValueError, match="edit_scale"):
        MEND.preset(model, {**TINY, "edit_scale": 0.0})


@pytest.mark.parametrize(
    "low", [{"stem_dtype": "bfloat16"}, {"head_dtype": "bfloat16"}, {"stem_dtype": "bfloat16", "head_dtype": "bfloat16"}]
)
def test_a_bf16_stem_or_head_makes_nearly_the_same_edit_and_is_rebuilt_when_a_frozen_weight_changes(low):
    """``stem_dtype`` / ``head_dtype: bfloat16``: the blocks below the edit, or the output head, run in a bf16 copy;
    the update is the fp32 one up to bf16 rounding, the model keeps its own head, and a changed weight outside
    the edited blocks is seen (the copy is rebuilt)."""
    model, tok, hp = setup()
    net = MEND.new_network(model, hp)
    reqs = facts()[:2]
    exact = MEND(model, tok, hp, MENDNetwork(net, {})).edit(reqs).weights
    own_head = model.get_submodule(spec_for(model).lm_head)
    fast_editor = MEND(model, tok, MEND.preset(model, {**TINY, **low}), MENDNetwork(net, {}))
    fast = fast_editor.edit(reqs).weights
    fast_editor.revert()
    assert model.get_submodule(spec_for(model).lm_head) is own_head
    for name, part in exact.parts.items():
        a, b = part.dense(), fast.parts[name].dense()
        assert not torch.equal(a, b) and torch.allclose(a, b, rtol=0.05, atol=0.05 * float(a.abs().max())), name
    copy = fast_editor._copies[torch.bfloat16]._copy
    with torch.no_grad():  # below block 2, or the head
        changed = spec_for(model).module_path("mlp_out", 0) if "stem_dtype" in low else spec_for(model).lm_head
        model.get_parameter(changed + ".weight").mul_(0.5)
    fast_editor.edit(reqs)
    rebuilt = fast_editor._copies[torch.bfloat16]._copy
    assert rebuilt is not copy  # rebuilt from the changed weights
    fast_editor.edit(reqs)  # its own edits change blocks 2-3 only: outside the copy's part
    assert fast_editor._copies[torch.bfloat16]._copy is rebuilt


def test_the_weights_of_one_shape_share_one_pass_of_their_map_each_with_its_own_mode():
    """``HyperNet.updates`` stacks the rows of every weight of a shape: each weight's update is what its rows alone
    give (its own mode's scale and shift, its own edit rate), whatever else is in the stack."""
    model, _, hp = setup({"network.n_hidden": 1})
    net = MEND.new_network(model, hp)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking maps: modes and edit rates that differ
        for p in net.parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen))
    net.eval()
    factors = {
        path: (torch.randn(2 + i, d_in, generator=gen), torch.randn(2 + i, d_out, generator=gen))
        for i, (path, (d_in, d_out)) in enumerate(net.weights.items())
    }
    together = net.updates(factors)
    assert list(together) == list(factors)
    for path, f in factors.items():
        (out, inp), (out1, inp1) = together[path], net.updates({path: f})[path]
        assert out.shape == out1.shape and torch.allclose(out, out1, atol=1e-5) and torch.allclose(inp, inp1, atol=1e-5), path
    # two weights of one shape (one map): the same rows through the other's mode give another update
    first, second = [p for p in net.weights if net.weights[p] == net.weights[list(net.weights)[0]]][:2]
    rows = {first: factors[second]}
    assert not torch.allclose(net.updates(rows)[first][1], together[second][1], atol=1e-3)


def test_the_edit_loss_reads_only_the_target_positions_and_gets_the_full_heads_value():
    """The head runs on the target positions only (``logits_to_keep``); the loss is the one over all logits."""
    from editing.finetune import target_batch

    model, tok, _ = setup()
    batch = target_batch(tok, facts()[:3], torch.device("cpu"))
    ids, mask, pos, rows, cols, labels, _ = batch
    full = target_nll(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits, rows, cols, labels).mean()
    assert torch.allclose(edit_loss(model, batch), full, atol=1e-6)


def _fact(i, subject, prompt, rephrase):
    nb = [{"prompt": "eve speaks", "answer": "french"}]
    return EditRequest.from_dict(
        {"id": f"a{i}", "subject": subject, "prompt": prompt, "target_new": "asia", "target_true": "europe"}
        | {"paraphrase_prompts": [rephrase], "neighborhood": nb}
    )


def test_augment_draws_negatives_of_the_fact_template_and_prefixes_from_the_training_facts():
    located = [_fact(i, s, "{} is located in", f"{s} is in") for i, s in enumerate(["alice", "bob", "carol", "dave"])]
    prefixed = _fact(4, "eve", "{} is located in", "Last updated 2017. eve is in")
    speaks = [_fact(5 + i, s, "{} speaks", f"{s} talks") for i, s in enumerate(["alice", "bob"])]
    data = [*located, prefixed, *speaks]
    always = Augment(data, negatives=2, prefixed=1.0, seed=0)
    rephrasings, negatives = always(7, [located[0], speaks[0]])
    assert rephrasings == ["Last updated 2017. alice is in", "Last updated 2017. alice talks"]
    assert len(negatives) == 3  # two of "{} is located in", the one other-subject fact of "{} speaks"
    assert [o.prompt for o in negatives] == ["{} is located in"] * 2 + ["{} speaks"]
    assert all(o.subject != "alice" for o in negatives)
    assert always(7, [prefixed])[0] == ["Last updated 2017. eve is in"]  # already prefixed: left as it is
    assert always(7, [located[1]]) == always(7, [located[1]])  # the key decides the draw
    assert len({tuple(o.id for o in always(k, [located[1]])[1]) for k in range(20)}) > 1
    never = Augment(data, negatives=0, prefixed=0.0, seed=0)
    assert never(7, [located[0]]) == (["alice is in"], [])


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """The tiny Llama trained on its known facts (a random one's outputs are too flat to learn edits on)."""
    return train_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_training_lowers_the_edit_loss_and_raises_edit_success_on_held_out_facts(tmp_path, trained_tiny):
    """150 steps on 24 facts; scored on 6 others: the edit loss at most half of the untrained network's, and
    at least half of the edits exact (every target token the argmax), from one in six untrained."""
    model, tok = load_model(str(trained_tiny), "cpu")
    # without negatives: ten one-token subjects per relation are too alike in a 4-layer model for 150 steps to
    # separate them, and with same-template negatives the network learns not to edit at all; without the
    # after-target KL (its own test below): the reference's losses
    over = {"layers": (2, 3), "network.rank": 16, **TRAIN, "train.steps": 150, "train.val_every": 50}
    over |= {"train.negatives": 0, "train.after_target": False}
    # the edit rates at the maps' rate, as in the reference (and the presets): at TRAIN's ten times that rate, this
    # training's locality came out at 2 of 6 on one machine's fresh install and above 0.8 on others (a fragile point)
    over["train.lr_lr"] = over["train.lr"]
    hp = MEND.preset(model, over)
    spec = spec_for(model)
    net = MEND.new_network(model, hp)
    data = facts()
    train_facts, val_facts = data[6:], data[:6]
    before = validate(model, tok, spec, net, val_facts, hp)
    progress = train(model, tok, spec, net, train_facts, val_facts, hp, tmp_path / "ck")
    after = validate(model, tok, spec, net, val_facts, hp)
    assert progress.stopped in ("steps", "early") and progress.step >= 50
    assert after["val_edit_loss"] < 0.5 * before["val_edit_loss"]
    assert after["val_edit_success"] >= 0.5 > before["val_edit_success"]
    assert after["val_loc_agreement"] >= 0.8, after


def test_the_after_target_kl_reads_the_position_after_each_new_target_and_only_moves_with_an_edit():
    """With ``after_target`` the KL also reads, in the edit and rephrasing rows, the last target token's position
    (what follows the target); the identity network leaves it 0, a trained-rate update moves it."""
    model, tok, hp = setup(TRAIN)
    spec = spec_for(model)
    batch = facts()[:2]
    plain = step_rows(tok, batch, torch.device("cpu"), "answer")
    after = step_rows(tok, batch, torch.device("cpu"), "answer", after_target=True)
    assert plain.n_unrelated == after.n_unrelated == len(plain.loc_rows)
    assert after.loc_rows[after.n_unrelated :].tolist() == [0, 1, 2, 3]  # the 2B edit rows, once each
    ends = after.keep[after.loc_cols[after.n_unrelated :]]
    predicting = after.keep[after.cols]  # the columns that predict a target token
    last_target = [int(predicting[after.rows == r].max()) + 1 for r in range(4)]
    assert ends.tolist() == last_target  # the last target token predicts what follows it
    net = MEND.new_network(model, hp)
    with torch.no_grad():
        net.edit_lrs.zero_()  # no update: edited = unedited
        assert float(meta_step(model, spec, net, after, min(hp.layers), 0.1, 1.0)["after_target_loss"]) == 0
        net.edit_lrs.fill_(1.0)
        assert float(meta_step(model, spec, net, after, min(hp.layers), 0.1, 1.0)["after_target_loss"]) > 1e-4


def test_the_kl_over_all_positions_reads_every_token_of_the_unrelated_rows_and_none_of_the_edit_rows():
    """``loc_positions: all`` (the reference's KL): every non-pad position of the unrelated prompts, the answer
    positions of ``answer`` among them, and nothing in the edit and rephrasing rows."""
    tok = make_tokenizer()
    batch = facts()[:2]
    answer = step_rows(tok, batch, torch.device("cpu"), "answer")
    every = step_rows(tok, batch, torch.device("cpu"), "all")
    n_edit = 2 * every.n
    unrelated = every.mask[n_edit:].bool()
    assert every.n_unrelated == len(every.loc_rows) == int(unrelated.sum())
    assert int(every.loc_rows.min()) == n_edit  # no edit or rephrasing row
    read = torch.zeros_like(every.mask, dtype=torch.bool)
    read[every.loc_rows, every.keep[every.loc_cols]] = True
    assert torch.equal(read[n_edit:], unrelated) and not read[:n_edit].any()
    answered = {(int(r), int(answer.keep[c])) for r, c in zip(answer.loc_rows, answer.loc_cols)}
    assert answered < {(int(r), int(every.keep[c])) for r, c in zip(every.loc_rows, every.loc_cols)}
    # the edit loss's positions do not depend on where the KL reads
    assert torch.equal(answer.keep[answer.cols], every.keep[every.cols]) and torch.equal(answer.labels, every.labels)


def test_subject_templates_add_a_kl_from_the_subjects_last_token_to_the_end_with_its_own_mean():
    """``subject_templates``: per fact, a row of each template with its subject; the KL reads every position from
    the subject's last token on (text about the subject that asks nothing of the edit), as its own group: the
    identity network leaves it 0, a trained-rate update moves it, and the other groups stay as they were."""
    model, tok, hp = setup(TRAIN)
    spec = spec_for(model)
    batch = facts()[:2]
    templates = ("{} is a", "I read about {} and think that")
    plain = step_rows(tok, batch, torch.device("cpu"), "answer")
    subj = step_rows(tok, batch, torch.device("cpu"), "answer", after_target=True, subject_templates=templates)
    n_rows = len(plain.ids)
    assert len(subj.ids) == n_rows + len(batch) * len(templates)
    assert subj.n_unrelated == plain.n_unrelated and subj.n_after == 2 * len(batch)
    first = subj.n_unrelated + subj.n_after
    rows, cols = subj.loc_rows[first:], subj.keep[subj.loc_cols[first:]]
    for i, (r, t) in enumerate((r, t) for r in batch for t in templates):
        head = [tok.bos_token_id] * adds_bos(tok) + tok(t.split("{}")[0] + r.subject, add_special_tokens=False)["input_ids"]
        row = n_rows + i
        read = cols[rows == row].tolist()
        length = int(subj.mask[row].sum())
        assert read == list(range(len(head) - 1, length)), (t, r.subject)  # the subject's last token to the end
    assert torch.equal(subj.ids[:n_rows, : plain.ids.shape[1]], plain.ids)  # the other rows unchanged
    net = MEND.new_network(model, hp).eval()  # eval: its running statistics stay put between the calls compared
    with torch.no_grad():
        net.edit_lrs.zero_()
        assert float(meta_step(model, spec, net, subj, min(hp.layers), 0.1, 1.0)["subject_loss"]) == 0
        net.edit_lrs.fill_(1.0)
        moved = meta_step(model, spec, net, subj, min(hp.layers), 0.1, 1.0)
        alone = meta_step(model, spec, net, plain, min(hp.layers), 0.1, 1.0)
    assert float(moved["subject_loss"]) > 1e-4 and float(alone["subject_loss"]) == 0
    assert torch.allclose(moved["loc_loss"], alone["loc_loss"], rtol=1e-4)  # padded wider: float order only
    assert torch.allclose(moved["loss"], alone["loss"] + moved["after_target_loss"] + moved["subject_loss"], rtol=1e-4)


def test_a_subject_template_needs_its_subject_once_and_text_after_it():
    for bad in ("about {}", "{} and {}", "no subject"):
        with pytest.raises(ValueError, match="subject template"):
            MEND.preset(tiny_llama(64), {"train.subject_templates": [bad]})


class Killed(Exception):
    pass


def test_a_killed_training_resumes_to_the_same_weights(tmp_path):
    """Killed after step 13 (last checkpoint: step 10), then resumed: bit for bit the uninterrupted run."""
    over = {**TRAIN, "train.steps": 20, "train.val_every": 10}
    model, tok, hp = setup(over)
    spec = spec_for(model)
    data = facts()
    whole = MEND.new_network(model, hp)
    logged_whole: list[int] = []
    train(model, tok, spec, whole, data[6:], data[:6], hp, tmp_path / "a", lambda s, m: logged_whole.append(s))

    def kill_at_13(step, metrics):
        if step == 13:
            raise Killed

    part = MEND.new_network(model, hp)
    with pytest.raises(Killed):
        train(model, tok, spec, part, data[6:], data[:6], hp, tmp_path / "b", kill_at_13)
    resumed = MEND.new_network(model, hp)  # a fresh process: nothing but the checkpoint
    steps: list[int] = []
    progress = train(model, tok, spec, resumed, data[6:], data[:6], hp, tmp_path / "b", lambda s, m: steps.append(s))
    assert steps[0] == 11 and progress.step == 20
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _saved(tmp_path, fingerprint="f" * 64):
    model, tok, hp = setup()
    net = MEND.new_network(model, hp)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    d = save_network(net, tmp_path / "net", fingerprint, {"training_ids": ["train-1"]}).parent
    return model, tok, hp, net, d


def test_a_saved_network_loads_back_exactly_and_makes_the_same_edit(tmp_path):
    """Each weight keeps its own edit rate through the file (equal tensors are not enough: the order of the
    weights says which rate is whose, and a manifest written with sorted keys once swapped them)."""
    model, tok, hp = setup()
    net = MEND.new_network(model, hp)
    with torch.no_grad():
        net.edit_lrs.copy_(torch.tensor([0.01, -0.02, 0.03, -0.04]))  # one rate per weight, all different
    d = save_network(net, tmp_path / "net", "f" * 64, {"training_ids": ["train-1"]}).parent
    loaded, manifest = load_network(d, "f" * 64)
    assert manifest["training_ids"] == ["train-1"] and list(loaded.weights) == list(net.weights)
    a, b = net.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    req = facts()[:1]
    deltas = []
    for n in (net, loaded):
        editor = MEND(model, tok, hp, MENDNetwork(n, {}))
        deltas.append(editor.edit(req).weights)
        editor.revert()
    saved_delta, loaded_delta = deltas
    for name, part in saved_delta.parts.items():
        assert torch.equal(part.dense(), loaded_delta.parts[name].dense()), name
    network = MEND.open_asset("network", d, "f" * 64, {"network": "x", "network_version": "1"})
    assert network.trained_on == frozenset({"train-1"}) and network.provenance["network_version"] == "1"


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-base", "nan", "manifest"])
def test_a_tampered_truncated_or_foreign_network_is_refused(tmp_path, damage):
    model, tok, hp, net, d = _saved(tmp_path)
    blob = bytearray((d / TENSORS).read_bytes())
    if damage == "flip":
        blob[-3] ^= 1
        (d / TENSORS).write_bytes(bytes(blob))
    elif damage == "truncate":
        (d / TENSORS).write_bytes(bytes(blob[: len(blob) // 2]))
    elif damage == "manifest":
        m = json.loads((d / MANIFEST).read_text())
        m["config"]["rank"] = 8
        (d / MANIFEST).write_text(json.dumps(m))
    elif damage == "nan":  # a consistent file (hashes rewritten) that still holds NaN
        bad = MEND.new_network(model, hp)
        with torch.no_grad():
            bad.edit_lrs.fill_(float("nan"))
        save_network(bad, d, "f" * 64, {})
    fingerprint = "0" * 64 if damage == "other-base" else "f" * 64
    with pytest.raises(PatchIntegrityError):
        load_network(d, fingerprint)


def test_without_a_network_mend_refuses_and_names_the_command():
    model, tok, hp = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = make_editor("mend", model, tok, TINY)
    with pytest.raises(EditError, match="kedit train mend"):
        editor.edit(facts()[:1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_network_for_other_weights_is_refused():
    model, tok, hp = setup()
    other = MEND.new_network(model, MEND.preset(model, {**TINY, "layers": (1, 2)}))
    with pytest.raises(EditError, match="MEND network edits"):
        MEND(model, tok, hp, MENDNetwork(other, {}))


def test_a_version_names_the_network_it_was_made_with():
    model, tok, hp = setup()
    prov = {"network": "kedit-tiny-mend", "network_version": "3", "network_sha256": "ab" * 32}
    editor = MEND(model, tok, hp, MENDNetwork(MEND.new_network(model, hp), prov))
    patches = editor.edit(facts()[:1])
    assert patches.meta["assets"] == prov and patches.weights.meta["assets"] == prov


def test_training_on_zsre_records_holds_out_exactly_what_the_benchmark_scores(tmp_path, trained_tiny):
    """``kedit train mend --data Z --holdout Z --holdout-first 5``: the first 5 scored cases of the zsRE file
    (what ``kedit bench --n 5`` scores), and every record about their subjects, are never trained on; the
    rest of the file is."""
    from kedit.app.bench import _cases
    from kedit.pipeline.training import TrainConfig, prepare_data

    records = [
        {"subject": r["subject"], "src": r["prompt"].format(r["subject"]), "alt": r["target_new"]}
        | {"answers": [r["target_true"]], "rephrase": r["paraphrase_prompts"][0]}
        | {"loc": r["neighborhood"][0]["prompt"], "loc_ans": r["neighborhood"][0]["answer"]}
        for r in training_facts()
    ]
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(records))
    over = {**TINY, "train.val_facts": 6}
    out = str(tmp_path / "t")
    cfg = TrainConfig(str(trained_tiny), (str(data),), holdout=(str(data),), holdout_first=5, out=out, overrides=over)
    summary = prepare_data(cfg)
    split = json.loads((tmp_path / "t" / "split.json").read_text())
    scored = _cases(data, 5)
    trained = set(split["train"]) | set(split["val"])
    assert len(scored) == 5 and not trained & {r.id for r in scored}
    by_id = {f"zsre-{i}": r for i, r in enumerate(records)}
    assert not {by_id[i]["subject"] for i in trained} & {r.subject for r in scored}
    assert len(trained) == 30 - 15 and summary["n_held_out"] == 15  # 5 subjects, 3 relations each
