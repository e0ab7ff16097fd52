"""Stable 64-bit ids of facts, for editor state that must be tensors (saved with every version).

An id is a hash: the state names which fact or value an entry holds without holding its text.
"""

from __future__ import annotations

import hashlib

from kedit.core.facts import EditRequest
from kedit.core.facts.schema import normalize


def hash64(text: str) -> int:
    """A stable 64-bit id of a string."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little", signed=True)


def slot_id(r: EditRequest) -> int:
    """What the fact is about (its subject and prompt), whatever its value: a re-edit has its first edit's id."""
    return hash64("\x1f".join(r.slot))


def label_id(r: EditRequest) -> int:
    """The value the fact is edited to."""
    return hash64(normalize(r.target_new))
