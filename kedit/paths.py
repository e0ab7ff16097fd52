"""Where kedit keeps its caches: ``$KEDIT_HOME`` (default ``~/.cache/kedit``)."""

from __future__ import annotations

import os
from pathlib import Path


def kedit_home() -> Path:
    """Root of kedit's caches; read from the environment on every call, never at import."""
    return Path(os.environ.get("KEDIT_HOME") or Path.home() / ".cache" / "kedit").expanduser()


def models_dir() -> Path:
    return kedit_home() / "models"


def project_data_dir() -> Path:
    """The project's own data files (``data/`` at the repository root)."""
    return Path(__file__).resolve().parents[1] / "data"
