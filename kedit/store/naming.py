"""What a base model is called in the store: its registered model name and its fingerprint."""

from __future__ import annotations

import re
from pathlib import Path

from kedit.core.models import KNOWN_MODELS, load_model, resolve
from kedit.store.versions import model_fingerprint


def registered_name(model_ref: str, fingerprint: str) -> str:
    """``kedit-<known name>``, or ``kedit-<directory name>-<fingerprint[:8]>`` for any other checkpoint."""
    if model_ref in KNOWN_MODELS:
        return f"kedit-{model_ref}"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_ref.rstrip("/")).name).strip("-") or "model"
    return f"kedit-{slug}-{fingerprint[:8]}"


def identify(model_ref: str, model=None) -> tuple[str, str]:
    """(registered model name, base fingerprint) of a base model reference; ``model``, when loaded
    already, is hashed where the reference has no weight files (a hub id) instead of loading it again."""
    path = resolve(model_ref)
    try:
        fp = model_fingerprint(path, model)
    except ValueError:  # a hub id and no model at hand: hash the loaded weights
        fp = model_fingerprint(None, load_model(model_ref, "cpu")[0])
    return registered_name(model_ref, fp), fp


def for_client(registered: str, client: str | None) -> str:
    """A federation client's own registered model of the base (``<registered>@<client>``), or the base's when none:
    its versions, production, feed ledger and quarantine are its own."""
    from kedit.store.mkv import check_client_name

    return f"{registered}@{check_client_name(client)}" if client else registered
