"""The contract every registered editor keeps, on a tiny model built here, plus each method's defining property."""

import copy
import json

import pytest
import torch
from conftest import make_tokenizer, tiny_gpt2, tiny_llama

import editing
from editing import EDITORS, LinearAdapter, PatchIntegrityError, PatchSet, WeightDelta, get_editor, make_editor
from editing.base import EditError, Editor
from editing.finetune import model_device, target_batch
from editing.hparams import TargetHyperParams
from editing.keys import other_subjects, subject_keys
from editing.mend.mend import MENDNetwork
from editing.stats import Corpus, second_moments
from editing.targets import optimize_targets
from kedit.core.config import ConfigError, StrictConfig
from kedit.core.facts import EditRequest
from kedit.core.lm import score_targets
from kedit.core.routing import routers

CORPUS = Corpus(
    "test",
    tuple(
        s
        for _ in range(4)
        for s in [
            "the capital of france is paris and the capital of germany is berlin",
            "alice speaks french and bob speaks german",
            "the river flows through the city of london in england",
            "who leads the company ? the ceo carol leads the company",
            "rome is a city in italy and madrid is a city in spain",
        ]
    ),
)

WISE_TINY = {
    "layer": 2,
    "memory.shard_edits": 2,
    "router.irrelevant_max": 0.05,
    "router.edit_min": 0.5,
    "router.gap": 0.2,
    "train.lr": 0.5,
    "train.steps": 40,
    "templates.count": 2,
    "templates.length": 3,
    "irrelevant.length": 4,
}
# per editor: overrides that fit a 4-layer model
TINY = {"statistics.samples": 40, "statistics.length": 16, "templates.count": 2, "templates.length": 3}
OVERRIDES = {
    # a tiny model's MLP outputs are small: a larger norm bound lets δ at one MLP do the edit alone
    "rome": {"layer": 1, "targets.clamp_norm": 200.0, **TINY},
    "memit": {"layers": (1, 2), "solve.mom2_weight": 1.0, **TINY},
    "alphaedit": {"layers": (1, 2), "solve.l2": 1e-6, "solve.nullspace_threshold": 1e-3, **TINY},
    "pmet": {"layers": (1, 2), "targets.clamp_norm": 200.0, "solve.mom2_weight": 1.0, **TINY},
    # MEMIT's llama preset steps on a bf16 copy where native, CoME's does not: alpha 0 equals MEMIT in one precision
    "come-memit": {"layers": (1, 2), "solve.mom2_weight": 1.0, "targets.precision": "model", **TINY},
    "come-pmet": {"layers": (1, 2), "solve.mom2_weight": 1.0, **TINY},
    "ft-l": {"layers": (1,), "lr": 0.01, "norm_constraint": 0.05},
    "ft-m": {"layers": (1,), "lr": 0.01},
    # an untrained network (the identity maps): one gradient step of rate edit_lr on two layers' MLPs
    "mend": {"layers": (2, 3), "network.rank": 16, "edit_lr": 0.01},
    "grace": {"layer": 2, "codebook.radius": 0.5, "codebook.capacity": 2},
    # the value at its key's block; the presets' split codebook (the value above its key) is the variant below
    "balancedit": {
        "layer": 1,
        "value_layer": None,
        "scope.capacity": 2,
        "templates.count": 2,
        "templates.length": 3,
        "value.clamp_norm": 200.0,
    },
    # a tiny model's outputs are small: margins to its scale, two edits per shard, two shards per merge
    "wise": WISE_TINY,
}


class AdapterHyperParams(StrictConfig):
    layer: int = 1
    rank: int = 2
    steps: int = 10
    lr: float = 0.05


class AdapterEditor(Editor):
    """A module-patch editor for the contract: trains a LinearAdapter installed at one MLP output projection.
    Not registered: the contract builds it by class (see ``editor_class``)."""

    name = "test-adapter"
    hparams_cls = AdapterHyperParams

    @classmethod
    def preset(cls, model, overrides=None):
        return AdapterHyperParams(**(overrides or {}))

    def _edit(self, requests):
        hp = self.hparams
        path = self.spec.module_path("mlp_out", hp.layer)
        adapter = LinearAdapter(self.model.get_submodule(path), hp.rank)
        with torch.no_grad():  # B = 0: the adapter starts as the identity; A random so B gets a gradient
            adapter.A.copy_(0.1 * torch.randn(adapter.A.shape, generator=torch.Generator().manual_seed(0)))
        self._install(path, adapter)
        ids, mask, pos, rows, cols, labels, _ = target_batch(self.tok, requests, model_device(self.model))
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:
            p.requires_grad_(p is adapter.A or p is adapter.B)
        opt = torch.optim.Adam([adapter.A, adapter.B], lr=hp.lr)
        try:
            for _ in range(hp.steps):
                opt.zero_grad()
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                logp = torch.log_softmax(logits[rows, cols].float(), -1)  # (N, V) at target positions
                (-logp.gather(-1, labels[:, None]).mean()).backward()
                opt.step()
        finally:
            for p, f in flags:
                p.requires_grad_(f)
            adapter.A.grad = adapter.B.grad = None


TEST_EDITORS = {AdapterEditor.name: AdapterEditor}
CONTRACT = {**OVERRIDES, AdapterEditor.name: dict(layer=1, rank=2, steps=10, lr=0.05)}
# a registered editor in another layout its hparams offer, through the whole contract: "editor[what]" -> overrides
CONTRACT["balancedit[value above its key]"] = CONTRACT["balancedit"] | {"value_layer": 2}


def editor_class(name):
    name = name.split("[")[0]
    return TEST_EDITORS.get(name) or get_editor(name)


REQUESTS = [
    EditRequest("a", "france", "the capital of {} is", "rome", "paris"),
    EditRequest("b", "alice", "{} speaks", "german", "french"),
]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))


def trained_scale_llama(vocab_size, seed=0):
    """A tiny Llama whose weights are initialized at 0.05 rather than 0.02: its MLP and attention
    outputs then have the relative sizes of a trained model's, which locate-then-edit methods assume."""
    return tiny_llama(vocab_size, seed=seed, init=0.05)


