"""File readers: bytes -> raw records with their line numbers, chosen by file suffix.

A reader yields ``Raw(line, record | None, error | None, text)``; a record with an error is
quarantined whole. ``READERS`` maps a suffix to its reader; a file with another suffix is read
as a JSON array when it starts with ``[``, else as JSONL.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.core.facts.schema import FEED_FIELDS, MAX_RECORD_BYTES, RAW_EXCERPT_CHARS, FieldError
from kedit.core.facts.validate import has_surrogates


@dataclass(frozen=True)
class Raw:
    line: int
    record: Any = None
    error: FieldError | None = None
    text: str = ""


Reader = Callable[[bytes], Iterator[Raw]]


def read_jsonl(data: bytes) -> Iterator[Raw]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_RECORD_BYTES:
            yield Raw(lineno, error=FieldError("<record>", f"oversized record: {len(raw)} bytes"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Raw(lineno, error=FieldError("<record>", f"invalid UTF-8 at byte {e.start}"), text=repr(raw[:200]))
            continue
        try:
            yield Raw(lineno, record=json.loads(text), text=text)
        except (json.JSONDecodeError, RecursionError) as e:
            yield Raw(lineno, error=FieldError("<record>", f"invalid JSON: {e}"), text=text)


_WS = re.compile(r"\s*")


def read_json_array(data: bytes) -> Iterator[Raw]:
    text = data.decode("utf-8", errors="surrogateescape")
    dec = json.JSONDecoder()
    ws = _WS
    i = ws.match(text).end()
    if text[i : i + 1] != "[":
        yield Raw(1, error=FieldError("<file>", "expected a JSON array"))
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
            yield Raw(line_at(start), error=FieldError("<record>", f"invalid JSON, rest of file unreadable: {e}"))
            return
        chunk = text[start:end]
        if has_surrogates(chunk):
            yield Raw(line_at(start), error=FieldError("<record>", "invalid UTF-8"), text=chunk[:RAW_EXCERPT_CHARS])
        elif end - start > MAX_RECORD_BYTES:
            yield Raw(line_at(start), error=FieldError("<record>", f"oversized record: {end - start} characters"))
        else:
            yield Raw(line_at(start), record=rec, text=chunk)
        i = ws.match(text, end).end()
        if text[i : i + 1] == ",":
            i = ws.match(text, i + 1).end()
        elif text[i : i + 1] != "]":
            yield Raw(line_at(i), error=FieldError("<record>", "expected ',' or ']' after a record; rest unreadable"))
            return
    if i >= len(text):
        yield Raw(line_at(len(text)), error=FieldError("<file>", "unterminated JSON array (missing ']')"))


def csv_cell(name: str, value: str) -> Any:
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


def read_csv(data: bytes) -> Iterator[Raw]:
    text = data.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        yield Raw(1, error=FieldError("<header>", f"unreadable CSV header: {e}"))
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
            yield Raw(start, error=FieldError("<record>", f"unreadable CSV row: {e}"))
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not row or all(not c.strip() for c in row):
            continue
        joined = ",".join(row)
        if has_surrogates(joined):
            yield Raw(line, error=FieldError("<record>", "invalid UTF-8"), text=joined[:RAW_EXCERPT_CHARS])
        elif len(joined) > MAX_RECORD_BYTES:
            yield Raw(line, error=FieldError("<record>", f"oversized record: {len(joined)} characters"))
        elif bad_header is not None:
            yield Raw(line, error=FieldError(bad_header, "unknown field (CSV column)"), text=joined)
        elif dup_header is not None:
            yield Raw(line, error=FieldError(dup_header, "duplicate CSV column"), text=joined)
        elif len(row) != len(header):
            yield Raw(line, error=FieldError("<record>", f"expected {len(header)} columns, got {len(row)}"), text=joined)
        else:
            try:
                yield Raw(line, record={h: csv_cell(h, v) for h, v in zip(header, row)}, text=joined)
            except FieldError as e:
                yield Raw(line, error=e, text=joined)


READERS: dict[str, Reader] = {".csv": read_csv, ".jsonl": read_jsonl}


def reader_for(path: Path, data: bytes) -> Reader:
    reader = READERS.get(path.suffix.lower())
    if reader is not None:
        return reader
    return read_json_array if data.lstrip()[:1] == b"[" else read_jsonl
