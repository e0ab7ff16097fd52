"""Facts that change again: a request whose slot (subject, prompt) a chain already wrote is a re-edit.

A chain's *live* facts are, per slot, the last request that held when it was applied (``live_facts``).
A new request for a live slot is resolved against it (``resolve``):

- the same value again (case and spacing folded) is a **no-op**: nothing to edit, the version holding
  it is named;
- another value is a **re-edit**: its ``target_true`` becomes the value the chain last wrote, whatever
  the feed said the old value was, so that editors unlearn what the model now states (CoME) and the
  efficacy check compares the new value with the edited one, not with a value from before the chain;
- a slot the chain never wrote is a **first edit**, unchanged.

The stream (``kedit.pipeline``) and ``kedit bench reedit`` both resolve through this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kedit.core.facts.schema import EditRequest, normalize


@dataclass(frozen=True)
class Held:
    """What a chain holds for one slot: the request that wrote it and the version it is in."""

    request: EditRequest
    version: str | None = None  # None outside a registry (the benchmark's in-memory chain)


@dataclass(frozen=True)
class ReEdit:
    request: EditRequest  # as it will be edited: target_true is the held value
    supersedes: Held
    feed_target_true: str | None  # what the feed gave as the old value (kept for the record)

    def to_dict(self) -> dict:
        return {
            "key": self.request.key,
            "id": self.request.id,
            "target_new": self.request.target_new,
            "target_true": self.request.target_true,
            "feed_target_true": self.feed_target_true,
            "supersedes_key": self.supersedes.request.key,
            "supersedes_id": self.supersedes.request.id,
            "supersedes_version": self.supersedes.version,
        }


@dataclass
class Resolution:
    """Every request given, in exactly one list, in the order given."""

    first: list[EditRequest] = field(default_factory=list)
    reedits: list[ReEdit] = field(default_factory=list)
    noops: list[tuple[EditRequest, Held]] = field(default_factory=list)

    @property
    def to_edit(self) -> list[EditRequest]:
        """What an editor is given: first edits and re-edits (with their held value as target_true)."""
        return self.first + [r.request for r in self.reedits]


def live_facts(applied: Iterable[tuple[EditRequest, str | None]]) -> dict[tuple[str, str], Held]:
    """Per slot, the last of the applied requests ((request, version) pairs, oldest first). Pass only edits
    that held (``Chain.applied``): one that did not take never became what the model states."""
    return {request.slot: Held(request, version) for request, version in applied}


def resolve(requests: Sequence[EditRequest], live: dict[tuple[str, str], Held]) -> Resolution:
    """Sort ``requests`` into first edits, re-edits of a live slot and no-ops (see the module's docstring)."""
    out = Resolution()
    for r in requests:
        held = live.get(r.slot)
        if held is None:
            out.first.append(r)
        elif normalize(held.request.target_new) == normalize(r.target_new):
            out.noops.append((r, held))
        else:
            request = dataclasses.replace(r, target_true=held.request.target_new)
            out.reedits.append(ReEdit(request, held, r.target_true))
    return out


def noop_reason(held: Held) -> str:
    where = f"v{held.version}" if held.version else "the chain"
    return f"no-op: {where} already holds {held.request.target_new!r} for this fact (key {held.request.key})"