def build(name, make=trained_scale_llama, seed=0):
    tok = make_tokenizer()
    model = make(len(tok), seed=seed)
    cls = editor_class(name)
    hp = cls.preset(model, CONTRACT[name])
    kwargs = {"corpus": CORPUS} if "corpus" in cls.assets else {}
    if cls.trains:  # what it would load from the registry: here its untrained network
        kwargs[cls.trains] = MENDNetwork(cls.new_network(model, hp), {"network": "untrained"})
    return model, tok, cls(model, tok, hp, **kwargs)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_every_editor_has_a_contract_entry():
    assert set(EDITORS) == set(OVERRIDES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_editor_contract(name, dtype, tmp_path):
    """bf16 stands for a GPU checkpoint: weights keep their dtype, the linear algebra runs in fp32,
    and the patches and the revert stay exact in the weights' own dtype."""
    model, tok, editor = build(name, make=lambda v, seed: trained_scale_llama(v, seed).to(dtype))
    base = copy.deepcopy(model)
    before = snapshot(model)
    modules_before = dict(model.named_modules())
    p0 = score_targets(model, tok, [r.text for r in REQUESTS], [r.target_new for r in REQUESTS]).mean_logprob

    patches = editor.edit(REQUESTS)
    p1 = score_targets(model, tok, [r.text for r in REQUESTS], [r.target_new for r in REQUESTS]).mean_logprob
    assert (p1 > p0).all(), f"{name}: target log-prob {p0.tolist()} -> {p1.tolist()}"
    assert isinstance(patches, PatchSet) and len(patches) and patches.meta["request_ids"] == ["a", "b"]
    assert all(p.meta["request_ids"] == ["a", "b"] for p in patches)
    assert all(len(v) == len(REQUESTS) for v in editor.diagnostics.values()), "diagnostics: one value per request"
    edited = snapshot(model)
    assert all(torch.isfinite(v).all() for v in edited.values())
    assert all(edited[k].dtype == before[k].dtype for k in before if k in edited), "weights keep their dtype"
    # an installed module's own tensors are the model's dtype, or fp32 where they count (a bf16 257 is 256)
    assert all(edited[k].dtype in (dtype, torch.float32) for k in set(edited) - set(before))
    installed = patches.modules.describe()["paths"]
    # the class says whether its edits install memories: a stream refuses to gate such a model on a rounded copy
    assert bool(routers(model)) == type(editor).installs_memories

    def inside(k):
        return any(k.startswith(p + ".") for p in installed)

    touched = {k for k in before if k not in edited or not torch.equal(before[k], edited[k])}
    assert touched == set(patches.weights.parts) | {k for k in before if inside(k)}, "the model changes only through the patches"
    assert all(inside(k) for k in set(edited) - set(before))
    json.dumps(patches.describe())

    # the stored patches rebuild the edited model bit for bit from the base
    index = patches.save(tmp_path / "patches")
    PatchSet.load(tmp_path / "patches", index).apply(base)
    assert_same_bits(snapshot(base), edited)

    # state round-trips into a fresh editor
    state = editor.state_dict()
    _, _, fresh = build(name)
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == state.keys()
    for k in state:
        assert torch.equal(fresh.state_dict()[k], state[k])

    # revert restores weights bit for bit, the very module objects, and the state before the edit
    editor.revert()
    assert_same_bits(snapshot(model), before)
    after = dict(model.named_modules())
    assert after.keys() == modules_before.keys() and all(after[k] is modules_before[k] for k in after)
    assert editor.state_dict() == {} or all(v.abs().sum() == 0 for v in editor.state_dict().values())


def test_make_editor_passes_declared_assets_only():
    tok = make_tokenizer()
    model = trained_scale_llama(len(tok))
    assert make_editor("memit", model, tok, OVERRIDES["memit"], assets={"corpus": CORPUS}).corpus is CORPUS
    assert make_editor("ft-m", model, tok, OVERRIDES["ft-m"], assets={"corpus": CORPUS}).name == "ft-m"  # not declared: left out
    with pytest.raises(EditError, match="unknown editor asset"):
        make_editor("memit", model, tok, OVERRIDES["memit"], assets={"hypernet": object()})


def test_apply_inside_a_module_installed_in_the_same_edit_is_refused():
    class Bad(AdapterEditor):
        def _edit(self, requests):
            path = self.spec.module_path("mlp_out", 1)
            self._install(path, LinearAdapter(self.model.get_submodule(path), 2))
            self._apply(f"{path}.B", editing.Dense(torch.ones(32, 2)))

    tok = make_tokenizer()
    model = trained_scale_llama(len(tok))
    before = snapshot(model)
    with pytest.raises(EditError, match="installed in this edit"):
        Bad(model, tok, AdapterHyperParams()).edit(REQUESTS)
    assert_same_bits(snapshot(model), before)


def test_tampered_or_missing_delta_is_refused(tmp_path):
    model, tok, editor = build("memit")
    d = editor.edit(REQUESTS[:1]).weights.save(tmp_path / "d")
    blob = bytearray((d / "delta.safetensors").read_bytes())
    blob[-1] ^= 1
    (d / "delta.safetensors").write_bytes(bytes(blob))
    with pytest.raises(PatchIntegrityError, match="does not match"):
        WeightDelta.load(d)
    (d / "delta.safetensors").unlink()
    with pytest.raises(PatchIntegrityError, match="no delta.safetensors"):
        WeightDelta.load(d)


def test_rome_update_is_rank_one():
    model, tok, editor = build("rome")
    delta = editor.edit(REQUESTS[:1]).weights
    (upd,) = delta.parts.values()
    assert upd.rank == 1
    assert torch.linalg.matrix_rank(upd.dense()).item() == 1


def test_rome_on_gpt2_conv1d_layout():
    model, tok, editor = build("rome", make=tiny_gpt2)
    delta = editor.edit(REQUESTS[:1]).weights
    (name,) = delta.parts
    assert name == "transformer.h.1.mlp.c_proj.weight"
    assert delta.parts[name].dense().shape == model.get_parameter(name).shape


def test_memit_update_rank_is_at_most_the_batch_size():
    model, tok, editor = build("memit")
    delta = editor.edit(REQUESTS).weights
    for upd in delta.parts.values():
        assert upd.rank == 2 and torch.linalg.matrix_rank(upd.dense()).item() <= 2


def test_alphaedit_leaves_preserved_keys_unchanged():
    """Keys in the span of the statistics (the preserved knowledge) map to the same outputs after the edit."""
    model, tok, editor = build("alphaedit")
    layer = 1
    cov = editor.covariances()[layer]
    evals, evecs = torch.linalg.eigh(cov.double())
    # a random tiny model's keys are small: put the threshold inside its spectrum
    threshold = float(evals.median())
    editor = get_editor("alphaedit")(
        model, tok, editor.preset(model, OVERRIDES["alphaedit"] | {"solve.nullspace_threshold": threshold}), CORPUS
    )
    kept = evecs[:, evals >= editor.hparams.solve.nullspace_threshold].float()  # (d_in, m) preserved directions
    assert 0 < kept.shape[1] < cov.shape[0]
    k0 = kept @ torch.randn(kept.shape[1], 16)  # (d_in, 16) preserved keys
    k_edit = subject_keys(model, tok, editor.spec, [layer], REQUESTS, editor.templates())[layer].T  # (d_in, 2)
    w = model.get_parameter(editor.weight_name("mlp_out", layer)).detach().clone()
    editor.edit(REQUESTS)
    dw = model.get_parameter(editor.weight_name("mlp_out", layer)).detach() - w

    def rel(k):
        return ((dw @ k).norm(dim=0) / (w @ k).norm(dim=0)).max()

    assert rel(k_edit) > 1e-3  # the edit moved its own keys' outputs
    assert rel(k0) < 1e-4 * rel(k_edit)  # and not the preserved ones


def test_other_subjects_are_the_batchs_others_in_each_prompt_never_one_the_batch_edits_there():
    r = [
        EditRequest("a", "france", "the capital of {} is", "rome"),
        EditRequest("b", "alice", "{} speaks", "german"),
        EditRequest("c", "Alice", "the capital of {} is", "berlin"),  # alice's capital is edited in this batch
        EditRequest("d", "bob", "{} speaks", "french"),
        EditRequest("e", "eve", "{} lives in", "paris"),
    ]
    cap, speaks = "the capital of {} is", "{} speaks"
    kept, owner = other_subjects(r, 2)
    assert owner == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    got = [(n.id, n.subject, n.prompt) for n in kept]
    assert got == [
        ("a~0", "bob", cap),  # alice's and Alice's capital are c's edit (case folded): skipped
        ("a~1", "eve", cap),
        ("b~0", "eve", speaks),  # from b's own subject on: Alice speaks is b's own edit, bob speaks d's
        ("b~1", "france", speaks),  # wrapped around
        ("c~0", "bob", cap),
        ("c~1", "eve", cap),
        ("d~0", "eve", speaks),
        ("d~1", "france", speaks),
        ("e~0", "france", "{} lives in"),
        ("e~1", "alice", "{} lives in"),
    ]
    assert other_subjects(r, 0) == ([], [])


@pytest.mark.parametrize("positions", ["subject", "all"])
@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_the_batchs_other_subjects_in_each_prompt_keep_their_outputs(name, positions):
    """``negatives``: the update leaves each prompt about the batch's other subjects (nearly) where it was."""
    moved = {}
    for per_request in (0, 1):
        tok = make_tokenizer()
        model = trained_scale_llama(len(tok))
        cls = get_editor(name)
        negatives = {"per_request": per_request, "weight": 100.0, "positions": positions}
        hp = cls.preset(model, CONTRACT[name] | {f"negatives.{k}": v for k, v in negatives.items()})
        editor = cls(model, tok, hp, CORPUS)
        layer = hp.layers[0]  # its keys at edit time are the unedited model's
        kept = subject_keys(model, tok, editor.spec, [layer], other_subjects(REQUESTS, 1)[0], ("{}",))[layer]  # (2, d_in)
        own = subject_keys(model, tok, editor.spec, [layer], REQUESTS, editor.templates())[layer]  # (2, d_in)
        w = model.get_parameter(editor.weight_name("mlp_out", layer)).detach().clone()
        editor.edit(REQUESTS)
        dw = model.get_parameter(editor.weight_name("mlp_out", layer)).detach() - w  # (d_out, d_in)
        assert (own @ dw.T).norm(dim=-1).min() > 1e-3  # the edit moved its own keys' outputs either way
        moved[per_request] = (kept @ dw.T).norm(dim=-1) / (own @ dw.T).norm(dim=-1)  # (2,)
    assert (moved[0] > 0.05).all()  # without negatives the other subjects' outputs move with the edit
    assert (moved[1] < 0.1 * moved[0]).all()


def test_alphaedit_accumulates_keys_of_earlier_batches():
    model, tok, editor = build("alphaedit")
    editor.edit(REQUESTS[:1])
    first = {k: v.clone() for k, v in editor.state_dict().items()}
    editor.edit(REQUESTS[1:])
    second = editor.state_dict()
    sums = ["key_cache.1", "key_cache.2"]
    assert set(first) == {*sums, "new_keys.1.0", "new_keys.2.0"}  # the sums, and each edit's keys until a commit
    assert set(second) == set(first) | {"new_keys.1.1", "new_keys.2.1"}
    assert all(not torch.equal(first[k], second[k]) for k in sums)
    editor.revert()
    assert editor.state_dict().keys() == first.keys() and all(torch.equal(first[k], editor.state_dict()[k]) for k in first)


def test_alphaedit_versions_store_their_keys_and_the_chain_adds_them_up_bit_for_bit():
    cls = editor_class("alphaedit")
    model, tok, editor = build("alphaedit")
    stored = []
    for batch in (REQUESTS[:1], REQUESTS[1:], REQUESTS):
        editor.edit(batch)
        stored.append(editor.version_state())
        editor.commit()
    # each version holds its edit's keys, (n, d_in) per layer, not the (d_in, d_in) sums
    assert [sorted(s) for s in stored] == [["keys.1.0", "keys.2.0"]] * 3
    assert [s["keys.1.0"].shape[0] for s in stored] == [1, 1, 2]
    whole = editor.state_dict()
    assert sorted(whole) == ["key_cache.1", "key_cache.2"]  # a commit leaves no pending keys
    rebuilt = cls.state_at(stored)
    assert rebuilt.keys() == whole.keys() and all(torch.equal(rebuilt[k], whole[k]) for k in whole)
    # a squash stores the sums at its head; the versions after it add their keys to them
    assert all(torch.equal(cls.state_at([cls.state_at(stored[:2]), stored[2]])[k], whole[k]) for k in whole)
    # a version written before versions stored keys held the sums: it starts the addition over
    assert all(torch.equal(cls.state_at([stored[0], cls.state_at(stored[:2]), stored[2]])[k], whole[k]) for k in whole)


def test_batched_target_vectors_equal_per_request_ones():
    tok = make_tokenizer()
    model = tiny_llama(len(tok), seed=0)
    from kedit.core.arch import spec_for

    spec = spec_for(model)
    path = spec.module_path("mlp_out", 1)
    cfg = TargetHyperParams(steps=8, lr=0.1)
    templates = ("{}", "the city . {}")
    joint = optimize_targets(model, tok, spec, REQUESTS, templates, [path], 1, cfg)
    for i, r in enumerate(REQUESTS):
        alone = optimize_targets(model, tok, spec, [r], templates, [path], 1, cfg)
        assert torch.allclose(joint.deltas[path][i], alone.deltas[path][0], atol=1e-4)


def test_a_step_scale_is_a_learning_rate_per_coordinate():
    """``step_scale``: ones change nothing; a coordinate scaled by 0 never moves; one scaled by 2 takes Adam's
    steps twice as long (no clamp, no decay, one step: Adam's first step is lr·sign(g) on every coordinate)."""
    tok = make_tokenizer()
    model = tiny_llama(len(tok), seed=0)
    from kedit.core.arch import spec_for

    spec = spec_for(model)
    path = spec.module_path("mlp_out", 1)
    cfg = TargetHyperParams(steps=1, lr=0.1, weight_decay=0.0, clamp_norm=1e9, kl_factor=0.0)
    templates = ("{}",)
    plain = optimize_targets(model, tok, spec, REQUESTS, templates, [path], 1, cfg).deltas[path]  # (2, d)
    d = plain.shape[-1]
    ones = optimize_targets(model, tok, spec, REQUESTS, templates, [path], 1, cfg, step_scale={path: torch.ones(d)})
    assert torch.equal(ones.deltas[path], plain)
    scale = torch.ones(d)
    scale[: d // 2], scale[d // 2 :] = 0.0, 2.0
    got = optimize_targets(model, tok, spec, REQUESTS, templates, [path], 1, cfg, step_scale={path: scale}).deltas[path]
    assert not got[:, : d // 2].any()
    assert torch.allclose(got[:, d // 2 :], 2 * plain[:, d // 2 :])


@pytest.mark.parametrize("make", [trained_scale_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_targets_from_a_prefix_cache_equal_full_forwards(make):
    """δ enters at the subject's last token: the tokens before it are run once and cached, each step runs the
    rest. The optimization must be the one that runs every token every step (the arithmetic before the cache)."""
    tok = make_tokenizer()
    model = make(len(tok), seed=0)
    from kedit.core.arch import spec_for

    spec = spec_for(model)
    path = spec.module_path("mlp_out", 1)
    reqs = [
        *REQUESTS,
        EditRequest("c", "the river", "{} flows through", "the city of london", None),  # subject first
        EditRequest("d", "alice", "who leads company ceo {}", "bob", None),  # subject last
    ]
    templates = ("{}", "the city . {}")
    widths = []
    h = model.get_submodule(spec.block(2)).register_forward_hook(
        lambda m, a, o: widths.append((o[0] if isinstance(o, tuple) else o).shape[:2])
    )
    runs = {}
    for cached in (True, False):
        widths.clear()
        cfg = TargetHyperParams(steps=10, lr=0.5, clamp_norm=200.0, prefix_cache=cached)
        runs[cached] = (optimize_targets(model, tok, spec, reqs, templates, [path], 1, cfg), list(widths))
    h.remove()
    (cached, w_cached), (full, w_full) = runs[True], runs[False]
    assert full.deltas[path].norm(dim=-1).min() > 0.1  # the optimization moved every δ
    assert torch.allclose(cached.deltas[path], full.deltas[path], atol=1e-5, rtol=1e-4)
    assert torch.allclose(cached.nll, full.nll, atol=1e-5) and torch.equal(cached.steps, full.steps)
    assert torch.equal(cached.originals[path], full.originals[path])
    # the first forward runs every row and column; the steps run the tokens from the subject's last token on,
    # several rows' to a sequence; full or cached, never a rewrite row's last token (the longest rows here end in
    # a target, so the full steps are one column narrower)
    assert w_cached[0] == w_full[0] and all(w == (w_full[0][0], w_full[0][1] - 1) for w in w_full[1:])
    assert all(b < w_full[0][0] and t < w_full[0][1] for b, t in w_cached[1:])


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "full"])
def test_the_steps_leave_out_each_rewrite_rows_last_token_and_optimize_the_same(cached, monkeypatch):
    """The last target token is predicted at the column before it and seen by no earlier token: a step without it
    computes the same losses and gradients as one with it, over fewer tokens."""
    import editing.targets as targets
    from kedit.core.arch import spec_for

    tok = make_tokenizer()
    model = trained_scale_llama(len(tok), seed=0)
    spec = spec_for(model)
    path = spec.module_path("mlp_out", 1)
    reqs = [*REQUESTS, EditRequest("c", "the river", "{} flows through", "the city of london", None)]
    cfg = TargetHyperParams(steps=8, lr=0.5, clamp_norm=200.0, prefix_cache=cached)
    tokens = []  # per forward through block 2: the token slots it ran, (B, T) -> B * T
    h = model.get_submodule(spec.block(2)).register_forward_hook(
        lambda m, a, o: tokens.append((o[0] if isinstance(o, tuple) else o).shape[:2].numel())
    )
    trimmed = optimize_targets(model, tok, spec, reqs, ("{}", "the city . {}"), [path], 1, cfg)
    t_trimmed = list(tokens)
    tokens.clear()
    monkeypatch.setattr(targets, "_without_last_target", lambda lay, n: lay)
    whole = optimize_targets(model, tok, spec, reqs, ("{}", "the city . {}"), [path], 1, cfg)
    h.remove()
    assert whole.deltas[path].norm(dim=-1).min() > 0.1
    assert torch.allclose(trimmed.deltas[path], whole.deltas[path], atol=1e-5, rtol=1e-4)
    assert torch.allclose(trimmed.nll, whole.nll, atol=1e-5) and torch.equal(trimmed.steps, whole.steps)
    # every step ran fewer token slots (the first forward, before any step, runs the full layout in both)
    assert t_trimmed[0] == tokens[0] and all(a < b for a, b in zip(t_trimmed[1:], tokens[1:], strict=True))


@pytest.mark.parametrize("replace", [False, True], ids=["add", "replace"])
@pytest.mark.parametrize("cached", [True, False], ids=["cache", "full"])
@pytest.mark.parametrize("make", [trained_scale_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_target_at_a_block_output_starts_the_steps_at_the_next_block(make, cached, replace):
    """MEMIT's z is a block's output: the steps feed it to the next block instead of running the block again. The
    optimization must be the one that runs the block and adds δ at its output (started a block lower here)."""
    tok = make_tokenizer()
    model = make(len(tok), seed=0)
    from kedit.core.arch import spec_for

    spec = spec_for(model)
    path = spec.block(1)
    ran = []
    h = model.get_submodule(path).register_forward_hook(lambda m, a, o: ran.append(1))
    cfg = TargetHyperParams(steps=10, lr=0.5, clamp_norm=200.0, prefix_cache=cached)
    ran.clear()
    skip = optimize_targets(model, tok, spec, REQUESTS, ("{}", "the city . {}"), [path], 1, cfg, replace=replace)
    runs_skipping = len(ran)
    ran.clear()
    hooked = optimize_targets(model, tok, spec, REQUESTS, ("{}", "the city . {}"), [path], 0, cfg, replace=replace)
    h.remove()
    assert runs_skipping == 1 and len(ran) > 2  # the first forward only, against once per step
    assert hooked.deltas[path].norm(dim=-1).min() > 0.1
    assert torch.allclose(skip.deltas[path], hooked.deltas[path], atol=1e-5, rtol=1e-4)
    assert torch.allclose(skip.nll, hooked.nll, atol=1e-5) and torch.equal(skip.steps, hooked.steps)


def test_the_low_precision_copy_is_made_straight_in_its_dtype_and_equals_a_converted_deepcopy():
    from kedit.core.precision import low_precision_copy

    model = tiny_llama(len(make_tokenizer()), seed=0)
    model.get_output_embeddings().weight = model.get_input_embeddings().weight  # a head tied as SmolLM2's is
    low = low_precision_copy(model, torch.bfloat16)
    converted = copy.deepcopy(model).to(torch.bfloat16)  # how the copy was made before
    ours, theirs = low.state_dict(), converted.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    assert all(not p.requires_grad for p in low.parameters()) and next(model.parameters()).dtype == torch.float32
    assert low.get_output_embeddings().weight is low.get_input_embeddings().weight  # still one tensor


def test_targets_in_bfloat16_run_on_a_copy_and_stay_near_the_model_precision():
    tok = make_tokenizer()
    model = trained_scale_llama(len(tok))
    from kedit.core.arch import spec_for
    from kedit.store.versions import model_fingerprint

    spec = spec_for(model)
    path = spec.module_path("mlp_out", 1)
    before = model_fingerprint(None, model)
    runs = {}
    for precision in ("model", "bfloat16"):
        cfg = TargetHyperParams(steps=10, lr=0.5, clamp_norm=200.0, precision=precision)
        runs[precision] = optimize_targets(model, tok, spec, REQUESTS, ("{}", "the city . {}"), [path], 1, cfg)
    exact, low = runs["model"], runs["bfloat16"]
    assert model_fingerprint(None, model) == before and next(model.parameters()).dtype == torch.float32
    # the unedited outputs are read on the copy too (the steps' KL then starts at zero in their own precision)
    o_rel = (low.originals[path] - exact.originals[path]).norm(dim=-1) / exact.originals[path].norm(dim=-1)
    assert o_rel.max() < 3e-2 and not torch.equal(low.originals[path], exact.originals[path])
    rel = (low.deltas[path] - exact.deltas[path]).norm(dim=-1) / exact.deltas[path].norm(dim=-1)
    assert rel.max() < 1e-2 and not torch.equal(low.nll, exact.nll)  # near, but computed in another precision


def test_the_steps_attend_on_the_plain_path_where_chosen_and_the_model_gets_its_own_back():
    from editing.targets import _step_attention
    from kedit.core.precision import low_precision_copy

    model = trained_scale_llama(len(make_tokenizer()))
    own = model.config._attn_implementation
    assert own != "eager"
    with _step_attention(model, "auto", copied=False):  # the model itself: its own
        assert model.config._attn_implementation == own
    copy = low_precision_copy(model, torch.bfloat16)
    with _step_attention(copy, "auto", copied=True):  # a bf16 copy on a CPU: plain, in every module
        assert all(m.config._attn_implementation == "eager" for m in copy.modules() if hasattr(m, "config"))
        assert model.config._attn_implementation == own  # the copy's config is its own
    assert copy.config._attn_implementation == own
    with pytest.raises(RuntimeError), _step_attention(model, "plain", copied=False):
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("a step failed")
    assert model.config._attn_implementation == own  # put back on the way out of a failure too
    with _step_attention(copy, "model", copied=True):
        assert copy.config._attn_implementation == own


def test_replaced_targets_are_trained_as_a_codebook_value_acts_in_every_context():
    """``replace``: the value (the "{}" output plus δ) stands at the subject in every row, prefixed ones included,
    so the NLL the optimizer stopped at is what the model gives with the value put in place there; δ added to each
    row's own output (a weight edit's semantics) is another function of δ on the prefixed rows."""
    from editing.hooks import edit_output
    from editing.keys import locate
    from kedit.core.arch import spec_for

    tok = make_tokenizer()
    model = trained_scale_llama(len(tok))
    spec = spec_for(model)
    path = spec.module_path("mlp_out", 1)
    templates = ("{}", "the city . {}")

    def nll_with_value_in_place(value: torch.Tensor) -> torch.Tensor:  # value (n, d) -> (n,) mean over templates
        loc = locate(tok, REQUESTS, templates)
        out = torch.zeros(len(REQUESTS))
        for ids, pos, i in zip(loc.ids, loc.subject_pos, loc.owner):
            target = tok(" " + REQUESTS[i].target_new, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids + target])

            def put(o, pos=pos, v=value[i]):
                o = o.clone()
                o[0, pos] = v
                return o

            with torch.no_grad(), edit_output(model, path, put):
                logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
            cols = torch.arange(len(ids) - 1, len(ids) - 1 + len(target))
            out[i] += -logp[cols, torch.tensor(target)].mean() / len(templates)
        return out

    def run(steps: int, replace: bool):
        cfg = TargetHyperParams(steps=steps, lr=0.5, weight_decay=0.0, clamp_norm=200.0, kl_factor=0.0, stop_loss=0.0)
        return optimize_targets(model, tok, spec, REQUESTS, templates, [path], 1, cfg, replace=replace)

    # a run of k steps reports the NLL its last forward saw: that of the δ a run of k - 1 steps returns
    for replace in (True, False):
        before, last = run(5, replace), run(6, replace)
        assert (before.deltas[path].norm(dim=-1) > 0.1).all()  # the optimization moved every δ
        seen = nll_with_value_in_place(before.originals[path] + before.deltas[path])
        gap = float((seen - last.nll).abs().max())
        # replaced: what the optimizer saw, to float error; added: another function of δ on the prefixed rows (the
        # tiny model's prefix moves the subject's output little, but far more than float error)
        assert gap < 1e-6 if replace else gap > 1e-4


def test_a_request_that_stops_early_leaves_the_batch():
    tok = make_tokenizer()
    model = trained_scale_llama(len(tok))
    from kedit.core.arch import spec_for

    spec = spec_for(model)
    path = spec.module_path("mlp_out", 1)
    reqs = [*REQUESTS, EditRequest("c", "the river", "{} flows through", "the city of london", None)]
    # measured on this model: request "a" reaches this NLL after one step, the others never do; rows are counted
    # without the prefix cache, which packs several rows' tokens into one sequence
    cfg = TargetHyperParams(steps=12, lr=0.5, stop_loss=3.6, clamp_norm=200.0, prefix_cache=False)
    templates = ("{}", "the city . {}")
    rows_seen = []
    h = model.model.layers[2].register_forward_hook(
        lambda m, a, o: rows_seen.append((o[0] if isinstance(o, tuple) else o).shape[0])
    )
    joint = optimize_targets(model, tok, spec, reqs, templates, [path], 1, cfg)
    h.remove()
    assert joint.steps.tolist() == [1, 12, 12]
    full = rows_seen[0]  # the forward that caches the first block's input: every row
    assert rows_seen[1] == full and rows_seen[-1] == full - 3  # "a"'s two template rows and its KL row dropped
    packed = optimize_targets(model, tok, spec, reqs, templates, [path], 1, cfg.model_copy(update={"prefix_cache": True}))
    assert packed.steps.tolist() == [1, 12, 12] and torch.allclose(packed.deltas[path], joint.deltas[path], atol=1e-5)
    for i, r in enumerate(reqs):
        alone = optimize_targets(model, tok, spec, [r], templates, [path], 1, cfg)
        assert alone.steps.tolist() == [joint.steps[i].item()]
        assert torch.allclose(joint.deltas[path][i], alone.deltas[path][0], atol=1e-5)
        assert torch.allclose(joint.nll[i], alone.nll[0], atol=1e-5)


def test_normalized_steps_move_each_row_along_its_own_descent_and_adapt_its_size():
    """``optimizer: normalized``: a row's step is ``size`` along -g/‖g‖; the size grows while the direction holds
    and shrinks when it turns back, per row. On ‖x - c‖² from 0 the first steps are exactly that, and an overshoot
    halves the size."""
    from editing.targets import _NormalizedSteps

    torch.manual_seed(0)
    c = torch.randn(2, 8) * torch.tensor([[1.0], [10.0]])  # two rows, targets at very different distances
    x = torch.zeros(2, 8, requires_grad=True)
    opt = _NormalizedSteps([x], [torch.tensor([0.5, 0.5])], grow=1.5, shrink=0.5)
    path, sizes = [], []
    for _ in range(40):
        opt.zero_grad()
        ((x - c) ** 2).sum().backward()
        before = x.detach().clone()
        opt.step()
        path.append(x.detach() - before)
        sizes.append(opt.size[0][:, 0].clone())
    unit = c / c.norm(dim=-1, keepdim=True)  # from 0 the descent is straight at c
    assert torch.allclose(path[0], 0.5 * unit, atol=1e-6) and torch.allclose(path[1], 0.75 * unit, atol=1e-6)
    assert torch.allclose(path[0].norm(dim=-1), torch.tensor([0.5, 0.5]))  # each row its own size, not Adam's per-coordinate lr
    far = c[1].norm()
    # the far row's size grows 1.5x a step (0.5, 0.75, ...) until a step passes c; the next step turns back at half the size
    far_sizes = [float(s[1]) for s in sizes]
    turn = next(i for i in range(1, 40) if far_sizes[i] < far_sizes[i - 1])
    assert far_sizes[:turn] == pytest.approx([0.5 * 1.5**i for i in range(turn)])
    assert sum(far_sizes[:turn]) > far > sum(far_sizes[: turn - 1])
    assert (x.detach() - c).norm(dim=-1).max() < 1e-2  # both rows converge


def test_normalized_targets_step_by_their_size_and_find_the_regularized_optimum_adam_overshoots():
    """Through optimize_targets: one step moves each request's δ by step_size × ‖h‖ exactly (the clamp far away).
    Run for 60 steps on this model, whose targets no δ brings under NLL 3.4: the normalized steps settle where the
    NLL and the weight decay balance, Adam at lr 0.5 ends with a loss higher by the decay of a far larger δ."""
    tok = make_tokenizer()
    model = trained_scale_llama(len(tok))
    from kedit.core.arch import spec_for

    spec = spec_for(model)
    path = spec.module_path("mlp_out", 1)
    reqs = [*REQUESTS, EditRequest("c", "the river", "{} flows through", "the city of london", None)]
    templates = ("{}", "the city . {}")
    cfg = TargetHyperParams(optimizer="normalized", step_size=0.25, steps=1, stop_loss=0.0, clamp_norm=200.0, kl_factor=0.0)
    one = optimize_targets(model, tok, spec, reqs, templates, [path], 1, cfg)
    norms = one.originals[path].norm(dim=-1)
    assert torch.allclose(one.deltas[path].norm(dim=-1), 0.25 * norms, rtol=1e-5)
    runs = {
        name: optimize_targets(model, tok, spec, reqs, templates, [path], 1, cfg.model_copy(update={"steps": 60, **extra}))
        for name, extra in (("normalized", {}), ("adam", {"optimizer": "adam", "lr": 0.5}))
    }
    ratio = {k: r.deltas[path].norm(dim=-1) / norms for k, r in runs.items()}
    loss = {k: r.nll + cfg.weight_decay * ratio[k] ** 2 for k, r in runs.items()}  # (n,) each: what was minimized
    assert bool((loss["normalized"] < loss["adam"] - 0.1).all())
    assert bool((ratio["normalized"] < ratio["adam"] / 4).all())


def test_without_a_kl_term_the_kl_rows_are_not_run_and_nothing_else_changes():
    tok = make_tokenizer()
    model = trained_scale_llama(len(tok))
    from kedit.core.arch import spec_for

    spec = spec_for(model)
    path = spec.module_path("mlp_out", 1)
    templates = ("{}", "the city . {}")
    rows_seen = []
    h = model.model.layers[2].register_forward_hook(
        lambda m, a, o: rows_seen.append((o[0] if isinstance(o, tuple) else o).shape[0])
    )
    tiny_kl = optimize_targets(model, tok, spec, REQUESTS, templates, [path], 1, TargetHyperParams(steps=6, kl_factor=1e-30))
    with_kl, rows_seen = rows_seen[-1], []
    none = optimize_targets(model, tok, spec, REQUESTS, templates, [path], 1, TargetHyperParams(steps=6, kl_factor=0.0))
    h.remove()
    assert rows_seen[-1] == with_kl - len(REQUESTS)  # one KL row per request fewer in every forward
    assert torch.allclose(none.deltas[path], tiny_kl.deltas[path], atol=1e-5) and none.steps.tolist() == tiny_kl.steps.tolist()


def test_layers_below_the_first_edited_block_are_not_run_during_optimization():
    tok = make_tokenizer()
    model = tiny_llama(len(tok))
    from kedit.core.arch import spec_for

    spec = spec_for(model)
    calls = []
    h = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    optimize_targets(
        model, tok, spec, REQUESTS, ("{}",), [spec.module_path("mlp_out", 2)], 2, TargetHyperParams(steps=5, stop_loss=0.0)
    )
    h.remove()
    assert len(calls) == 1  # the single forward that caches the input of block 2


def test_statistics_cache_is_keyed_by_the_weights(tmp_path):
    tok = make_tokenizer()
    model = tiny_llama(len(tok))
    from kedit.core.arch import spec_for

    spec = spec_for(model)
    a = second_moments(model, tok, spec, [1, 2], CORPUS, 20, 16)
    b = second_moments(model, tok, spec, [1, 2], CORPUS, 20, 16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    files = list((tmp_path / "home" / "stats").glob("*.safetensors"))
    assert len(files) == 2
    with torch.no_grad():  # editing the output projection of layer 1 changes layer 2's keys, not layer 1's
        model.model.layers[1].mlp.down_proj.weight.add_(0.1)
    c = second_moments(model, tok, spec, [1, 2], CORPUS, 20, 16)
    assert torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])
    assert len(list((tmp_path / "home" / "stats").glob("*.safetensors"))) == 3
    d = second_moments(model, tok, spec, [1], CORPUS, 10, 16)  # another sample count: another entry
    assert not torch.equal(c[1], d[1])


def test_subject_keys_shape():
    tok = make_tokenizer()
    model = tiny_llama(len(tok))
    from kedit.core.arch import spec_for

    keys = subject_keys(model, tok, spec_for(model), [1, 3], REQUESTS, ("{}", "a city . {}"))
    assert keys[1].shape == (2, 64) and keys[3].shape == (2, 64)


def test_presets_are_strict(tmp_path):
    model, tok, _ = build("memit")
    with pytest.raises(ConfigError, match="unknown key 'layerz'"):
        get_editor("memit").preset(model, {"layerz": [1]})
    with pytest.raises(ConfigError, match=r"solve\.mom2_weight: input should be a valid number, got 'big'"):
        get_editor("memit").preset(model, {"solve.mom2_weight": "big"})
    with pytest.raises(ConfigError, match="unknown key 'mom2_weight'"):  # the flat layout of before is refused
        get_editor("memit").preset(model, {"mom2_weight": 1.0})
    bad = tmp_path / "presets" / "llama.yaml"
    bad.parent.mkdir()
    bad.write_text("layers: [1]\ntargets:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"llama\.yaml: targets\.stepz: unknown key"):
        editing.hparams.load_preset(get_editor("memit").hparams_cls, tmp_path, "llama")


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        editing.register(editing.ROME)


@pytest.mark.parametrize("name, base", [("come-memit", "memit"), ("come-pmet", "pmet")])
def test_come_with_alpha_zero_equals_its_base_method(name, base):
    model_a, tok, come = build(name)
    come = get_editor(name)(model_a, tok, come.preset(model_a, OVERRIDES[name] | {"unlearning.alpha": 0.0}), CORPUS)
    model_b, _, plain = build(base)
    plain = get_editor(base)(model_b, tok, plain.preset(model_b, OVERRIDES[name]), CORPUS)
    da, db = come.edit(REQUESTS).weights, plain.edit(REQUESTS).weights
    assert da.parts.keys() == db.parts.keys()
    for k in da.parts:
        assert torch.allclose(da.parts[k].dense(), db.parts[k].dense(), atol=1e-6, rtol=1e-4)


def test_come_removes_the_outdated_direction_on_the_top_coordinates():
    from editing.come.come import conflict_free_target

    delta = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    outdated = torch.tensor([[2.0, 3.0, -1.0, 0.5]])  # common part (2, 0, 0, 0); specific (0, 3, -1, .5)
    z = conflict_free_target(delta, outdated, alpha=0.1, top_p=0.5)  # the 2 largest |specific|: coords 1, 2
    assert torch.allclose(z, torch.tensor([[1.0, -0.3, 0.1, 0.0]]))
    assert torch.equal(conflict_free_target(delta, outdated, 0.0, 0.5), delta)


def test_come_reports_what_its_unlearning_removed():
    """The diagnostics say how large δ′ came out and how much of δ the removal took: none at α = 0."""
    model, tok, come = build("come-memit")
    come.edit(REQUESTS)
    d = come.diagnostics
    assert len(d["removed_norm_ratio"]) == len(REQUESTS)
    assert all(0 < r < o for r, o in zip(d["removed_norm_ratio"], d["outdated_norm_ratio"]))  # α < 1 of part of δ′
    assert all(-1 <= c <= 1 for c in d["outdated_cosine"]) and all(s >= 1 for s in d["outdated_steps"])
    come.revert()
    none = get_editor("come-memit")(model, tok, come.preset(model, OVERRIDES["come-memit"] | {"unlearning.alpha": 0.0}), CORPUS)
    none.edit(REQUESTS)
    assert none.diagnostics["removed_norm_ratio"] == [0.0] * len(REQUESTS)


def test_come_reedit_unlearns_what_its_earlier_edit_installed(monkeypatch):
    """With unlearning.outdated: installed, a re-edit's δ′ is the target its fact's earlier edit set at the
    subject (the editor's state), not an optimization for a value the model already states."""
    import dataclasses

    import editing.come.come as come_module
    from editing.ids import slot_id

    seen = []
    removal = come_module.removal
    monkeypatch.setattr(come_module, "removal", lambda d, o, a, p: seen.append(o.clone()) or removal(d, o, a, p))
    model, tok, _ = build("come-memit")
    cls = get_editor("come-memit")
    come = cls(model, tok, cls.preset(model, OVERRIDES["come-memit"] | {"unlearning.outdated": "installed"}), CORPUS)
    come.edit(REQUESTS)
    assert come.diagnostics["outdated_installed"] == [0.0, 0.0] and min(come.diagnostics["outdated_steps"]) >= 1
    first = come.state_dict()
    row = {int(s): i for i, s in enumerate(first["installed_slot"])}
    a, b = row[slot_id(REQUESTS[0])], row[slot_id(REQUESTS[1])]
    assert first["installed"].shape == (2, model.config.hidden_size)

    reedit = dataclasses.replace(REQUESTS[0], target_new="berlin", target_true=REQUESTS[0].target_new)
    come.edit([reedit])
    assert come.diagnostics["outdated_installed"] == [1.0] and come.diagnostics["outdated_steps"] == [0.0]
    assert torch.equal(seen[-1], first["installed"][a : a + 1])  # δ′: what the first edit installed
    second = come.state_dict()
    assert torch.equal(second["installed_slot"], first["installed_slot"])  # the same fact keeps its row
    assert torch.equal(second["installed"][b], first["installed"][b])
    assert not torch.equal(second["installed"][a], first["installed"][a])  # it now sums both edits' targets

    fresh = cls(model, tok, come.hparams, CORPUS)
    fresh.load_state_dict(second)
    assert all(torch.equal(fresh.state_dict()[k], second[k]) for k in second)
    with pytest.raises(EditError, match="installed_slot"):
        fresh.load_state_dict({"installed": second["installed"]})
    come.revert()
    assert all(torch.equal(come.state_dict()[k], first[k]) for k in first)
    plain = cls(model, tok, cls.preset(model, OVERRIDES["come-memit"]), CORPUS)
    with pytest.raises(EditError, match="keeps no state"):  # the paper's δ′ keeps none
        plain.load_state_dict(second)


def test_come_needs_target_true():
    _, _, editor = build("come-memit")
    with pytest.raises(editing.EditError, match="target_true.*missing for: x"):
        editor.edit([EditRequest("x", "bob", "{} speaks", "german")])


def test_pmet_spreads_the_residual_with_a_square_root():
    _, _, editor = build("pmet")
    assert [round(editor.spread(i), 4) for i in range(2)] == [round(1 / 2**0.5, 4), 1.0]
    assert editor.target_path() == "model.layers.2.mlp.down_proj"


def test_auto_precision_is_bfloat16_only_where_its_matmuls_are_native(monkeypatch):
    from kedit.core.precision import low_precision

    model = tiny_llama(len(make_tokenizer()))
    assert low_precision("model", model) is None and low_precision(None, model) is None
    assert low_precision("bfloat16", model) is torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert low_precision("auto", model) is torch.bfloat16
    assert low_precision("auto", model.to(torch.bfloat16)) is None  # already low precision: the model itself
    assert low_precision("bfloat16", model) is None  # the model's own precision: no copy
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert low_precision("auto", model.float()) is None


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_frozen_copy_stops_as_the_first_edited_block_is_entered_and_hands_over_its_input(make):
    """``FrozenCopy.hidden``: the input of block ``first`` as the model's own forward computes it (the copy in
    float64 here, to compare), whether blocks return tuples (GPT-2) or tensors (Llama), and no block from
    ``first`` on runs in the copy."""
    from editing.hooks import capture, output_kind
    from editing.stem import LowPrecisionStem
    from kedit.core.arch import spec_for

    tok = make_tokenizer()
    model = make(len(tok))
    spec = spec_for(model)
    ids = torch.tensor([[5, 9, 11, 7, 3]])
    mask, pos = torch.ones_like(ids), torch.arange(5)[None]
    copy = LowPrecisionStem(model, spec, 2, torch.float64).fresh()
    ran = []
    for i in range(4):
        copy.module.get_submodule(spec.block(i)).register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    hidden, returns_tuple = copy.hidden(ids, mask, pos)
    with torch.no_grad(), capture(model, [spec.block(2)], "input") as seen, output_kind(model, spec.block(0)) as kind:
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
    assert ran == [0, 1] and hidden.dtype == torch.float32
    assert torch.allclose(hidden, seen[spec.block(2)], atol=1e-5)
    assert returns_tuple is kind["tuple"]


def tiny_gemma3(tok):
    """A two-layer Gemma 3 (a norm between each MLP and the residual) and its ArchSpec."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from kedit.core.arch import spec_for

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)  # fmt: skip
    model = Gemma3ForCausalLM(cfg).eval()
    return model, spec_for(model)


def test_a_residual_change_becomes_the_mlp_output_change_that_makes_it_behind_a_post_mlp_norm():
    """Gemma 3 puts a norm (gain g) between the MLP's output m and the residual: Δm = Δy ⊙ rms(m) / g moves the
    residual by Δy to first order, where writing Δy into m unscaled moves it by about g / rms(m) times more."""
    from editing.keys import read_at_subject, residual_to_mlp_output
    from kedit.core.arch import spec_for

    tok = make_tokenizer()
    model, spec = tiny_gemma3(tok)
    norm = model.get_submodule(f"{spec.block(1)}.{spec.mlp_post_norm}")
    with torch.no_grad():
        norm.weight.normal_(0.0, 3.0)  # a trained gain, far from 1
    reqs = [EditRequest("a", "alice", "{} speaks", "german"), EditRequest("b", "bob", "{} speaks", "french")]
    path = spec.module_path("mlp_out", 1)
    m = read_at_subject(model, tok, reqs, ("{}",), [path], "output")[path]  # (n, d)
    dy = 1e-3 * torch.randn_like(m)
    dm = residual_to_mlp_output(model, tok, spec, 1, reqs, dy)
    with torch.no_grad():
        moved = norm(m + dm) - norm(m)
        unscaled = norm(m + dy) - norm(m)
    # to first order: Δy less what the norm takes out along y (it keeps m / rms(m), u below, at unit RMS)
    with torch.no_grad():
        y = norm(m)
    gain = y / (m / (m.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt())  # (n, d): g
    u = y / gain
    expected = dy - y * (u * dy / gain).sum(-1, keepdim=True) / m.shape[-1]
    assert (moved - expected).norm() < 0.05 * dy.norm()
    assert unscaled.norm() > 3 * moved.norm()
    with torch.no_grad():
        norm.weight[:3] = -1.0  # Gemma's gain is 1 + weight: these coordinates are silenced (gemma-3-270m has such)
    dm = residual_to_mlp_output(model, tok, spec, 1, reqs, dy)
    assert torch.isfinite(dm).all() and not dm[:, :3].any()  # no change where none can pass, not an unbounded one
    llama = tiny_llama(len(tok))
    assert residual_to_mlp_output(llama, tok, spec_for(llama), 1, reqs, dy) is dy  # no norm there: the same change


def test_memit_steps_its_target_by_the_edited_layers_gains_where_a_norm_follows_the_mlp():
    tok = make_tokenizer()
    model, spec = tiny_gemma3(tok)
    with torch.no_grad():
        for layer in (0, 1):
            model.get_submodule(f"{spec.block(layer)}.{spec.mlp_post_norm}").weight.normal_(0.0, 3.0)
    over = {"layers": (0, 1), "targets.step_scale": "gain", **TINY}
    editor = get_editor("memit")(model, tok, get_editor("memit").preset(model, over), CORPUS)
    ((path, scale),) = editor.step_scale().items()
    weights = torch.stack([model.get_submodule(f"{spec.block(i)}.{spec.mlp_post_norm}").weight for i in (0, 1)])
    expected = (1.0 + weights.detach()).abs().mean(0)  # Gemma's gain is 1 + weight
    assert path == editor.target_path() and torch.allclose(scale, expected / expected.mean(), atol=1e-4)
    llama = trained_scale_llama(len(tok))
    plain = get_editor("memit")(
        llama, tok, get_editor("memit").preset(llama, OVERRIDES["memit"] | {"targets.step_scale": "gain"}), CORPUS
    )
    assert plain.step_scale() is None  # no norm after the MLP: every coordinate steps alike


def test_pmet_maps_its_top_mlp_change_through_the_top_norm_and_back_through_each_layers():
    """PMET's residual is a change of the top MLP's output m_top: on Gemma, layer l gets the change of its own MLP
    output that moves the residual as m_top's change does, Δm_l = Δm_top ⊙ (g_top / rms(m_top)) ⊙ (rms(m_l) / g_l)."""
    from editing.keys import read_at_subject

    tok = make_tokenizer()
    model, spec = tiny_gemma3(tok)
    with torch.no_grad():
        for layer in (0, 1):
            model.get_submodule(f"{spec.block(layer)}.{spec.mlp_post_norm}").weight.normal_(0.0, 3.0)
    editor = editor_class("pmet")(model, tok, editor_class("pmet").preset(model, {"layers": (0, 1), **TINY}), corpus=CORPUS)
    reqs = [EditRequest("a", "alice", "{} speaks", "german"), EditRequest("b", "bob", "{} speaks", "french")]

    def scale(layer):  # g / rms(m) at the subjects, (n, d), computed here from the norm itself
        path = spec.module_path("mlp_out", layer)
        m = read_at_subject(model, tok, reqs, ("{}",), [path], "output")[path]
        norm = model.get_submodule(f"{spec.block(layer)}.{spec.mlp_post_norm}")
        gain = norm(torch.ones(1, 32))[0] * (1.0 + norm.eps) ** 0.5
        return gain / (m.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()

    d_top = 1e-3 * torch.randn(2, 32)
    with torch.no_grad():
        expected = d_top * scale(1) / scale(0)  # the bottom layer: from the top's scale to its own
    assert torch.allclose(editor.at_layer(0, reqs, d_top), expected, rtol=1e-4, atol=1e-9)
    assert torch.allclose(editor.at_layer(1, reqs, d_top), d_top, rtol=1e-5, atol=1e-10)  # the top layer: itself
    llama = tiny_llama(len(tok))
    pmet = editor_class("pmet")(llama, tok, editor_class("pmet").preset(llama, {"layers": (0, 1), **TINY}), corpus=CORPUS)
    assert pmet.at_layer(0, reqs, d_top) is d_top  # no norm: the change as it is, on every layer


@pytest.mark.parametrize("template", ["{}", "the city . {}", "Q: {} A:", "Question: {}\nAnswer:"])
def test_the_subject_is_located_at_its_last_token_in_any_frame(template):
    """A frame with text after "{}" (BalancEdit's question frames) must not move the subject's position: the
    head is the text up to the subject's end, never the frame's closing words."""
    from editing.keys import locate

    tok = make_tokenizer()
    loc = locate(tok, REQUESTS, [template])
    for ids, pos, r in zip(loc.ids, loc.subject_pos, REQUESTS):
        assert tok.decode(ids[pos]).strip() == r.subject  # one token each in the test tokenizer
