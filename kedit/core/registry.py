"""What every registry in kedit does (editors, patch kinds, module types, gates, feed formats):
a plain dict filled by explicit registration, where a taken name raises and a lookup of an
unknown name lists what is there."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def add(registry: dict[str, T], name: str, entry: T, what: str) -> T:
    """Register ``entry`` under ``name``; a name already taken raises ``ValueError`` naming the holder."""
    if name in registry:
        holder = getattr(registry[name], "__module__", repr(registry[name]))
        raise ValueError(f"{what} {name!r} is already registered ({holder})")
    registry[name] = entry
    return entry


def lookup(registry: dict[str, T], name: str, what: str, error: type[Exception] = KeyError) -> T:
    """The entry under ``name``, or ``error`` listing the registered names."""
    try:
        return registry[name]
    except KeyError:
        raise error(f"unknown {what} {name!r}; registered: {', '.join(sorted(registry)) or 'none'}") from None
