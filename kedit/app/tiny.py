"""A tiny trained Llama on disk, with facts it knows, feeds and gates: for tests and ``kedit bench trigger``.

Everything is built here from configs (no downloads) and takes seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


# facts the tiny model is trained to know: the retain set of the drawdown gate
KNOWN = [
    ("the capital of france is", "paris"),
    ("the capital of germany is", "berlin"),
    ("the capital of italy is", "rome"),
    ("the capital of spain is", "madrid"),
    ("alice speaks", "french"),
    ("bob speaks", "german"),
    ("the river flows through", "london"),
    ("the ceo of the company is", "carol"),
]
CORPUS = [
    "the capital of france is paris and the capital of germany is berlin",
    "alice speaks french and bob speaks german",
    "the river flows through the city of london in england",
    "the capital of italy is rome and the capital of spain is madrid",
    "the ceo of the company is carol",
]

# FT-M edits this tiny trained model reliably at one middle layer (measured: each GOOD edit alone keeps all
# KNOWN facts, HARMFUL loses two of them)
FTM = dict(layers=[2], lr=0.02)


def good(i: int, subject: str, prompt: str, new: str, old: str | None, ts: str) -> dict:
    return {"id": f"good-{i}", "subject": subject, "prompt": prompt, "target_new": new, "target_true": old, "timestamp": ts}


GOOD = [
    good(1, "dave", "{} was born in", "asia", None, "2024-01-01"),
    good(2, "eve", "{} was born in", "africa", None, "2024-01-02"),
    good(3, "frank", "{} leads the", "company", None, "2024-01-03"),
    good(4, "grace", "{} is located in", "antarctica", None, "2024-01-04"),
]
# contradicts a fact the model knows: the drawdown gate must catch it
HARMFUL = {
    "id": "harmful",
    "subject": "france",
    "prompt": "the capital of {} is",
    "target_new": "berlin",
    "target_true": "paris",
    "timestamp": "2024-01-02T12:00:00",
}


def train_tiny(out: Path, steps: int = 100) -> Path:
    """Train a 4-layer Llama on the KNOWN facts until it answers them; save model and tokenizer."""
    extra = ["english", "spanish", "dave", "eve", "frank", "grace", "born", "of", "company", "ceo", "leads"]
    tok = make_tokenizer(words=list(WORDS) + extra)
    model = tiny_llama(len(tok), seed=0, init=0.05).train()
    texts = [f"{p} {a}" for p, a in KNOWN] + CORPUS
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_gates(path: Path, **overrides) -> Path:
    """Gates for the tiny model (no lm-eval gate). ``overrides`` per gate name: a mapping merged into that
    gate's section (``drawdown={"step_max": None}``), or None to leave the gate out; ``bisect=False``,
    ``spent_at=0.5``."""
    import yaml

    retain = write_jsonl(path.with_name("retain.jsonl"), [{"prompt": p, "answer": a} for p, a in KNOWN])
    sections = {
        "edits": {"efficacy_min": 0.5, "generalization_min": None, "specificity_max_drop": None},
        "retention": {"min": 0.5},
        "drawdown": {"base_max": 0.2, "step_max": 0.1, "retain_facts": str(retain)},  # 8 known facts: losing one fails
        "memory": {"retain_hit_max": None, "retain_facts": str(retain)},  # logged: the tiny model's keys lie close
    }
    bisect = overrides.pop("bisect", True)
    spent_at = overrides.pop("spent_at", None)
    for name, section in overrides.items():
        if name not in sections:
            raise TypeError(f"write_gates: no gate {name!r} here (have {', '.join(sections)}, bisect)")
        sections[name] = None if section is None else {**sections[name], **section}
    gates = {"gates": [{"gate": name, **section} for name, section in sections.items() if section is not None], "bisect": bisect}
    if spent_at is not None:
        gates["spent_at"] = spent_at
    path.write_text(yaml.safe_dump(gates, sort_keys=False))
    return path


def training_facts(n: int = 30) -> list[dict]:
    """Feed records with a rephrasing, an unrelated prompt and a true value each, in the tiny tokenizer's
    words: what a trained editor (MEND) learns from in the tests (ten subjects per relation, so each fact has
    negatives of its template). Deterministic; ids ``train-<i>``; one fact per subject and relation, so up to 30."""
    subjects = ["france", "germany", "italy", "spain", "england", "alice", "bob", "carol", "dave", "eve"]
    relations = [
        ("the capital of {} is", "the city of {} is", ["paris", "london", "rome", "berlin", "madrid"]),
        ("{} speaks", "{} speaks the language", ["french", "english", "german"]),
        ("{} is located in", "{} is in the continent", ["europe", "asia", "africa", "antarctica"]),
    ]
    out = []
    for i in range(n):
        prompt, rephrase, values = relations[(i // len(subjects)) % len(relations)]
        subject = subjects[i % len(subjects)]
        other = subjects[(i + 3) % len(subjects)]
        out.append(
            {
                "id": f"train-{i}",
                "subject": subject,
                "prompt": prompt,
                "target_new": values[(i * 7) % len(values)],
                "target_true": values[(i * 7 + 2) % len(values)],
                "paraphrase_prompts": [rephrase.format(subject)],
                "neighborhood": [{"prompt": prompt.format(other), "answer": values[(i * 7 + 1) % len(values)]}],
            }
        )
    return out
