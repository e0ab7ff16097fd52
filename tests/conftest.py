"""Tiny models and tokenizers built in the tests: no downloads, seconds on a CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from kedit.app.tiny import WORDS, make_tokenizer, tiny_llama  # noqa: F401 - re-exported for the tests


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


@pytest.fixture
def bigram():
    """A bigram model whose next-token logits after a few words are set by hand: (tokenizer, model, vocab size).
    After "is": paris 2, london 1; after "in": london 3; after "of": berlin 1; after "paris": london 1; else 0."""
    tok = make_tokenizer()
    v = len(tok)
    i = tok.convert_tokens_to_ids
    table = torch.zeros(v, v)
    table[i("is"), i("paris")] = 2.0
    table[i("is"), i("london")] = 1.0
    table[i("in"), i("london")] = 3.0
    table[i("of"), i("berlin")] = 1.0
    table[i("paris"), i("london")] = 1.0
    return tok, BigramLM(table), v
