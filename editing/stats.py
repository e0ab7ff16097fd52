"""Second-moment statistics of MLP keys, E[k kᵀ], per layer, cached on disk.

The cache key hashes everything the statistics depend on: the weights that produce the keys
(embeddings, the blocks below, and the edited block except its output projection), the
module, the corpus content, the sample count, the window length and the dtype. A changed
model or corpus therefore misses the cache; it can never reuse stale statistics.

The cache folder may be synced through the artifact store, so a file is trusted only after a check:
its header (safetensors string metadata, never pickle) repeats every key field, the tensor's shape
and dtype, and the sha256 of the tensor's bytes. A file that fails any check is renamed aside, never
deleted, and its layer recomputed. Files are written under a unique temporary name and renamed into
place, and statistics for one cache file are computed under an OS lock, so two streams on one base
compute them once: the second waits, then loads what the first wrote.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes
from torch import nn
from tqdm import tqdm

from kedit.core.arch import ArchSpec
from kedit.core.errors import KeditError
from kedit.core.paths import kedit_home, write_atomic

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


FORMAT = "kedit-mom2/1"  # header tag; a file without it (or with another) is refused


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _cache_file(key: dict) -> Path:
    return kedit_home() / "stats" / f"mom2-L{key['layer']}-{_digest(key)}.safetensors"


def _lock_file(key: dict) -> Path:
    # beside the cache folder rather than in it: that folder is synced, its lock files mean nothing elsewhere
    return kedit_home() / "locks" / "stats" / f"mom2-L{key['layer']}-{_digest(key)}.lock"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``; it conflicts across processes and across threads (one open each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another process computes these statistics", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the lock file stays, removing it would race with a waiter


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().data).hexdigest()  # hashes the buffer in place, no copy


def _header(key: dict, mom2: torch.Tensor, tokens: int) -> dict[str, str]:
    return {k: str(v) for k, v in key.items()} | {
        "format": FORMAT,
        "shape": json.dumps(list(mom2.shape)),
        "tensor_dtype": str(mom2.dtype),
        "tokens": str(tokens),
        "sha256": _tensor_sha256(mom2),
    }


def _check(meta: dict[str, str] | None, names: set[str], mom2: torch.Tensor | None, key: dict) -> str | None:
    """Why a cached file must be refused, or None when its header and tensor are what ``key`` expects."""
    meta = meta or {}
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')!r}, expected {FORMAT!r}"
    for k, v in key.items():
        if meta.get(k) != str(v):
            return f"header field {k} is {meta.get(k)!r}, expected {str(v)!r}"
    if names != {"mom2"} or mom2 is None:
        return f"tensors {sorted(names)}, expected ['mom2']"
    if mom2.dtype != torch.float32 or mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        return f"tensor {mom2.dtype} {list(mom2.shape)}, expected a square float32 matrix"
    if meta.get("shape") != json.dumps(list(mom2.shape)) or meta.get("tensor_dtype") != str(mom2.dtype):
        return f"tensor {mom2.dtype} {list(mom2.shape)}, header says {meta.get('tensor_dtype')} {meta.get('shape')}"
    if not meta.get("tokens", "").isdigit():
        return f"token count {meta.get('tokens')!r}"
    if not bool(torch.isfinite(mom2).all()):
        return "non-finite values"
    if meta.get("sha256") != _tensor_sha256(mom2):
        return "sha256 of the tensor does not match the header"
    return None


def _move_aside(path: Path, reason: str) -> None:
    bad = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}")
    try:
        os.rename(path, bad)
    except FileNotFoundError:
        return  # another process moved it first
    log.warning("statistics cache %s refused (%s); moved aside to %s and recomputed", path, reason, bad.name)


def _load_cached(path: Path, key: dict, move_bad: bool = True) -> torch.Tensor | None:
    """The (d, d) fp32 tensor of a cache file that passes every check; None if missing or bad.

    A bad file is renamed aside when ``move_bad``; callers pass it only under the file's lock, so a
    good file written meanwhile by another process is never the one moved.
    """
    try:
        # one open, so header and tensor come from the same file even if it is replaced meanwhile
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata(), set(f.keys())
            mom2 = f.get_tensor("mom2") if "mom2" in names else None
        reason = _check(meta, names, mom2, key)
    except FileNotFoundError:
        return None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = f"unreadable: {e}"
    if reason is None:
        return mom2
    if move_bad:
        _move_aside(path, reason)
    return None


def _save_cached(path: Path, key: dict, mom2: torch.Tensor, tokens: int) -> None:
    """Write under a unique temporary name in the cache folder, then rename: readers see whole files only."""
    mom2 = mom2.contiguous()
    write_atomic(path, save_bytes({"mom2": mom2}, metadata=_header(key, mom2, tokens)))


def windows(tokenizer, corpus: Corpus, n_samples: int, length: int) -> list[list[int]]:
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

    One forward pass serves all layers and stops after the highest one. With ``use_cache``, each layer is
    loaded from its checked cache file when one exists, else computed under that file's lock and written.
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
    if not use_cache:
        return _accumulate(model, tokenizer, spec, layers, corpus, n_samples, length, batch_size)[0]
    files = {layer: _cache_file(keys[layer]) for layer in layers}
    # lock-free first look: files only appear whole (os.replace), so a reader never sees a partial one
    result = {layer: t for layer in layers if (t := _load_cached(files[layer], keys[layer], move_bad=False)) is not None}
    missing = [layer for layer in layers if layer not in result]
    if not missing:
        return result
    with ExitStack() as stack:
        # one lock per missing file, taken in one global order so two callers never deadlock
        for layer in sorted(missing, key=lambda layer: files[layer].name):
            stack.enter_context(_file_lock(_lock_file(keys[layer])))
        # look again: another process may have written them while we waited; a bad file is moved aside here
        for layer in missing:
            t = _load_cached(files[layer], keys[layer])
            if t is not None:
                result[layer] = t
        todo = [layer for layer in missing if layer not in result]
        if todo:
            computed, count = _accumulate(model, tokenizer, spec, todo, corpus, n_samples, length, batch_size)
            for layer in todo:
                _save_cached(files[layer], keys[layer], computed[layer], count)
            result |= computed
    return {layer: result[layer] for layer in layers}


def _accumulate(
    model: nn.Module, tokenizer, spec: ArchSpec, todo: list[int], corpus: Corpus, n_samples: int, length: int, batch_size: int
) -> tuple[dict[int, torch.Tensor], int]:
    """E[k kᵀ] per layer in ``todo``, (d_in, d_in) fp32 on CPU, and the token count; one forward pass per batch."""
    rows = windows(tokenizer, corpus, n_samples, length)
    paths = [spec.module_path("mlp_out", layer) for layer in todo]
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for i in tqdm(range(0, len(rows), batch_size), desc=f"key statistics, layers {todo}", unit="batch"):
        chunk = rows[i : i + batch_size]
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
    log.info("second moments for layers %s from %d tokens of %s", todo, count, corpus.name)
    return {layer: (sums[layer] / max(count, 1)).float().cpu() for layer in todo}, count


def low_energy_projector(mom2: torch.Tensor, leak: float) -> torch.Tensor:
    """(d, d) projector onto the eigenvectors of second moments ``mom2`` (d, d) with the smallest eigenvalues, as
    many as together hold at most ``leak`` of its trace: an input drawn like the moments' keeps about that share
    of its squared norm there (AlphaEdit's null space, chosen by energy rather than by an absolute eigenvalue)."""
    if not 0.0 <= leak < 1.0:
        raise ValueError(f"leak {leak}: a share of the energy, in [0, 1)")
    ev, vec = torch.linalg.eigh(mom2.double())  # ascending
    ev = ev.clamp(min=0.0)
    low = vec[:, ev.cumsum(0) <= leak * ev.sum()]  # (d, m)
    return (low @ low.T).float()
