import math

import pytest
import torch
from conftest import BigramLM, make_tokenizer, tiny_gpt2, tiny_llama

from kedit.core.lm import encode_pairs, encode_prompts, greedy_generate, score_targets

PROMPTS = ["the capital of france is", "alice speaks", "the river flows through the country of", "bob"]
TARGETS = ["paris", "french and english", "germany", "leads the company"]


def naive_scores(model, tok, prompt, target):
    """One unpadded forward per pair, written independently of the batched code."""
    p = tok(prompt)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    lp = sum(float(logp[len(p) - 1 + j, t[j]]) for j in range(len(t)))
    correct = sum(int(logp[len(p) - 1 + j].argmax() == t[j]) for j in range(len(t)))
    return lp, correct, len(t)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_one_at_a_time(make_model, add_bos, side):
    tok = make_tokenizer(add_bos=add_bos, padding_side=side)
    model = make_model(len(tok))
    s = score_targets(model, tok, PROMPTS, TARGETS, batch_size=3)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        lp, correct, n = naive_scores(model, tok, p, t)
        assert s.logprob[i].item() == pytest.approx(lp, abs=1e-4)
        assert s.n_correct[i].item() == correct
        assert s.n_tokens[i].item() == n


def test_bos_is_added_only_when_the_tokenizer_adds_it():
    with_bos = encode_pairs(make_tokenizer(add_bos=True), ["alice speaks"], ["french"])
    without = encode_pairs(make_tokenizer(add_bos=False), ["alice speaks"], ["french"])
    assert with_bos.ids[0][0] == 1 and with_bos.ids[0][1:] == without.ids[0]
    assert with_bos.n_prompt[0] == 3 and without.n_prompt[0] == 2
    assert with_bos.n_target == without.n_target == [1]


def test_bigram_log_probability_by_hand():
    tok = make_tokenizer(add_bos=True)
    v = len(tok)
    table = torch.zeros(v, v)
    france, is_, paris, london = (tok.convert_tokens_to_ids(w) for w in ["france", "is", "paris", "london"])
    # after "is": logits 2 for paris, 1 for london, 0 elsewhere
    table[is_, paris], table[is_, london] = 2.0, 1.0
    model = BigramLM(table)
    z = math.exp(2) + math.exp(1) + (v - 2)
    s = score_targets(model, tok, ["france is", "france is"], ["paris", "london"])
    assert s.logprob.tolist() == pytest.approx([2 - math.log(z), 1 - math.log(z)], abs=1e-5)
    assert s.n_correct.tolist() == [1, 0]
    assert s.prob[0].item() == pytest.approx(math.exp(2) / z, rel=1e-5)
    assert [a.tolist() for a in s.argmax] == [[paris], [paris]]
    del france


def test_empty_input_and_mismatched_lengths():
    tok = make_tokenizer()
    model = tiny_llama(len(tok))
    assert score_targets(model, tok, [], []).logprob.numel() == 0
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        score_targets(model, tok, ["a", "b"], ["c"])


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("side", ["left", "right"])
def test_targets_sharing_a_prompt_are_packed_and_scored_independently(make_model, side):
    """Pairs with the same prompt share one packed row; each target must still see only the prompt."""
    tok = make_tokenizer(padding_side=side)
    model = make_model(len(tok), seed=1)
    prompts = ["the capital of france is"] * 3 + ["alice speaks"] * 2 + ["bob"]
    targets = ["paris", "london city", "rome and berlin", "french", "german and english", "leads"]
    s = score_targets(model, tok, prompts, targets, batch_size=2)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        lp, correct, n = naive_scores(model, tok, p, t)
        assert s.logprob[i].item() == pytest.approx(lp, abs=1e-4)
        assert (s.n_correct[i].item(), s.n_tokens[i].item()) == (correct, n)


def test_bf16_model_scores_close_to_fp32():
    tok = make_tokenizer()
    model = tiny_llama(len(tok), seed=2)
    ref = score_targets(model, tok, PROMPTS, TARGETS).logprob
    half = score_targets(model.to(torch.bfloat16), tok, PROMPTS, TARGETS).logprob
    assert torch.allclose(ref, half, atol=0.15)


class SequenceProbe(torch.nn.Module):
    """A router that decides on sequences (kedit.core.routing.SequenceRouter): records the layout it is given."""

    def __init__(self):
        super().__init__()
        self.layout, self.seen = None, []

    def routed(self, x):
        return torch.zeros(x.shape[:-1], dtype=torch.bool)

    def n_entries(self):
        return 0


def test_packed_scoring_and_decoding_tell_a_sequence_router_where_each_sequence_is():
    tok = make_tokenizer()
    model = tiny_llama(len(tok))
    probe = SequenceProbe()
    model.add_module("probe", probe)
    model.model.layers[0].register_forward_hook(lambda *_: probe.seen.append(probe.layout))
    score_targets(model, tok, ["the capital of france is"] * 2, ["paris", "rome is"])
    (layout,) = probe.seen
    visible = layout.visible[0]  # one packed row: prompt (5 tokens, no BOS here), "paris", "rome is"
    n = len(encode_prompts(tok, ["the capital of france is"])[0])
    assert visible.shape == (n + 3, n + 3)
    assert bool(visible[n + 2, :n].all()) and bool(visible[n + 2, n + 1 :].all()) and not bool(visible[n + 2, n])
    assert probe.layout is None  # the layout holds for the forwards inside only
    probe.seen.clear()
    short, long = (len(x) for x in encode_prompts(tok, ["alice speaks", "the capital of france is"]))
    greedy_generate(model, tok, ["the capital of france is", "alice speaks"], max_new_tokens=3)
    assert len(probe.seen) == 3 and len({id(x) for x in probe.seen}) == 1  # one running mean: the prefill, then two steps
    left_padded = [[0] * (long - short) + [1] * short, [1] * long]  # sorted by length
    assert short < long and probe.seen[0].mask.tolist() == left_padded and probe.layout is None


def test_the_sequences_layout_is_built_only_for_a_model_that_holds_a_sequence_router():
    from kedit.core.routing import sequences

    model = tiny_llama(len(make_tokenizer()))
    made = []
    with sequences(model, lambda: made.append(1) or torch.ones(1, 2, 2, dtype=torch.bool)):
        pass
    assert made == []  # no router: the (B, T, T) tensor is never made
    model.add_module("a", SequenceProbe())
    model.add_module("b", SequenceProbe())
    with sequences(model, lambda: made.append(1) or torch.ones(1, 2, 2, dtype=torch.bool)):
        assert model.a.layout is not model.b.layout and model.a.layout.visible is model.b.layout.visible
    assert made == [1]  # once, shared by both routers
