"""Where kedit keeps its caches: ``$KEDIT_HOME`` (default ``~/.cache/kedit``)."""

from __future__ import annotations

import hashlib
import os
import tempfile
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


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Write ``path`` whole or not at all: a unique temporary file beside it (``mkstemp``: created new, so a
    planted link is never followed), flushed to disk, then renamed over it. A reader, or a crash,
    never sees half a file. ``mode``: the file's permissions (0o600 for what only this user may read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def shared_data_dir() -> Path:
    """Public evaluation data: ``$KEDIT_DATA``, else ``../shared/data`` from the working directory
    (the project's layout: the data sit beside the repository, which commands run from)."""
    return Path(os.environ.get("KEDIT_DATA") or Path("..") / "shared" / "data")


def default_corpus() -> Path | None:
    """WikiText-2 from the shared data when present (text for key statistics); None: editors sample text from the model."""
    p = shared_data_dir() / "text" / "wikitext-2-raw.test.txt"
    return p if p.is_file() else None
