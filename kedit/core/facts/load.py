"""Loading: files -> ``FactSet`` (accepted, quarantined, superseded), and the retain set's known facts."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from kedit.core.facts.formats import format_names, get_format, sniff_format
from kedit.core.facts.limits import Limits
from kedit.core.facts.readers import reader_for
from kedit.core.facts.schema import (
    EditRequest,
    Fact,
    FactFileError,
    FactSet,
    FieldError,
    Rejection,
    Superseded,
)
from kedit.core.facts.validate import DEFAULT_LIMITS, excerpt, text, validate_record

log = logging.getLogger("kedit.core.facts")

Validator = Callable[..., EditRequest]  # (record, origin, limits) -> EditRequest, or FieldError


def read_fact_file(path: Path, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """A fact file's bytes, or ``FactFileError`` saying why it cannot be one: missing, a symbolic link,
    not a regular file (a directory, a FIFO that would block, a device), unreadable, or over
    ``limits.file_bytes``.

    The checks run on the opened handle (``O_NOFOLLOW``, ``O_NONBLOCK``, then ``fstat``), not on the
    name before opening it, so a file swapped for a link or a FIFO after a check (``kedit serve``
    confines feed paths first) is refused, never followed or blocked on. The read stops past the
    size limit, should the file grow meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FactFileError(f"{path}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FactFileError(f"{path}: is a symbolic link; give the file's own path (links are never followed)") from None
        raise FactFileError(f"{path}: cannot read: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FactFileError(f"{path}: is a directory, expected a fact file")
        raise FactFileError(f"{path}: not a regular file (a FIFO, socket or device is never read)")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limits.file_bytes:
            raise FactFileError(f"{path}: {st.st_size} bytes, over the file_bytes limit of {limits.file_bytes}")
        try:
            data = f.read(limits.file_bytes + 1)
        except OSError as e:
            raise FactFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > limits.file_bytes:
        raise FactFileError(f"{path}: grew past the file_bytes limit of {limits.file_bytes} while being read")
    return data


def feed_sha256(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> str:
    """The sha256 of a feed's content, read the way ``load_facts`` reads it (no link followed, no FIFO
    blocked on, the size limit kept); ``FactFileError`` when it cannot be a feed."""
    return hashlib.sha256(read_fact_file(Path(path), limits)).hexdigest()


def load_facts(
    path: str | Path,
    fmt: str = "auto",
    limit: int | None = None,
    *,
    validate: Validator | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> FactSet:
    """Load one file of edit requests; invalid records are quarantined, superseded ones recorded.

    ``limit`` stops after that many raw records (for benchmarks on a prefix of a data set).
    ``validate`` replaces the canonical-record validator (the benchmark passes the hand-written one).
    A file over ``limits.records`` raw records is refused whole (``FactFileError``).
    """
    path = Path(path)
    validate = validate or validate_record
    chosen = None if fmt == "auto" else get_format(fmt)
    if fmt != "auto" and chosen is None:
        raise FactFileError(f"{path}: unknown format {fmt!r}; known: {', '.join(format_names())}")
    data = read_fact_file(path, limits)
    result = FactSet(sha256={str(path): hashlib.sha256(data).hexdigest()})
    candidates: list[tuple[EditRequest, int]] = []
    seen_ids: dict[str, int] = {}
    convert = chosen.convert if chosen else None
    name = str(path)
    for index, raw in enumerate(reader_for(path, data)(data, limits)):
        if limit is not None and index >= limit:
            break
        if index >= limits.records:
            raise FactFileError(f"{path}: more than {limits.records} records (the records limit): refused whole")
        if raw.error is not None:
            result.n_records += 1
            result.quarantined.append(
                Rejection(name, raw.line, raw.error.field, raw.error.reason, raw=raw.text[: limits.excerpt_chars])
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
            result.quarantined.append(Rejection(name, raw.line, e.field, e.reason, raw=excerpt(raw.text, limits)))
            continue
        for d in dicts:
            result.n_records += 1
            rid = d.get("id") if isinstance(d.get("id"), str) else None
            try:
                req = validate(d, name, limits)
            except FieldError as e:
                result.quarantined.append(Rejection(name, raw.line, e.field, e.reason, rid, excerpt(raw.text, limits)))
                continue
            if req.id in seen_ids:
                reason = f"duplicate id {req.id!r} (first at line {seen_ids[req.id]})"
                result.quarantined.append(Rejection(name, raw.line, "id", reason, req.id, excerpt(raw.text, limits)))
                continue
            seen_ids[req.id] = raw.line
            candidates.append((req, raw.line))
    _settle(result, [(req, (name, line)) for req, line in candidates])
    log.info("%s: %s", path, result.summary())
    return result


def _settle(result: FactSet, located: list[tuple[EditRequest, tuple[str, int]]]) -> None:
    """Resolve supersession among ``located`` (request, (file, line)) into ``result``: the winners accepted
    with their origins, the others superseded where they were read. Two records may share a key (the
    same content twice): each keeps its own location."""
    kept, superseded = _supersede([r for r, _ in located])
    result.accepted = [located[i][0] for i in kept]
    result.origins = {located[i][0].key: located[i][1] for i in kept}
    result.superseded += [
        Superseded(located[i][0], located[w][0].id, *located[i][1], located[w][0].key, "{}:{}".format(*located[w][1]))
        for i, w in superseded
    ]


def load_many(
    paths: Iterable[str | Path], fmt: str = "auto", unreadable: dict[str, str] | None = None, limits: Limits = DEFAULT_LIMITS
) -> FactSet:
    """Load several files and resolve supersession across all of them. Ids need only be unique within
    a feed (``EditRequest.key`` identifies a fact across feeds). With ``unreadable``, a file that
    cannot be read at all is recorded there (path -> reason), and in the result's ``refused``, and
    skipped instead of raising."""
    total = FactSet()
    located: list[tuple[EditRequest, tuple[str, int]]] = []
    for p in paths:
        try:
            part = load_facts(p, fmt, limits=limits)
        except FactFileError as e:
            if unreadable is None:
                raise
            unreadable[str(p)] = str(e)
            total.refused[str(p)] = str(e)
            continue
        located += [(r, part.origins[r.key]) for r in part.accepted]
        total.extend(part)
    _settle(total, located)
    return total


def resolve_superseded(requests: list[EditRequest]) -> tuple[list[EditRequest], list[tuple[EditRequest, str]]]:
    """Keep the latest update per (subject, prompt); ties go to the later record.

    Requests without a timestamp count as older than any timestamped one. The kept requests
    are returned in timestamp order (stable), the superseded ones with the id that won.
    """
    kept, superseded = _supersede(requests)
    return [requests[i] for i in kept], [(requests[i], requests[w].id) for i, w in superseded]


def _supersede(requests: list[EditRequest]) -> tuple[list[int], list[tuple[int, int]]]:
    """``resolve_superseded`` on indices: the kept ones in timestamp order, and (superseded, winner) pairs."""
    epoch = datetime.min.replace(tzinfo=UTC)
    winner: dict[tuple[str, str], int] = {}
    for i, r in enumerate(requests):
        j = winner.get(r.slot)
        if j is None or (r.timestamp or epoch) >= (requests[j].timestamp or epoch):
            winner[r.slot] = i
    keep = set(winner.values())
    superseded = [(i, winner[r.slot]) for i, r in enumerate(requests) if i not in keep]
    kept = sorted(keep, key=lambda i: (requests[i].timestamp or epoch, i))
    return kept, superseded


def load_known_facts(path: str | Path) -> list[Fact]:
    """Facts for the drawdown retain set: JSONL ``{prompt, answer}`` or ROME's knowns JSON
    (``{prompt, attribute, ...}``). Any invalid record is an error naming file, line and field."""
    path = Path(path)
    data = read_fact_file(path)
    out = []
    for raw in reader_for(path, data)(data, DEFAULT_LIMITS):
        where = f"{path}:{raw.line}"
        if raw.error is not None:
            raise FactFileError(f"{where}: field {raw.error.field!r}: {raw.error.reason}")
        rec = raw.record
        if not isinstance(rec, dict):
            raise FactFileError(f"{where}: expected a JSON object")
        answer_key = "answer" if "answer" in rec else "attribute"
        try:
            out.append(Fact(text(rec, "prompt"), text(rec, answer_key, limit=DEFAULT_LIMITS.target_chars)))
        except FieldError as e:
            raise FactFileError(f"{where}: field {e.field!r}: {e.reason}") from None
    return out


def scored_cases(requests: Sequence[EditRequest], n: int | None) -> list[EditRequest]:
    """The first ``n`` requests that have an outdated answer (every protocol metric needs one): what
    ``kedit bench --n n`` scores, and what ``kedit train --holdout-first n`` keeps out of training."""
    return [r for r in requests if r.target_true is not None][:n]
