"""The schema: edit requests, facts, rejections, the loading outcome, the errors and the limits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kedit.core.errors import KeditError

# Limits on field sizes; a record over them is quarantined, never truncated.
MAX_TEXT_CHARS = 1000  # subject, prompts
MAX_TARGET_CHARS = 200
MAX_ID_CHARS = 200
MAX_LIST_ITEMS = 64  # paraphrases / neighbours per record
MAX_RECORD_BYTES = 256 * 1024
RAW_EXCERPT_CHARS = 500

FEED_FIELDS = (
    "id",
    "subject",
    "prompt",
    "target_new",
    "target_true",
    "paraphrase_prompts",
    "neighborhood",
    "generation_prompts",
    "source",
    "timestamp",
)


class FieldError(ValueError):
    """A record is invalid because of one field."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class FactFileError(KeditError, ValueError):
    """The file itself cannot be read (missing, unknown format)."""


@dataclass(frozen=True)
class Neighbor:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Fact:
    """A fact the model should keep knowing: greedy decoding after ``prompt`` gives ``answer``."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    """One fact update. ``prompt`` holds ``{}`` exactly once, where the subject goes."""

    id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[Neighbor, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    source: str = ""
    timestamp: datetime | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in (``str.format`` would trip on other braces)."""
        return self.prompt.replace("{}", self.subject, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject": self.subject,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood": [{"prompt": n.prompt, "answer": n.answer} for n in self.neighborhood],
            "generation_prompts": list(self.generation_prompts),
            "source": self.source,
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRequest:
        """Validate a canonical (feed-format) dict; raises ``FieldError``."""
        from kedit.core.facts.validate import validate_record  # validate builds on this module

        return validate_record(d, origin="")


@dataclass(frozen=True)
class Rejection:
    file: str
    line: int
    field: str
    reason: str
    record_id: str | None = None
    raw: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: field {self.field!r}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "reason": self.reason,
            "record_id": self.record_id,
            "raw": self.raw,
        }


@dataclass(frozen=True)
class Superseded:
    request: EditRequest
    by: str  # id of the later update that wins
    file: str
    line: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "superseded_by": self.by, **self.request.to_dict()}


@dataclass
class FactSet:
    """The outcome of loading: every record that entered is in exactly one list."""

    accepted: list[EditRequest] = field(default_factory=list)
    quarantined: list[Rejection] = field(default_factory=list)
    superseded: list[Superseded] = field(default_factory=list)
    n_records: int = 0
    # where each accepted request came from, for supersession reports: id -> (file, line)
    origins: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def accounted(self) -> bool:
        return len(self.accepted) + len(self.quarantined) + len(self.superseded) == self.n_records

    def summary(self) -> str:
        return (
            f"{self.n_records} records: {len(self.accepted)} accepted, "
            f"{len(self.quarantined)} quarantined, {len(self.superseded)} superseded"
        )

    def write_quarantine(self, out_dir: str | Path) -> Path:
        """Write ``quarantine.jsonl`` and ``superseded.jsonl`` into ``out_dir``; returns the quarantine path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        q = out / "quarantine.jsonl"
        with q.open("w", encoding="utf-8") as f:
            for r in self.quarantined:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        with (out / "superseded.jsonl").open("w", encoding="utf-8") as f:
            for s in self.superseded:
                f.write(json.dumps(s.to_dict(), ensure_ascii=False) + "\n")
        return q

    def extend(self, other: FactSet) -> None:
        self.accepted += other.accepted
        self.quarantined += other.quarantined
        self.superseded += other.superseded
        self.n_records += other.n_records
        self.origins.update(other.origins)
