"""Steps of a long sequential benchmark run kept on disk, so that a stopped run resumes where it stopped.

After each batch the run writes ``step-NNNNN/``: the batch's patches (hashed, as a version stores them), the
editor's state (safetensors, hashed) and what the run counted so far. A rerun with the same settings applies
the saved patches to the fresh base model in order (bit for bit the edited model, as rebuilding a chain is),
loads the last state into the editor and goes on with the next batch; other settings start afresh. A step
directory appears whole or not at all (written beside, then renamed).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from editing.patches import PatchIntegrityError, PatchSet
from kedit.core.paths import sha256_file

log = logging.getLogger(__name__)

SETTINGS = "settings.json"
STEP = "step.json"
STATE = "state.safetensors"


def open_steps(root: Path, settings: dict[str, Any]) -> list[Path]:
    """The saved steps under ``root`` if they were made with ``settings``, oldest first; else none (cleared)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / SETTINGS
    if path.is_file() and json.loads(path.read_text()) == settings:
        return sorted(root.glob("step-*"))
    if path.is_file():
        log.warning("%s: saved steps were made with other settings; starting afresh", root)
    for old in root.glob("*step-*"):
        shutil.rmtree(old)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True))
    return []


def save_step(root: Path, i: int, patches: PatchSet, state: dict, counts: dict[str, Any]) -> None:
    """Step ``i``: its patches, the editor's state after it, and ``counts`` (JSON; ``samples``: this step's own)."""
    tmp, final = root / f".step-{i:05d}", root / f"step-{i:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = patches.save(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / STATE))
    info = {"index": index, "state_sha256": sha256_file(tmp / STATE), **counts}
    (tmp / STEP).write_text(json.dumps(info))
    tmp.rename(final)


def replay(steps: list[Path], model, editor) -> dict[str, Any]:
    """Apply the saved steps' patches to ``model`` (the base) in order and give ``editor`` the last state;
    returns the last step's counts. Hashes are checked before anything is applied."""
    infos = [json.loads((d / STEP).read_text()) for d in steps]
    loaded = [PatchSet.load(d, info["index"]) for d, info in zip(steps, infos)]  # raises on a bad hash
    last = steps[-1] / STATE
    if sha256_file(last) != infos[-1]["state_sha256"]:
        raise PatchIntegrityError(f"{last}: sha256 does not match {steps[-1] / STEP}")
    for patches in loaded:
        patches.apply(model)
    editor.load_state_dict(load_file(str(last)))
    log.info("resumed after %d saved steps", len(steps))
    counts = {k: v for k, v in infos[-1].items() if k not in ("index", "state_sha256", "samples")}
    return counts | {"samples": {t for info in infos for t in info.get("samples", ())}}
