"""A trained MEND network on disk: ``network.safetensors`` and ``network.json`` (its config, the base model's
fingerprint it was trained for, its hparams and data hashes, the tensors' sha256 and its own).

Loading checks, before any tensor is read into a network: the manifest's own hash, the tensors' sha256,
the base fingerprint, and then that every tensor has the shape the config gives and is finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from editing.patches import PatchIntegrityError
from editing.patches.base import load_tensors, save_tensors

from .network import HyperNet

FORMAT = "kedit-mend-network/2"  # /1 listed the weights as a mapping, read back in another order
TENSORS = "network.safetensors"
MANIFEST = "network.json"


def save_network(net: HyperNet, directory: str | Path, base_fingerprint: str, info: dict[str, Any]) -> Path:
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    manifest = {"format": FORMAT, "config": net.config, "base_fingerprint": base_fingerprint, **info}
    save_tensors(Path(directory), TENSORS, MANIFEST, manifest, tensors)
    return Path(directory) / MANIFEST


def load_network(directory: str | Path, base_fingerprint: str) -> tuple[HyperNet, dict[str, Any]]:
    """The network saved in ``directory``, refused unless it was trained for ``base_fingerprint`` and is intact."""
    directory = Path(directory)
    try:
        manifest, tensors = load_tensors(directory, TENSORS, MANIFEST, FORMAT)
    except PatchIntegrityError:
        raise
    except Exception as e:  # hashes that match a file safetensors cannot parse (a forged manifest)
        raise PatchIntegrityError(f"{directory / TENSORS}: cannot be read ({e})") from None
    have = manifest.get("base_fingerprint")
    if have != base_fingerprint:
        raise PatchIntegrityError(
            f"{directory / MANIFEST}: trained for base weights {str(have)[:12]}, not {base_fingerprint[:12]}: "
            "train a network for this model (kedit train mend --model MODEL)"
        )
    try:
        net = HyperNet.from_config(manifest["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise PatchIntegrityError(f"{directory / MANIFEST}: bad network config ({e})") from None
    want = net.state_dict()
    if set(tensors) != set(want):
        raise PatchIntegrityError(
            f"{directory / TENSORS}: tensors {sorted(set(tensors) ^ set(want))[:3]} do not match the config"
        )
    for k, v in tensors.items():
        if v.shape != want[k].shape:
            raise PatchIntegrityError(
                f"{directory / TENSORS}: {k} has shape {tuple(v.shape)}, the config needs {tuple(want[k].shape)}"
            )
        if not torch.isfinite(v).all():
            raise PatchIntegrityError(f"{directory / TENSORS}: {k} holds NaN or infinite values")
    net.load_state_dict(tensors)
    return net.eval(), manifest
