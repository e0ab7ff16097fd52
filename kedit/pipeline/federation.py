"""A stream as a federation's client (FLEKE): the target vectors its editor optimized for an accepted version
are uploaded to the MKV store exactly once, as that version's slot.

After an attempt's edit the vectors wait on the client's own disk (``<work_dir>/mkv-pending/<attempt run>``);
once the attempt is a version they are uploaded and the file removed; a rolled-back attempt's are removed.
A stream killed between its version and the upload finds the file at its next start and uploads it then (an
upload of the same vectors again is a no-op, so a kill after the upload but before the removal is harmless).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file

from kedit.store.tracking import T_ATTEMPT_RUN

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

PENDING = "mkv-pending"


def _exchange(session: Session):
    return getattr(session.editor, "exchange", None) if session.cfg.mkv else None


def _pending(session: Session) -> Path:
    return Path(session.cfg.work_dir) / PENDING / session.registered


def hold(session: Session, run_id: str) -> int:
    """Keep what the attempt's edit optimized until the attempt is decided; returns how many vectors."""
    exchange = _exchange(session)
    offered = exchange.take() if exchange else None
    if offered is None:
        return 0
    directory = _pending(session)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"keys": offered[0].contiguous(), "z": offered[1].contiguous()}, str(directory / f"{run_id}.safetensors"))
    return offered[0].shape[0]


def metrics(session: Session, offered: int) -> dict[str, float]:
    """What the attempt's edit did with the store: vectors reused, vectors offered, uploads refused so far (per reason)."""
    exchange = _exchange(session)
    if exchange is None:
        return {}
    reused = sum(session.editor.diagnostics.get("target_reused", ()))
    out = {"mkv_reused": float(reused), "mkv_offered": float(offered)}
    return out | {f"mkv_refused_{why}": float(n) for why, n in sorted(exchange.refused.items())}


def drop(session: Session, run_id: str) -> None:
    """A rolled-back attempt's vectors: never uploaded."""
    if _exchange(session) is not None:
        (_pending(session) / f"{run_id}.safetensors").unlink(missing_ok=True)


def publish(session: Session, on_chain: set[str]) -> int:
    """Upload every held file whose attempt is one of the versions ``on_chain`` (production's chain; its slot:
    the version number) and remove the others (rolled back, or a version a crash left off the chain);
    returns the number of vectors uploaded."""
    exchange = _exchange(session)
    directory = _pending(session)
    files = sorted(directory.glob("*.safetensors")) if exchange and directory.is_dir() else []
    if not files:
        return 0
    versions = session.tracker.versions(session.registered)
    version_of = {v.tags.get(T_ATTEMPT_RUN): v.version for v in versions if v.version in on_chain}
    uploaded = 0
    for f in files:
        version = version_of.get(f.stem)
        if version is not None:
            data = load_file(str(f))
            exchange.upload_vectors(int(version), data["keys"], data["z"])
            uploaded += data["keys"].shape[0]
            log.info("uploaded %d target vectors as %s's slot %s", data["keys"].shape[0], exchange.client.name, version)
        f.unlink()
    return uploaded
