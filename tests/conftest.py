"""Tiny models and tokenizers built in the tests: no downloads, seconds on a CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the capital of france is paris london rome berlin madrid germany italy spain "
    "england city a an in located continent europe asia africa antarctica who leads "
    "company ceo alice bob carol dave eve speaks language french english german "
    "and was born river flows through country president"
).split()


def make_tokenizer(add_bos: bool = True, padding_side: str = "right", words=WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one token per word, so values can be computed by hand."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side=padding_side,
    )


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 4, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=init,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0, layers: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


class BigramLM(nn.Module):
    """logits[t] = table[token t]: P(next | prefix) depends on the last token only, so
    sequence probabilities are products of table entries that a test can compute by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.config = SimpleNamespace(model_type="bigram")

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def tok_nobos():
    return make_tokenizer(add_bos=False)
