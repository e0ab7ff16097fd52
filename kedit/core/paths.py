"""Where kedit keeps its caches: ``$KEDIT_HOME`` (default ``~/.cache/kedit``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def kedit_home() -> Path:
    """Root of kedit's caches; read from the environment on every call, never at import."""
    return Path(os.environ.get("KEDIT_HOME") or Path.home() / ".cache" / "kedit").expanduser()


def models_dir() -> Path:
    return kedit_home() / "models"


def project_data_dir() -> Path:
    """The project's own data files (``data/`` at the repository root)."""
    return Path(__file__).resolve().parents[2] / "data"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
