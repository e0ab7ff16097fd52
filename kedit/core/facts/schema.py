"""The schema: edit requests, facts, rejections, the loading outcome and the errors (the limits are in ``limits``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from kedit.core.errors import KeditError

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


def normalize(s: str) -> str:
    """Case and whitespace folded: two spellings of one subject, prompt or answer compare equal."""
    return " ".join(s.split()).casefold()


def content_hash(subject: str, prompt: str, target_new: str, timestamp: datetime | None) -> str:
    """Hex sha256 of what a fact asks: ``EditRequest.key``, and the id of a record that names none."""
    parts = [subject, prompt, target_new, timestamp.isoformat() if timestamp else ""]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


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

    @cached_property
    def key(self) -> str:
        """The fact's identity on a chain: a hash of what it asks (subject, prompt, target_new, timestamp).

        ``id`` is the producer's name for it, unique within one feed only (a producer may number every
        feed from 1); "already applied" and every per-fact record of the pipeline use ``key``."""
        return "k-" + content_hash(self.subject, self.prompt, self.target_new, self.timestamp)[:20]

    @property
    def slot(self) -> tuple[str, str]:
        """What the fact is about, whatever its value: (subject, prompt) with case and spacing folded.
        Two requests with one slot update the same fact; the later one supersedes the earlier."""
        return normalize(self.subject), normalize(self.prompt)

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
    by: str  # the producer's id of the later update that wins (ids repeat across feeds: see by_at)
    file: str
    line: int
    by_key: str = ""  # the winner's EditRequest.key
    by_at: str = ""  # where the winner was read, "file:line"

    def to_dict(self) -> dict[str, Any]:
        winner = {"superseded_by": self.by, "superseded_by_key": self.by_key, "superseded_by_at": self.by_at}
        return {"file": self.file, "line": self.line, **winner, **self.request.to_dict()}


@dataclass
class FactSet:
    """The outcome of loading: every record that entered is in exactly one list."""

    accepted: list[EditRequest] = field(default_factory=list)
    quarantined: list[Rejection] = field(default_factory=list)
    superseded: list[Superseded] = field(default_factory=list)
    n_records: int = 0
    # where each accepted request came from, for supersession reports: key -> (file, line)
    origins: dict[str, tuple[str, int]] = field(default_factory=dict)
    # files refused whole (unreadable, not a regular file, over a limit): path -> reason
    refused: dict[str, str] = field(default_factory=dict)
    # sha256 of the bytes each file was loaded from (the feed ledger's key: what was read, not what is there now)
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def accounted(self) -> bool:
        return len(self.accepted) + len(self.quarantined) + len(self.superseded) == self.n_records

    def summary(self) -> str:
        refused = f", {len(self.refused)} file(s) refused" if self.refused else ""
        return (
            f"{self.n_records} records: {len(self.accepted)} accepted, "
            f"{len(self.quarantined)} quarantined, {len(self.superseded)} superseded{refused}"
        )

    def write_quarantine(self, out_dir: str | Path, max_rows: int | None = None) -> Path:
        """Write ``quarantine.jsonl`` and ``superseded.jsonl`` into ``out_dir``, at most ``max_rows`` rows
        per file of origin (one feed's junk never crowds out another's rows), and
        ``quarantine_counts.json`` (every count, per file the rows left out, the refused files); returns
        the quarantine path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        q = out / "quarantine.jsonl"
        kept_q, omitted_q = _per_file(self.quarantined, max_rows)
        kept_s, omitted_s = _per_file(self.superseded, max_rows)
        _write_rows(q, [r.to_dict() for r in kept_q])
        _write_rows(out / "superseded.jsonl", [s.to_dict() for s in kept_s])
        counts = {
            "records": self.n_records,
            "accepted": len(self.accepted),
            "quarantined": len(self.quarantined),
            "superseded": len(self.superseded),
            "quarantined_rows_omitted": omitted_q,
            "superseded_rows_omitted": omitted_s,
            "refused_files": self.refused,
        }
        (out / "quarantine_counts.json").write_text(json.dumps(counts, indent=2, ensure_ascii=False))
        return q

    def extend(self, other: FactSet) -> None:
        """Add another file's outcome (``load_many`` then resolves supersession across the files)."""
        self.quarantined += other.quarantined
        self.superseded += other.superseded
        self.n_records += other.n_records
        self.refused.update(other.refused)
        self.sha256.update(other.sha256)


def _per_file(rows: list, max_rows: int | None) -> tuple[list, dict[str, int]]:
    """The first ``max_rows`` rows of each file (in order), and per file how many were left out."""
    seen: dict[str, int] = {}
    kept = []
    for row in rows:
        seen[row.file] = seen.get(row.file, 0) + 1
        if max_rows is None or seen[row.file] <= max_rows:
            kept.append(row)
    return kept, {f: n - max_rows for f, n in seen.items() if max_rows is not None and n > max_rows}


def _write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
