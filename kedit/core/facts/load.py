"""Loading: files -> ``FactSet`` (accepted, quarantined, superseded), and the retain set's known facts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from kedit.core.facts.formats import format_names, get_format, sniff_format
from kedit.core.facts.readers import reader_for
from kedit.core.facts.schema import (
    MAX_TARGET_CHARS,
    RAW_EXCERPT_CHARS,
    EditRequest,
    Fact,
    FactFileError,
    FactSet,
    FieldError,
    Rejection,
    Superseded,
)
from kedit.core.facts.validate import excerpt, normalize, text, validate_record

log = logging.getLogger("kedit.core.facts")

Validator = Callable[[dict, str], EditRequest]


def load_facts(path: str | Path, fmt: str = "auto", limit: int | None = None, *, validate: Validator | None = None) -> FactSet:
    """Load one file of edit requests; invalid records are quarantined, superseded ones recorded.

    ``limit`` stops after that many raw records (for benchmarks on a prefix of a data set).
    ``validate`` replaces the canonical-record validator (the benchmark passes the hand-written one).
    """
    path = Path(path)
    validate = validate or validate_record
    chosen = None if fmt == "auto" else get_format(fmt)
    if fmt != "auto" and chosen is None:
        raise FactFileError(f"{path}: unknown format {fmt!r}; known: {', '.join(format_names())}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FactFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FactFileError(f"{path}: is a directory, expected a fact file") from None
    result = FactSet()
    candidates: list[tuple[EditRequest, int]] = []
    seen_ids: dict[str, int] = {}
    convert = chosen.convert if chosen else None
    name = str(path)
    for index, raw in enumerate(reader_for(path, data)(data)):
        if limit is not None and index >= limit:
            break
        if raw.error is not None:
            result.n_records += 1
            result.quarantined.append(
                Rejection(name, raw.line, raw.error.field, raw.error.reason, raw=raw.text[:RAW_EXCERPT_CHARS])
            )
            continue
        if convert is None:
            sniffed = sniff_format(raw.record)
            convert = get_format(sniffed).convert
            log.debug("%s: format %s", path, sniffed)
        try:
            dicts = convert(raw.record, index)
        except FieldError as e:
            result.n_records += 1
            result.quarantined.append(Rejection(name, raw.line, e.field, e.reason, raw=excerpt(raw.text)))
            continue
        for d in dicts:
            result.n_records += 1
            rid = d.get("id") if isinstance(d.get("id"), str) else None
            try:
                req = validate(d, name)
            except FieldError as e:
                result.quarantined.append(Rejection(name, raw.line, e.field, e.reason, rid, excerpt(raw.text)))
                continue
            if req.id in seen_ids:
                result.quarantined.append(
                    Rejection(
                        name,
                        raw.line,
                        "id",
                        f"duplicate id {req.id!r} (first at line {seen_ids[req.id]})",
                        req.id,
                        excerpt(raw.text),
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
        key = (normalize(r.subject), normalize(r.prompt))
        j = winner.get(key)
        if j is None or (r.timestamp or epoch) >= (requests[j].timestamp or epoch):
            winner[key] = i
    keep = set(winner.values())
    kept = [r for i, r in enumerate(requests) if i in keep]
    superseded = [
        (r, requests[winner[(normalize(r.subject), normalize(r.prompt))]].id) for i, r in enumerate(requests) if i not in keep
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
    for raw in reader_for(path, data)(data):
        where = f"{path}:{raw.line}"
        if raw.error is not None:
            raise FactFileError(f"{where}: field {raw.error.field!r}: {raw.error.reason}")
        rec = raw.record
        if not isinstance(rec, dict):
            raise FactFileError(f"{where}: expected a JSON object")
        answer_key = "answer" if "answer" in rec else "attribute"
        try:
            out.append(Fact(text(rec, "prompt"), text(rec, answer_key, limit=MAX_TARGET_CHARS)))
        except FieldError as e:
            raise FactFileError(f"{where}: field {e.field!r}: {e.reason}") from None
    return out
