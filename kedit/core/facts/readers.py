"""File readers: bytes -> raw records with their line numbers, chosen by file suffix.

A reader takes the file's bytes and the ``Limits`` and yields ``Raw(line, record | None, error | None,
text)``; a record with an error is quarantined whole. A leading UTF-8 byte-order mark is dropped.
``READERS`` maps a suffix to its reader; a file with another suffix is read
as a JSON array when it starts with ``[``, else as JSONL.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.core.facts.limits import Limits
from kedit.core.facts.schema import FEED_FIELDS, FieldError
from kedit.core.facts.validate import has_surrogates

BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Raw:
    line: int
    record: Any = None
    error: FieldError | None = None
    text: str = ""


Reader = Callable[[bytes, Limits], Iterator[Raw]]


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) per physical line, without the UTF-8 byte-order mark or a trailing CR."""
    for lineno, raw in enumerate(data.removeprefix(BOM).split(b"\n"), start=1):
        yield lineno, raw.removesuffix(b"\r")


def _decoded(lineno: int, raw: bytes, limits: Limits) -> str | Raw:
    """The line as text, or the Raw rejection saying why it is not a record."""
    if len(raw) > limits.record_bytes:
        return Raw(lineno, error=FieldError("<record>", f"oversized record: {len(raw)} bytes (limit {limits.record_bytes})"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Raw(lineno, error=FieldError("<record>", f"invalid UTF-8 at byte {e.start}"), text=repr(raw[:200]))


def read_jsonl(data: bytes, limits: Limits) -> Iterator[Raw]:
    for lineno, raw in _lines(data):
        if not raw.strip():
            continue
        text = _decoded(lineno, raw, limits)
        if isinstance(text, Raw):
            yield text
            continue
        try:
            yield Raw(lineno, record=json.loads(text), text=text)
        except (json.JSONDecodeError, RecursionError) as e:
            yield Raw(lineno, error=FieldError("<record>", f"invalid JSON: {e}"), text=text)


_WS = re.compile(r"\s*")


def read_json_array(data: bytes, limits: Limits) -> Iterator[Raw]:
    text = data.removeprefix(BOM).decode("utf-8", errors="surrogateescape")
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
            yield Raw(line_at(start), error=FieldError("<record>", "invalid UTF-8"), text=chunk[: limits.excerpt_chars])
        elif end - start > limits.record_bytes:
            yield Raw(line_at(start), error=FieldError("<record>", f"oversized record: {end - start} characters"))
        else:
            yield Raw(line_at(start), record=rec, text=chunk)
        i = ws.match(text, end).end()
        if text[i : i + 1] == ",":
            i = ws.match(text, i + 1).end()
        elif i < len(text) and text[i] != "]":
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


# A cell a spreadsheet would run as a formula (CSV injection) when someone opens an exported list;
# numbers with a sign ("-5", "+44 20 7946") are not formulas.
_FORMULA = re.compile(r"[=@]|[+-](?![\d.\s]|$)")


def _csv_row(text: str) -> list[str]:
    """One physical line as one CSV row, in the csv module's strict mode: an unterminated quote is an
    error here instead of swallowing the lines after it (a field cannot hold a newline)."""
    rows = list(csv.reader([text], strict=True))
    if len(rows) != 1:  # one line in, one row out: the count check of a lossless reader
        raise csv.Error(f"expected one row, read {len(rows)}")
    return rows[0]


def read_csv(data: bytes, limits: Limits) -> Iterator[Raw]:
    """CSV feeds, one record per physical line (header first). Every non-empty line after the header
    yields exactly one Raw, so the records read always equal the lines given."""
    header: list[str] | None = None
    problem: FieldError | None = None  # of the header, charged to every row
    lines = list(_lines(data))
    inside: dict[int, int] = {}  # line index -> the line whose unterminated quote it continues
    for index, (lineno, raw) in enumerate(lines):
        if index in inside and raw.strip():  # a blank line holds nothing, inside a field or not
            reason = f"inside the quoted field opened at line {inside[index]} (a field may not span lines)"
            yield Raw(lineno, error=FieldError("<record>", reason), text=raw[: limits.excerpt_chars].decode("utf-8", "replace"))
            continue
        if not raw.strip():
            continue
        text = _decoded(lineno, raw, limits)
        if isinstance(text, Raw):
            if header is None:  # an unreadable header: every row after it is unreadable too
                header, problem = [], FieldError("<header>", f"unreadable CSV header: {text.error.reason}")
                continue
            yield text
            continue
        try:
            row = _csv_row(text)
        except csv.Error as e:
            if header is None:
                header, problem = [], FieldError("<header>", f"unreadable CSV header: {e}")
            else:
                reason = f"unreadable CSV row: {e} (a field may not span lines)"
                yield Raw(lineno, error=FieldError("<record>", reason), text=text)
                inside.update(_continuation(lines, index))
            continue
        if header is None:
            header = [h.strip() for h in row]
            problem = _header_problem(header)
            continue
        if all(not c.strip() for c in row):  # a row of empty cells holds nothing (spreadsheets write them)
            continue
        yield _csv_record(lineno, header, row, text, problem)


def _continuation(lines: list[tuple[int, bytes]], index: int) -> dict[int, int]:
    """The lines a CSV reader would read into the quoted field left open on line ``index``: up to the next
    line holding an odd number of quotes, which closes it. With none, the field was never closed and the
    lines after it are rows of their own (they load)."""
    lineno, raw = lines[index]
    if raw.count(b'"') % 2 == 0:
        return {}
    close = next((k for k in range(index + 1, len(lines)) if lines[k][1].count(b'"') % 2), None)
    return {} if close is None else dict.fromkeys(range(index + 1, close + 1), lineno)


def _header_problem(header: list[str]) -> FieldError | None:
    bad = next((h for h in header if h not in FEED_FIELDS), None)
    if bad is not None:
        return FieldError(bad, "unknown field (CSV column)")
    dup = next((h for h in header if header.count(h) > 1), None)
    return FieldError(dup, "duplicate CSV column") if dup is not None else None


def _csv_record(lineno: int, header: list[str], row: list[str], text: str, problem: FieldError | None) -> Raw:
    if problem is not None:
        return Raw(lineno, error=problem, text=text)
    if len(row) != len(header):
        return Raw(lineno, error=FieldError("<record>", f"expected {len(header)} columns, got {len(row)}"), text=text)
    formula = next((h for h, v in zip(header, row) if _FORMULA.match(v.lstrip())), None)
    if formula is not None:
        return Raw(lineno, error=FieldError(formula, "looks like a spreadsheet formula (starts with =, @, + or -)"), text=text)
    try:
        return Raw(lineno, record={h: csv_cell(h, v) for h, v in zip(header, row)}, text=text)
    except FieldError as e:
        return Raw(lineno, error=e, text=text)


READERS: dict[str, Reader] = {".csv": read_csv, ".jsonl": read_jsonl}


def reader_for(path: Path, data: bytes) -> Reader:
    reader = READERS.get(path.suffix.lower())
    if reader is not None:
        return reader
    return read_json_array if data.lstrip()[:1] == b"[" else read_jsonl
