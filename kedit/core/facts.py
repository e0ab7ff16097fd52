"""Edit requests: one schema, strict loaders for research data sets and fact feeds.

Every record that enters a loader ends in exactly one of three lists: ``accepted``,
``quarantined`` (with file, line, field and reason) or ``superseded`` (by a later update
of the same subject and prompt). ``FactSet.n_records`` counts what entered, so the
accounting can be checked.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kedit.core.errors import KeditError

log = logging.getLogger(__name__)

# Limits on field sizes; a record over them is quarantined, never truncated.
MAX_TEXT_CHARS = 1000  # subject, prompts
MAX_TARGET_CHARS = 200
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
        return _canonical(d, origin="")


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


# ----------------------------------------------------------------------------- validation


def _excerpt(raw: Any) -> str:
    s = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return s[:RAW_EXCERPT_CHARS]


def _has_surrogates(s: str) -> bool:
    # undecodable bytes survive decoding as lone surrogates (errors="surrogateescape")
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _text(d: dict, name: str, *, required: bool = True, limit: int = MAX_TEXT_CHARS) -> str | None:
    v = d.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise FieldError(name, "missing or empty")
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and name == "id":
        v = str(v)
    if not isinstance(v, str):
        raise FieldError(name, f"expected a string, got {type(v).__name__}")
    if _has_surrogates(v):
        raise FieldError(name, "invalid UTF-8")
    if "\x00" in v:
        raise FieldError(name, "contains a NUL character")
    if len(v) > limit:
        raise FieldError(name, f"oversized: {len(v)} characters (limit {limit})")
    return v


def _text_list(d: dict, name: str) -> tuple[str, ...]:
    v = d.get(name)
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise FieldError(name, f"expected a list of strings, got {type(v).__name__}")
    if len(v) > MAX_LIST_ITEMS:
        raise FieldError(name, f"oversized: {len(v)} items (limit {MAX_LIST_ITEMS})")
    out = []
    for i, item in enumerate(v):
        try:
            out.append(_text({name: item}, name))
        except FieldError as e:
            raise FieldError(f"{name}[{i}]", e.reason) from None
    return tuple(out)


def _neighbors(d: dict, name: str = "neighborhood") -> tuple[Neighbor, ...]:
    v = d.get(name)
    if v is None:
        return ()
    if not isinstance(v, list):
        raise FieldError(name, f"expected a list of {{prompt, answer}} objects, got {type(v).__name__}")
    if len(v) > MAX_LIST_ITEMS:
        raise FieldError(name, f"oversized: {len(v)} items (limit {MAX_LIST_ITEMS})")
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, dict) or set(item) != {"prompt", "answer"}:
            raise FieldError(f"{name}[{i}]", "expected an object with exactly 'prompt' and 'answer'")
        try:
            out.append(Neighbor(_text(item, "prompt"), _text(item, "answer")))
        except FieldError as e:
            raise FieldError(f"{name}[{i}].{e.field}", e.reason) from None
    return tuple(out)


def _timestamp(d: dict) -> datetime | None:
    v = d.get("timestamp")
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise FieldError("timestamp", f"expected an ISO 8601 string, got {type(v).__name__}")
    try:
        ts = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
    except ValueError:
        raise FieldError("timestamp", f"not an ISO 8601 date-time: {v[:40]!r}") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _normalize(s: str) -> str:
    return " ".join(s.split()).casefold()


def _derived_id(subject: str, prompt: str, target_new: str, ts: datetime | None) -> str:
    h = hashlib.sha256("\x1f".join([subject, prompt, target_new, str(ts)]).encode("utf-8", "surrogatepass"))
    return "fact-" + h.hexdigest()[:12]


def _canonical(d: dict, origin: str) -> EditRequest:
    """Validate a dict in the canonical (feed) schema; raises ``FieldError`` naming the field."""
    unknown = [k for k in d if k not in FEED_FIELDS]
    if unknown:
        raise FieldError(str(unknown[0]), f"unknown field (allowed: {', '.join(FEED_FIELDS)})")
    subject = _text(d, "subject")
    prompt = _text(d, "prompt")
    if prompt.count("{}") > 1:
        raise FieldError("prompt", "has more than one '{}' placeholder")
    if "{}" not in prompt:
        if subject not in prompt:
            raise FieldError("prompt", f"subject {subject!r} not in prompt (and no '{{}}' placeholder)")
        prompt = prompt.replace(subject, "{}", 1)
    target_new = _text(d, "target_new", limit=MAX_TARGET_CHARS)
    target_true = _text(d, "target_true", required=False, limit=MAX_TARGET_CHARS)
    if target_true is not None and _normalize(target_new) == _normalize(target_true):
        raise FieldError("target_new", f"equal to target_true ({target_true!r}): nothing to edit")
    ts = _timestamp(d)
    rid = _text(d, "id", required=False, limit=200) or _derived_id(subject, prompt, target_new, ts)
    return EditRequest(
        id=rid,
        subject=subject,
        prompt=prompt,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_text_list(d, "paraphrase_prompts"),
        neighborhood=_neighbors(d),
        generation_prompts=_text_list(d, "generation_prompts"),
        source=_text(d, "source", required=False) or origin,
        timestamp=ts,
    )


def _require_keys(d: Any, allowed: set[str], where: str = "") -> dict:
    if not isinstance(d, dict):
        raise FieldError(where or "<record>", f"expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise FieldError(f"{where}.{unknown[0]}" if where else unknown[0], "unknown field")
    return d


def _str_of(v: Any, name: str) -> Any:
    """CounterFact targets are ``{"str": ..., "id": ...}``; take the string."""
    if isinstance(v, dict):
        if "str" not in v:
            raise FieldError(name, "expected an object with a 'str' key")
        return v["str"]
    return v


# ----------------------------------------------------------------------------- formats
# Each converter maps one raw record to one or more canonical dicts (with their own sub-ids).

_CF_KEYS = {
    "case_id",
    "pararel_idx",
    "requested_rewrite",
    "paraphrase_prompts",
    "neighborhood_prompts",
    "attribute_prompts",
    "generation_prompts",
}
_CF_RW_KEYS = {"prompt", "relation_id", "target_new", "target_true", "subject", "question"}


def _from_counterfact(rec: Any, index: int) -> list[dict]:
    rec = _require_keys(rec, _CF_KEYS)
    rw = _require_keys(rec.get("requested_rewrite"), _CF_RW_KEYS, "requested_rewrite")
    true = _str_of(rw.get("target_true"), "requested_rewrite.target_true")
    neighbors = rec.get("neighborhood_prompts") or []
    if not isinstance(neighbors, list):
        raise FieldError("neighborhood_prompts", "expected a list")
    return [
        {
            "id": f"cf-{rec.get('case_id', index)}",
            "subject": rw.get("subject"),
            "prompt": rw.get("prompt"),
            "target_new": _str_of(rw.get("target_new"), "requested_rewrite.target_new"),
            "target_true": true,
            "paraphrase_prompts": rec.get("paraphrase_prompts"),
            "neighborhood": [{"prompt": p, "answer": true} for p in neighbors],
            "generation_prompts": rec.get("generation_prompts"),
        }
    ]


_CF_EE_KEYS = {
    "case_id",
    "prompt",
    "target_new",
    "subject",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
}


def _from_counterfact_easyedit(rec: Any, index: int) -> list[dict]:
    rec = _require_keys(rec, _CF_EE_KEYS)
    loc, loc_ans = rec.get("locality_prompt"), rec.get("locality_ground_truth")
    neighborhood = [{"prompt": loc, "answer": loc_ans}] if loc is not None or loc_ans is not None else None
    return [
        {
            "id": f"cf-{rec.get('case_id', index)}",
            "subject": rec.get("subject"),
            "prompt": rec.get("prompt"),
            "target_new": rec.get("target_new"),
            "target_true": rec.get("ground_truth"),
            "paraphrase_prompts": rec.get("rephrase_prompt"),
            "neighborhood": neighborhood,
        }
    ]


_ZSRE_KEYS = {"case_id", "subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond", "portability"}


def _from_zsre(rec: Any, index: int) -> list[dict]:
    rec = _require_keys(rec, _ZSRE_KEYS)
    answers = rec.get("answers")
    if answers is not None and not (isinstance(answers, list) and answers):
        raise FieldError("answers", "expected a non-empty list")
    loc, loc_ans = rec.get("loc"), rec.get("loc_ans")
    return [
        {
            "id": f"zsre-{rec.get('case_id', index)}",
            "subject": rec.get("subject"),
            "prompt": rec.get("src"),
            "target_new": rec.get("alt"),
            "target_true": answers[0] if answers else None,
            "paraphrase_prompts": rec.get("rephrase"),
            "neighborhood": [{"prompt": loc, "answer": loc_ans}] if loc is not None else None,
        }
    ]


_MQ_KEYS = {
    "case_id",
    "requested_rewrite",
    "questions",
    "answer",
    "answer_alias",
    "new_answer",
    "new_answer_alias",
    "single_hops",
    "new_single_hops",
    "orig",
}


def _from_mquake(rec: Any, index: int) -> list[dict]:
    rec = _require_keys(rec, _MQ_KEYS)
    rws = rec.get("requested_rewrite")
    if not isinstance(rws, list) or not rws:
        raise FieldError("requested_rewrite", "expected a non-empty list of rewrites")
    out = []
    for j, rw in enumerate(rws):
        rw = _require_keys(rw, _CF_RW_KEYS, f"requested_rewrite[{j}]")
        q = rw.get("question")
        out.append(
            {
                "id": f"mquake-{rec.get('case_id', index)}-{j}",
                "subject": rw.get("subject"),
                "prompt": rw.get("prompt"),
                "target_new": _str_of(rw.get("target_new"), f"requested_rewrite[{j}].target_new"),
                "target_true": _str_of(rw.get("target_true"), f"requested_rewrite[{j}].target_true"),
                "paraphrase_prompts": [q] if q else None,
            }
        )
    return out


def _from_feed(rec: Any, index: int) -> list[dict]:
    if not isinstance(rec, dict):
        raise FieldError("<record>", f"expected a JSON object, got {type(rec).__name__}")
    return [rec]


CONVERTERS: dict[str, Callable[[Any, int], list[dict]]] = {
    "counterfact": _from_counterfact,
    "counterfact-easyedit": _from_counterfact_easyedit,
    "zsre": _from_zsre,
    "mquake": _from_mquake,
    "feed": _from_feed,
}
FORMATS = tuple(CONVERTERS)


# ----------------------------------------------------------------------------- readers
# A reader yields (line, raw record | None, error | None); a record with an error is quarantined whole.


@dataclass(frozen=True)
class _Raw:
    line: int
    record: Any = None
    error: FieldError | None = None
    text: str = ""


def _read_jsonl(data: bytes) -> Iterator[_Raw]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_RECORD_BYTES:
            yield _Raw(lineno, error=FieldError("<record>", f"oversized record: {len(raw)} bytes"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _Raw(lineno, error=FieldError("<record>", f"invalid UTF-8 at byte {e.start}"), text=repr(raw[:200]))
            continue
        try:
            yield _Raw(lineno, record=json.loads(text), text=text)
        except (json.JSONDecodeError, RecursionError) as e:
            yield _Raw(lineno, error=FieldError("<record>", f"invalid JSON: {e}"), text=text)


def _read_json_array(data: bytes) -> Iterator[_Raw]:
    text = data.decode("utf-8", errors="surrogateescape")
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    i = ws.match(text).end()
    if text[i : i + 1] != "[":
        yield _Raw(1, error=FieldError("<file>", "expected a JSON array"))
        return
    i = ws.match(text, i + 1).end()
    line, counted = 1, 0  # incremental line count: text.count from the last position only

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    while i < len(text) and text[i] != "]":
        start = i
        try:
            rec, end = dec.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError) as e:
            # JSON cannot be resynchronised after a syntax error: the rest of the file is one rejection
            yield _Raw(line_at(start), error=FieldError("<record>", f"invalid JSON, rest of file unreadable: {e}"))
            return
        chunk = text[start:end]
        if _has_surrogates(chunk):
            yield _Raw(line_at(start), error=FieldError("<record>", "invalid UTF-8"), text=chunk[:RAW_EXCERPT_CHARS])
        elif end - start > MAX_RECORD_BYTES:
            yield _Raw(line_at(start), error=FieldError("<record>", f"oversized record: {end - start} characters"))
        else:
            yield _Raw(line_at(start), record=rec, text=chunk)
        i = ws.match(text, end).end()
        if text[i : i + 1] == ",":
            i = ws.match(text, i + 1).end()
        elif text[i : i + 1] != "]":
            yield _Raw(line_at(i), error=FieldError("<record>", "expected ',' or ']' after a record; rest unreadable"))
            return
    if i >= len(text):
        yield _Raw(line_at(len(text)), error=FieldError("<file>", "unterminated JSON array (missing ']')"))


def _csv_cell(name: str, value: str) -> Any:
    """CSV cells are strings; list fields hold a JSON list, or items separated by ' | '."""
    if value == "":
        return None
    if name in ("paraphrase_prompts", "generation_prompts"):
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise FieldError(name, f"invalid JSON list: {e}") from None
        return [p.strip() for p in value.split(" | ")]
    if name == "neighborhood":
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise FieldError(name, f"expected a JSON list of {{prompt, answer}}: {e}") from None
    return value


def _read_csv(data: bytes) -> Iterator[_Raw]:
    text = data.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        yield _Raw(1, error=FieldError("<header>", f"unreadable CSV header: {e}"))
        return
    header = [h.strip() for h in header]
    bad_header = next((h for h in header if h not in FEED_FIELDS), None)
    dup_header = next((h for h in header if header.count(h) > 1), None)
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield _Raw(start, error=FieldError("<record>", f"unreadable CSV row: {e}"))
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not row or all(not c.strip() for c in row):
            continue
        joined = ",".join(row)
        if _has_surrogates(joined):
            yield _Raw(line, error=FieldError("<record>", "invalid UTF-8"), text=joined[:RAW_EXCERPT_CHARS])
        elif len(joined) > MAX_RECORD_BYTES:
            yield _Raw(line, error=FieldError("<record>", f"oversized record: {len(joined)} characters"))
        elif bad_header is not None:
            yield _Raw(line, error=FieldError(bad_header, "unknown field (CSV column)"), text=joined)
        elif dup_header is not None:
            yield _Raw(line, error=FieldError(dup_header, "duplicate CSV column"), text=joined)
        elif len(row) != len(header):
            yield _Raw(line, error=FieldError("<record>", f"expected {len(header)} columns, got {len(row)}"), text=joined)
        else:
            try:
                yield _Raw(line, record={h: _csv_cell(h, v) for h, v in zip(header, row)}, text=joined)
            except FieldError as e:
                yield _Raw(line, error=e, text=joined)


def _reader_for(path: Path, data: bytes) -> Callable[[bytes], Iterator[_Raw]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv
    if suffix == ".jsonl":
        return _read_jsonl
    head = data.lstrip()[:1]
    return _read_json_array if head == b"[" else _read_jsonl


def sniff_format(record: Any) -> str:
    if isinstance(record, dict):
        rw = record.get("requested_rewrite")
        if isinstance(rw, list):
            return "mquake"
        if isinstance(rw, dict):
            return "counterfact"
        if "src" in record and "alt" in record:
            return "zsre"
        if "ground_truth" in record and "rephrase_prompt" in record:
            return "counterfact-easyedit"
    return "feed"


# ----------------------------------------------------------------------------- loading


def load_facts(path: str | Path, fmt: str = "auto", limit: int | None = None) -> FactSet:
    """Load one file of edit requests; invalid records are quarantined, superseded ones recorded.

    ``limit`` stops after that many raw records (for benchmarks on a prefix of a data set).
    """
    path = Path(path)
    if fmt != "auto" and fmt not in CONVERTERS:
        raise FactFileError(f"{path}: unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FactFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FactFileError(f"{path}: is a directory, expected a fact file") from None
    result = FactSet()
    candidates: list[tuple[EditRequest, int]] = []
    seen_ids: dict[str, int] = {}
    convert = CONVERTERS.get(fmt)
    name = str(path)
    for index, raw in enumerate(_reader_for(path, data)(data)):
        if limit is not None and index >= limit:
            break
        if raw.error is not None:
            result.n_records += 1
            result.quarantined.append(
                Rejection(name, raw.line, raw.error.field, raw.error.reason, raw=raw.text[:RAW_EXCERPT_CHARS])
            )
            continue
        if convert is None:
            convert = CONVERTERS[sniff_format(raw.record)]
            log.debug("%s: format %s", path, convert.__name__)
        try:
            dicts = convert(raw.record, index)
        except FieldError as e:
            result.n_records += 1
            result.quarantined.append(Rejection(name, raw.line, e.field, e.reason, raw=_excerpt(raw.text)))
            continue
        for d in dicts:
            result.n_records += 1
            rid = d.get("id") if isinstance(d.get("id"), str) else None
            try:
                req = _canonical(d, origin=name)
            except FieldError as e:
                result.quarantined.append(Rejection(name, raw.line, e.field, e.reason, rid, _excerpt(raw.text)))
                continue
            if req.id in seen_ids:
                result.quarantined.append(
                    Rejection(
                        name,
                        raw.line,
                        "id",
                        f"duplicate id {req.id!r} (first at line {seen_ids[req.id]})",
                        req.id,
                        _excerpt(raw.text),
                    )
                )
                continue
            seen_ids[req.id] = raw.line
            candidates.append((req, raw.line))
    result.origins = {req.id: (name, line) for req, line in candidates}
    result.accepted, superseded = resolve_superseded([req for req, _ in candidates])
    result.superseded = [Superseded(r, by, *result.origins[r.id]) for r, by in superseded]
    log.info("%s: %s", path, result.summary())
    return result


FEED_SUFFIXES = (".jsonl", ".csv", ".json")
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")  # still being written (write-then-rename)


def is_feed_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix in FEED_SUFFIXES and not path.name.endswith(PARTIAL_SUFFIXES)


def list_feeds(feeds_dir: str | Path) -> list[str]:
    """The feed files of a directory, by name (hidden and partial files excluded), sorted."""
    d = Path(feeds_dir)
    return sorted(str(p) for p in d.iterdir() if p.is_file() and is_feed_name(p)) if d.is_dir() else []


def load_many(paths: Iterable[str | Path], fmt: str = "auto", unreadable: dict[str, str] | None = None) -> FactSet:
    """Load several files; an id already seen in an earlier file is quarantined, and
    supersession is resolved across all of them. With ``unreadable``, a file that cannot be read
    at all is recorded there (path -> reason) and skipped instead of raising."""
    total = FactSet()
    for p in paths:
        try:
            part = load_facts(p, fmt)
        except FactFileError as e:
            if unreadable is None:
                raise
            unreadable[str(p)] = str(e)
            continue
        for r in [r for r in part.accepted if r.id in total.origins]:
            (f, line), (first_f, first_line) = part.origins.pop(r.id), total.origins[r.id]
            part.quarantined.append(Rejection(f, line, "id", f"duplicate id {r.id!r} (first at {first_f}:{first_line})", r.id))
        part.accepted = [r for r in part.accepted if r.id in part.origins]
        total.extend(part)
    total.accepted, superseded = resolve_superseded(total.accepted)
    total.superseded += [Superseded(r, by, *total.origins[r.id]) for r, by in superseded]
    return total


def resolve_superseded(requests: list[EditRequest]) -> tuple[list[EditRequest], list[tuple[EditRequest, str]]]:
    """Keep the latest update per (subject, prompt); ties go to the later record.

    Requests without a timestamp count as older than any timestamped one. The kept requests
    are returned in timestamp order (stable), the superseded ones with the id that won.
    """
    epoch = datetime.min.replace(tzinfo=UTC)
    winner: dict[tuple[str, str], int] = {}
    for i, r in enumerate(requests):
        key = (_normalize(r.subject), _normalize(r.prompt))
        j = winner.get(key)
        if j is None or (r.timestamp or epoch) >= (requests[j].timestamp or epoch):
            winner[key] = i
    keep = set(winner.values())
    kept = [r for i, r in enumerate(requests) if i in keep]
    superseded = [
        (r, requests[winner[(_normalize(r.subject), _normalize(r.prompt))]].id) for i, r in enumerate(requests) if i not in keep
    ]
    kept.sort(key=lambda r: r.timestamp or epoch)
    return kept, superseded


def load_known_facts(path: str | Path) -> list[Fact]:
    """Facts for the drawdown retain set: JSONL ``{prompt, answer}`` or ROME's knowns JSON
    (``{prompt, attribute, ...}``). Any invalid record is an error naming file, line and field."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FactFileError(f"{path}: {e.strerror or e}") from None
    out = []
    for raw in _reader_for(path, data)(data):
        where = f"{path}:{raw.line}"
        if raw.error is not None:
            raise FactFileError(f"{where}: field {raw.error.field!r}: {raw.error.reason}")
        rec = raw.record
        if not isinstance(rec, dict):
            raise FactFileError(f"{where}: expected a JSON object")
        answer_key = "answer" if "answer" in rec else "attribute"
        try:
            out.append(Fact(_text(rec, "prompt"), _text(rec, answer_key, limit=MAX_TARGET_CHARS)))
        except FieldError as e:
            raise FactFileError(f"{where}: field {e.field!r}: {e.reason}") from None
    return out
