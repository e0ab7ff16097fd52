"""The canonical feed schema (``FEED_FIELDS``): records pass through as they are. It is the fallback
format: a record no other format recognises is read as a feed record."""

from __future__ import annotations

from typing import Any

from kedit.core.facts.schema import FieldError

NAME = "feed"
FALLBACK = True
recognise = None  # never sniffed: chosen when no other format recognises a record


def convert(rec: Any, index: int) -> list[dict]:
    if not isinstance(rec, dict):
        raise FieldError("<record>", f"expected a JSON object, got {type(rec).__name__}")
    return [rec]
