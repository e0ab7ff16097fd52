"""The format registry: a name -> ``Format`` dict, filled by ``register_format`` (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kedit.core import registry

Convert = Callable[[Any, int], list[dict]]
Recognise = Callable[[Any], bool]


@dataclass(frozen=True)
class Format:
    """A research or feed format: ``convert(record, index)`` maps one raw record to canonical dicts;
    ``recognise(record)`` says whether a record looks like this format (None: never sniffed);
    the ``fallback`` format is chosen when no other recognises a record."""

    name: str
    convert: Convert
    recognise: Recognise | None = None
    fallback: bool = False


_FORMATS: dict[str, Format] = {}


def register_format(name: str, convert: Convert, recognise: Recognise | None = None, *, fallback: bool = False) -> Format:
    """Add a format; sniffing tries the formats in registration order. A name already taken raises ``ValueError``."""
    if name == "auto":
        raise ValueError("format 'auto' is already registered: the name is reserved for sniffing")
    if fallback and any(f.fallback for f in _FORMATS.values()):
        raise ValueError(f"format {name!r}: a fallback format is already registered")
    return registry.add(_FORMATS, name, Format(name, convert, recognise, fallback), "format")


def unregister_format(name: str) -> None:
    """Remove a format (for tests and plugins that register one for a while)."""
    del _FORMATS[name]


def get_format(name: str) -> Format | None:
    return _FORMATS.get(name)


def format_names() -> tuple[str, ...]:
    """``"auto"`` and the registered names, in registration order: the choices of a ``--format`` option."""
    return ("auto", *_FORMATS)


def sniff_format(record: Any) -> str:
    """The name of the first registered format that recognises ``record``, else the fallback format's."""
    fallback = None
    for fmt in _FORMATS.values():
        if fmt.recognise is not None and fmt.recognise(record):
            return fmt.name
        if fmt.fallback:
            fallback = fmt.name
    if fallback is None:
        raise LookupError("no format recognises the record and none is registered as the fallback")
    return fallback
