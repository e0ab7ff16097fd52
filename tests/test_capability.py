"""Capability checks through lm-eval on tiny in-memory models: tasks built once, weights edited in place."""

from __future__ import annotations

import gc
import json
import math
import weakref

import pytest
import torch
from conftest import tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from evaluation.capability import CapabilityError, CapabilitySuite, project_tasks_dir

MC_KEYS = {"kedit_mc/acc", "kedit_mc/acc_norm"}
PPL_KEYS = {"kedit_ppl/word_perplexity", "kedit_ppl/byte_perplexity", "kedit_ppl/bits_per_byte"}


def byte_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """One token per byte: lm-eval scores arbitrary English text, which a word-level test vocabulary cannot encode."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>" if pad else None
    )


@pytest.fixture(scope="module")
def btok():
    return byte_tokenizer()


@pytest.fixture
def model(btok):
    return tiny_llama(len(btok), layers=2, init=0.2)


def test_project_task_files_are_well_formed():
    mc = [json.loads(line) for line in (project_tasks_dir() / "kedit_mc.jsonl").read_text().splitlines()]
    ppl = [json.loads(line) for line in (project_tasks_dir() / "kedit_ppl.jsonl").read_text().splitlines()]
    assert len(mc) == 60 and all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in mc)
    assert len({d["question"] for d in mc}) == 60
    assert len({d["answer"] for d in mc}) == 4  # the right answer is not always in one position
    assert len(ppl) == 20 and all(80 <= len(d["text"].split()) <= 150 for d in ppl)


def test_project_tasks_load_from_any_cwd_and_respect_limit(tmp_path, monkeypatch, model, btok):
    monkeypatch.chdir(tmp_path)  # lm-eval would resolve the YAMLs' relative data_files against this
    suite = CapabilitySuite(["kedit_mc", "kedit_ppl"], limit=6, batch_size=4)
    r = suite.evaluate(model, btok)
    assert set(r.values) == MC_KEYS | PPL_KEYS == set(r.higher_is_better)
    assert r.n_docs == {"kedit_mc": 6, "kedit_ppl": 6}
    assert all(0.0 <= r.values[k] <= 1.0 for k in MC_KEYS)
    assert all(r.higher_is_better[k] for k in MC_KEYS) and not any(r.higher_is_better[k] for k in PPL_KEYS)
    assert r.values["kedit_ppl/word_perplexity"] > r.values["kedit_ppl/byte_perplexity"] > 1.0
    # both come from the same summed log-likelihood over the same bytes
    assert r.values["kedit_ppl/bits_per_byte"] == pytest.approx(math.log2(r.values["kedit_ppl/byte_perplexity"]))
    assert r.seconds > 0

    # every row was loaded; the limit, not the data, cut the documents scored
    assert {name: len(task.eval_docs) for name, task in suite._loaded["tasks"].items()} == {"kedit_mc": 60, "kedit_ppl": 20}


def test_repeated_evaluate_rebuilds_requests_and_repeats_values(model, btok):
    suite = CapabilitySuite(["kedit_mc", "kedit_ppl"], limit=3, batch_size=8)
    first = suite.evaluate(model, btok)
    kept = suite._tok
    second = suite.evaluate(model, btok)
    assert second.values == first.values and second.n_docs == first.n_docs
    assert suite._tok is kept and kept[0] is btok and kept[1] is not btok  # one copy of the caller's tokenizer
    other = tiny_llama(len(btok), seed=1, layers=2, init=0.2)
    suite.evaluate(other, btok)
    gone = weakref.ref(other)
    del other
    gc.collect()
    assert gone() is None  # the suite keeps no model alive between evaluations (the gates' copies are let go)
    # requests are rebuilt per call, not appended: 4 choices x 3 documents, each answered once
    instances = suite._loaded["tasks"]["kedit_mc"].instances
    assert len(instances) == 12 and all(len(i.resps) == 1 for i in instances)


def test_lm_eval_draws_no_progress_bars_of_its_own(model, btok, capsys):
    suite = CapabilitySuite(["kedit_mc", "kedit_ppl"], limit=2, batch_size=8)
    suite.evaluate(model, btok)
    err = capsys.readouterr().err
    assert "Running loglikelihood requests" not in err and "it/s]" not in err, err[-500:]
    from lm_eval.api import task

    assert not task.tqdm(range(1)).disable  # lm-eval's own tqdm is put back afterwards


def test_in_place_edit_is_seen(model, btok):
    suite = CapabilitySuite(["kedit_ppl"], limit=2, batch_size=8)
    before = suite.evaluate(model, btok).values
    original = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    after = suite.evaluate(model, btok).values
    assert abs(after["kedit_ppl/byte_perplexity"] - before["kedit_ppl/byte_perplexity"]) > 1e-3
    with torch.no_grad():
        model.lm_head.weight.copy_(original)
    assert suite.evaluate(model, btok).values == pytest.approx(before)

    other = tiny_llama(len(btok), seed=1, layers=2, init=0.2)
    assert suite.evaluate(other, btok).values != pytest.approx(before)  # a new model object is scored as itself


def test_callers_model_and_tokenizer_are_left_as_they_were(model):
    tok = byte_tokenizer(pad=False)
    model.train()
    model.config.tie_word_embeddings = True  # as if an edit had untied the LM head of a tied model
    suite = CapabilitySuite(["kedit_ppl"], limit=1)
    suite.evaluate(model, tok)
    assert tok.pad_token is None  # HFLM would set one on the tokenizer it is given
    assert model.training
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # HFLM's tie_weights() would re-tie them
    assert "tie_weights" not in vars(model)
    assert suite._wrapper(model, tok).model is model  # wrapped by reference, not copied


def test_unknown_task_is_one_clear_line(tmp_path):
    with pytest.raises(CapabilityError, match="no_such_task_xyz") as err:
        CapabilitySuite(["kedit_mc", "no_such_task_xyz"])
    assert "\n" not in str(err.value)
    with pytest.raises(CapabilityError, match="not found"):
        CapabilitySuite([str(tmp_path / "missing.yaml")])
    with pytest.raises(CapabilityError):
        CapabilitySuite([])


def test_task_given_as_yaml_path(tmp_path, monkeypatch, model, btok):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = ["The river runs to the sea.", "Bread is baked in an oven.", "Bees make honey in the hive."]
    (tasks / "tiny.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tasks / "tiny.yaml").write_text(
        "task: my_tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: tiny.jsonl\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
    )
    monkeypatch.chdir(tmp_path)
    r = CapabilitySuite([str(tasks / "tiny.yaml"), "kedit_mc"], limit=2).evaluate(model, btok)
    assert set(r.values) == {"my_tiny_ppl/byte_perplexity"} | MC_KEYS
    assert r.n_docs == {"my_tiny_ppl": 2, "kedit_mc": 2}
    assert r.values["my_tiny_ppl/byte_perplexity"] > 1.0


def test_chosen_documents_score_as_the_same_documents_of_a_full_run(model, btok):
    """A sampled check compares the same documents on two models: lm-eval run on chosen documents gives what
    ``aggregate`` makes of a full run's per-document values for them (accuracy and weighted perplexities)."""
    suite = CapabilitySuite(["kedit_mc", "kedit_ppl"], limit=6, batch_size=8)
    assert suite.doc_ids() == {"kedit_mc": list(range(6)), "kedit_ppl": list(range(6))}
    full = suite.evaluate(model, btok)
    assert {k: sorted(v) for k, v in full.docs.items()} == {k: list(range(6)) for k in MC_KEYS | PPL_KEYS}
    ids = {"kedit_mc": [1, 4, 5], "kedit_ppl": [0, 3]}
    part = suite.evaluate(model, btok, docs=ids)
    assert part.n_docs == {"kedit_mc": 3, "kedit_ppl": 2}
    expected = suite.aggregate(full.docs, ids)
    assert set(part.values) == set(expected) == MC_KEYS | PPL_KEYS
    for key, value in part.values.items():
        assert value == pytest.approx(expected[key], rel=1e-6), key
    assert suite.aggregate(full.docs, suite.doc_ids()) == pytest.approx(full.values, rel=1e-9)
    only_mc = suite.evaluate(model, btok, docs={"kedit_mc": [2]})  # a task left out is not scored
    assert only_mc.n_docs == {"kedit_mc": 1} and set(only_mc.values) == MC_KEYS
    with pytest.raises(CapabilityError, match=r"no capability task \['kedit_qa'\]"):
        suite.evaluate(model, btok, docs={"kedit_qa": [0]})
