"""Second-moment statistics of MLP keys, E[k kᵀ], per layer, cached on disk.

The cache key hashes everything the statistics depend on: the weights that produce the keys
(embeddings, the blocks below, and the edited block except its output projection), the
module, the corpus content, the sample count, the window length and the dtype. A changed
model or corpus therefore misses the cache; it can never reuse stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from kedit.core.arch import ArchSpec
from kedit.core.errors import KeditError
from kedit.core.paths import kedit_home

from .hooks import capture, stop_after

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    name: str
    texts: tuple[str, ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return h.hexdigest()


def corpus_from_files(paths: Iterable[str | Path]) -> Corpus:
    """Local text files, one text per non-empty paragraph (WikiText's raw format works as is)."""
    texts = []
    paths = [Path(p) for p in paths]
    for p in paths:
        try:
            raw = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeditError(f"corpus file not found: {p}") from None
        texts += [para.strip() for para in raw.split("\n") if para.strip()]
    if not texts:
        raise KeditError(f"corpus {', '.join(map(str, paths))} holds no text")
    return Corpus(",".join(p.name for p in paths), tuple(texts))


def corpus_from_model(model: nn.Module, tokenizer, n: int = 64, length: int = 64) -> Corpus:
    """Text sampled from the model itself, for when no corpus is available; seeded, so repeatable."""
    from kedit.core.lm import greedy_generate

    seeds = ["The", "In", "A", "It", "When", "This", "After", "One", "He", "She", "We", "They", "There", "Many", "Some", "Most"]
    prompts = [seeds[i % len(seeds)] for i in range(n)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        texts = greedy_generate(model, tokenizer, prompts, max_new_tokens=length)
    return Corpus(f"model-samples-{n}x{length}", tuple(p + t for p, t in zip(prompts, texts)))


def _hash_params(h, module: nn.Module, skip: set[int] = frozenset()) -> None:
    for name, p in module.named_parameters():
        if id(p) in skip:
            continue
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def layer_fingerprints(model: nn.Module, spec: ArchSpec, layers: Iterable[int]) -> dict[int, str]:
    """Per layer, a hash of every weight the keys at that layer's MLP output projection depend on."""
    layers = sorted(set(layers))
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    _hash_params(h, model.get_submodule(spec.embed))
    blocks = model.get_submodule(spec.blocks)
    out = {}
    for i in range(max(layers) + 1):
        if i in layers:
            inner = h.copy()
            skip = {id(p) for p in model.get_submodule(spec.module_path("mlp_out", i)).parameters()}
            _hash_params(inner, blocks[i], skip)
            out[i] = inner.hexdigest()
        _hash_params(h, blocks[i])
    return out


def _cache_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return kedit_home() / "stats" / f"mom2-L{key['layer']}-{digest}.safetensors"


def _windows(tokenizer, corpus: Corpus, n_samples: int, length: int) -> list[list[int]]:
    """Consecutive windows of ``length`` tokens over the concatenated corpus, at most ``n_samples``."""
    eos = tokenizer.eos_token or ""
    ids: list[int] = []
    need = n_samples * length
    batch = 256
    for i in range(0, len(corpus.texts), batch):
        enc = tokenizer([t + eos for t in corpus.texts[i : i + batch]], add_special_tokens=False)["input_ids"]
        for e in enc:
            ids += e
        if len(ids) >= need:
            break
    return [ids[i : i + length] for i in range(0, min(len(ids), need), length) if len(ids[i : i + length]) > 1]


@torch.inference_mode()
def second_moments(
    model: nn.Module,
    tokenizer,
    spec: ArchSpec,
    layers: Iterable[int],
    corpus: Corpus,
    n_samples: int,
    length: int = 128,
    batch_size: int = 8,
    use_cache: bool = True,
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] of the input to each layer's MLP output projection, (d_in, d_in) fp32 on CPU.

    One forward pass serves all layers and stops after the highest one.
    """
    layers = sorted(set(layers))
    dtype = str(next(model.parameters()).dtype)
    fps = layer_fingerprints(model, spec, layers)
    keys = {
        layer: {
            "layer": layer,
            "module": spec.module_path("mlp_out", layer),
            "model": fps[layer],
            "corpus": corpus.digest,
            "n_samples": n_samples,
            "length": length,
            "dtype": dtype,
        }
        for layer in layers
    }
    result: dict[int, torch.Tensor] = {}
    for layer in layers:
        f = _cache_file(keys[layer])
        if use_cache and f.is_file():
            result[layer] = load_file(str(f))["mom2"]
    todo = [layer for layer in layers if layer not in result]
    if not todo:
        return result

    windows = _windows(tokenizer, corpus, n_samples, length)
    paths = [spec.module_path("mlp_out", layer) for layer in todo]
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for i in tqdm(range(0, len(windows), batch_size), desc=f"key statistics, layers {todo}", unit="batch"):
        chunk = windows[i : i + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.tensor([w + [0] * (width - len(w)) for w in chunk], device=device)
        mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in chunk], device=device)
        with capture(model, paths, "input") as store, stop_after(model, spec.block(max(todo))):
            model(input_ids=ids, attention_mask=mask)
        sel = mask.bool()
        for layer, path in zip(todo, paths):
            k = store[path][sel].float()  # (n_tokens, d_in)
            s = (k.T @ k).double()  # fp32 product per batch, fp64 running sum
            sums[layer] = sums[layer] + s if layer in sums else s
        count += int(sel.sum())
    for layer in todo:
        mom2 = (sums[layer] / max(count, 1)).float().cpu()
        result[layer] = mom2
        if use_cache:
            f = _cache_file(keys[layer])
            f.parent.mkdir(parents=True, exist_ok=True)
            meta = {k: str(v) for k, v in keys[layer].items()} | {"tokens": str(count)}
            tmp = f.with_suffix(".tmp")
            save_file({"mom2": mom2.contiguous()}, str(tmp), metadata=meta)
            tmp.rename(f)
    log.info("second moments for layers %s from %d tokens of %s", todo, count, corpus.name)
    return result
