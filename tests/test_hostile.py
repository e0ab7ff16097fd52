"""The hostile-feed corpus: files a careless or hostile producer could send, each with its stated outcome.

Every case ends in exactly what it states (records accepted, quarantined with the field and a reason,
superseded, or the file refused with a reason) and the accounting adds up: every record that entered
is in exactly one list. The property tests at the end check that loading never loses a row silently.
The serving layer's cases (a symlink out of the feeds directory, path traversal in an event,
configuration overrides in an event) are in tests/test_confine.py.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kedit.core.facts import FactFileError, Limits, load_facts, load_many

OK = {"subject": "Norway", "prompt": "The capital of {} is", "target_new": "Bergen", "target_true": "Oslo"}


def rec(**changes) -> dict:
    return {**OK, **changes}


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def csv_file(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


HEADER = "id,subject,prompt,target_new,target_true"
CSV_OK = ["a2,Sweden,The capital of {} is,Malmo,Stockholm", "a3,Peru,The capital of {} is,Cusco,Lima"]


@dataclass
class Case:
    name: str
    file: str  # file name in the test's directory
    content: bytes | Callable[[Path], None] | None  # bytes, or a function that makes the path
    accepted: int = 0
    quarantined: list[tuple[int, str, str]] = field(default_factory=list)  # (line, field, reason fragment)
    superseded: int = 0
    refused: str | None = None  # a fragment of the reason the whole file is refused
    limits: Limits = field(default_factory=Limits)


def fifo(path: Path) -> None:
    os.mkfifo(path)


def directory(path: Path) -> None:
    path.mkdir()


def link_to_a_feed(path: Path) -> None:
    (path.parent / "real.jsonl").write_bytes(jsonl(rec()))
    path.symlink_to(path.parent / "real.jsonl")


CASES = [
    # ---- JSON lines: syntax and encoding
    Case("truncated JSON", "a.jsonl", jsonl(rec(), b'{"subject": "Peru", "prompt'), 1, [(2, "<record>", "invalid JSON")]),
    Case("bad UTF-8 bytes", "a.jsonl", jsonl(b'{"subject": "Nor\xffway"}', rec()), 1, [(1, "<record>", "invalid UTF-8")]),
    Case("lone surrogate escape", "a.jsonl", jsonl(rec(subject="Nor\ud800way")), 0, [(1, "subject", "invalid UTF-8")]),
    Case("NUL escape in a field", "a.jsonl", jsonl(rec(subject="Nor\x00way")), 0, [(1, "subject", "NUL")]),
    Case("raw NUL byte in a line", "a.jsonl", jsonl(b'{"subject": "N\x00"}'), 0, [(1, "<record>", "invalid JSON")]),
    Case("byte-order mark", "a.jsonl", b"\xef\xbb\xbf" + jsonl(rec()), 1),
    Case("CRLF line ends", "a.jsonl", jsonl(rec()).replace(b"\n", b"\r\n") * 1, 1),
    Case("deep nesting", "a.jsonl", jsonl(b"[" * 100_000 + b"]" * 100_000), 0, [(1, "<record>", "invalid JSON")]),
    Case("huge line", "a.jsonl", jsonl(rec(), rec(subject="x" * 300_000)), 1, [(2, "<record>", "oversized record")]),
    Case("field over its limit", "a.jsonl", jsonl(rec(target_new="x" * 201)), 0, [(1, "target_new", "oversized")]),
    Case(
        "not an object",
        "a.jsonl",
        jsonl([1, 2], 7, "x"),
        0,
        [(1, "<record>", "object"), (2, "<record>", "object"), (3, "<record>", "object")],
    ),
    Case("unknown field", "a.jsonl", jsonl(rec(admin=True)), 0, [(1, "admin", "unknown field")]),
    Case("blank lines only", "a.jsonl", b"\n  \n\t\n", 0),
    Case("empty file", "a.jsonl", b"", 0),
    # ---- ids
    Case("duplicate id in a feed", "a.jsonl", jsonl(rec(id="1"), rec(id="1", subject="Peru")), 1, [(2, "id", "duplicate id")]),
    Case("numeric id", "a.jsonl", jsonl(rec(id=7)), 0, [(1, "id", 'quote numeric ids: "7"')]),
    Case(
        "7 and '7' do not collide", "a.jsonl", jsonl(rec(id=7), rec(id="7", subject="Peru")), 1, [(1, "id", "expected a string")]
    ),
    Case("invisible character in an id", "a.jsonl", jsonl(rec(id="a\u200bb")), 0, [(1, "id", "invisible character (U+200B)")]),
    # ---- text that displays differently from what the model reads
    Case("right-to-left override in a subject", "a.jsonl", jsonl(rec(subject="Nor\u202eway")), 0, [(1, "subject", "U+202E")]),
    Case(
        "zero-width space in a subject", "a.jsonl", jsonl(rec(subject="Ira\u200bn")), 0, [(1, "subject", "invisible character")]
    ),
    Case("terminal escape in a target", "a.jsonl", jsonl(rec(target_new="\x1b[31mBergen")), 0, [(1, "target_new", "U+001B")]),
    Case("newline in a prompt", "a.jsonl", jsonl(rec(prompt="The capital\nof {} is")), 0, [(1, "prompt", "U+000A")]),
    # a paraphrase is context the model reads: CounterFact's put a sentence, a line feed (once a tab), then the question
    Case("line feed and tab in a paraphrase", "a.jsonl", jsonl(rec(paraphrase_prompts=["Noise.\nok", "a\tb"])), 1),
    Case(
        "carriage return in a paraphrase",
        "a.jsonl",
        jsonl(rec(paraphrase_prompts=["ok", "a\rb"])),
        0,
        [(1, "paraphrase_prompts[1]", "U+000D")],
    ),
    Case("zero-width joiner in a target is kept", "a.jsonl", jsonl(rec(target_new="\U0001f469\u200d\U0001f52c")), 1),
    # ---- meaning
    Case(
        "subject inside another word",
        "a.jsonl",
        jsonl(rec(subject="Ira", prompt="The capital of Iran is")),
        0,
        [(1, "prompt", "whole word")],
    ),
    Case("subject as a whole word", "a.jsonl", jsonl(rec(subject="Iran", prompt="The capital of Iran is")), 1),
    Case("two placeholders", "a.jsonl", jsonl(rec(prompt="{} and {} is")), 0, [(1, "prompt", "more than one")]),
    Case("nothing to edit", "a.jsonl", jsonl(rec(target_new="oslo ")), 0, [(1, "target_new", "nothing to edit")]),
    Case("missing subject", "a.jsonl", jsonl({k: v for k, v in OK.items() if k != "subject"}), 0, [(1, "subject", "missing")]),
    Case(
        "timestamp far in the future",
        "a.jsonl",
        jsonl(rec(timestamp="9999-12-31T00:00:00Z")),
        0,
        [(1, "timestamp", "in the future")],
    ),
    Case("timestamp not a date", "a.jsonl", jsonl(rec(timestamp="yesterday")), 0, [(1, "timestamp", "ISO 8601")]),
    Case(
        "too many paraphrases",
        "a.jsonl",
        jsonl(rec(paraphrase_prompts=["{} x"] * 65)),
        0,
        [(1, "paraphrase_prompts", "oversized")],
    ),
    Case(
        "neighbour of the wrong shape",
        "a.jsonl",
        jsonl(rec(neighborhood=[{"prompt": "x"}])),
        0,
        [(1, "neighborhood[0]", "exactly")],
    ),
    Case(
        "a later update supersedes",
        "a.jsonl",
        jsonl(rec(timestamp="2024-01-01"), rec(target_new="Tromso", timestamp="2025-01-01")),
        1,
        superseded=1,
    ),
    # ---- CSV
    Case(
        "unterminated quote",
        "a.csv",
        csv_file(HEADER, 'a1,Norway,The capital of {} is,"Bergen,Oslo', *CSV_OK),
        2,
        [(2, "<record>", "unreadable CSV row")],
    ),
    Case(
        "newline inside a quoted field",
        "a.csv",
        csv_file(HEADER, 'a1,Norway,"The capital', 'of {} is",Bergen,Oslo', *CSV_OK),
        2,
        [(2, "<record>", "unreadable CSV row"), (3, "<record>", "inside the quoted field opened at line 2")],
    ),
    Case(
        "formula cell",
        "a.csv",
        csv_file(HEADER, 'a1,Norway,The capital of {} is,"=HYPERLINK(""http://x"")",Oslo', *CSV_OK),
        2,
        [(2, "target_new", "spreadsheet formula")],
    ),
    Case(
        "@ formula cell",
        "a.csv",
        csv_file(HEADER, "a1,@SUM(A1),The capital of {} is,Bergen,Oslo"),
        0,
        [(2, "subject", "spreadsheet formula")],
    ),
    Case("signed number is not a formula", "a.csv", csv_file(HEADER, "a1,Norway,The temperature of {} is,-5,+3"), 1),
    Case("CSV byte-order mark", "a.csv", b"\xef\xbb\xbf" + csv_file(HEADER, *CSV_OK), 2),
    Case(
        "CSV wrong column count",
        "a.csv",
        csv_file(HEADER, "a1,Norway,The capital of {} is", *CSV_OK),
        2,
        [(2, "<record>", "expected 5 columns")],
    ),
    Case(
        "CSV unknown column",
        "a.csv",
        csv_file("id,subject,prompt,target_new,evil", "a1,Norway,The capital of {} is,Bergen,x"),
        0,
        [(2, "evil", "unknown field")],
    ),
    Case(
        "CSV duplicate column",
        "a.csv",
        csv_file("id,subject,prompt,target_new,id", "a1,Norway,The capital of {} is,Bergen,b"),
        0,
        [(2, "id", "duplicate CSV column")],
    ),
    Case(
        "CSV bad UTF-8",
        "a.csv",
        csv_file(HEADER) + b"a1,Nor\xffway,The capital of {} is,Bergen,Oslo\n",
        0,
        [(2, "<record>", "invalid UTF-8")],
    ),
    Case(
        "CSV control character",
        "a.csv",
        csv_file(HEADER, "a1,Norway,The capital of {} is,Ber\x1bgen,Oslo"),
        0,
        [(2, "target_new", "U+001B")],
    ),
    Case("CSV header only", "a.csv", csv_file(HEADER), 0),
    # ---- JSON arrays
    Case("unterminated JSON array", "a.json", b"[" + json.dumps(OK).encode(), 1, [(1, "<file>", "unterminated JSON array")]),
    Case(
        "garbage after an array item",
        "a.json",
        b"[" + json.dumps(OK).encode() + b" x, {}]",
        1,
        [(1, "<record>", "rest unreadable")],
    ),
    # ---- the file itself
    Case("FIFO", "a.jsonl", fifo, refused="not a regular file"),
    Case("directory", "a.jsonl", directory, refused="is a directory"),
    Case("symbolic link", "a.jsonl", link_to_a_feed, refused="is a symbolic link"),
    Case("missing file", "a.jsonl", None, refused="no such file"),
    Case(
        "file over the size limit",
        "a.jsonl",
        jsonl(rec(), rec(subject="Peru")),
        refused="over the file_bytes limit",
        limits=Limits(file_bytes=100),
    ),
    Case(
        "more records than the limit",
        "a.jsonl",
        jsonl(rec(), rec(subject="Peru"), rec(subject="Chile")),
        refused="more than 2 records",
        limits=Limits(records=2),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_hostile_file_ends_in_its_stated_outcome(tmp_path, case):
    path = tmp_path / case.file
    if isinstance(case.content, bytes):
        path.write_bytes(case.content)
    elif case.content is not None:
        case.content(path)
    if case.refused is not None:
        with pytest.raises(FactFileError, match=case.refused):
            load_facts(path, limits=case.limits)
        refused: dict[str, str] = {}
        fs = load_many([path], unreadable=refused, limits=case.limits)
        assert case.refused in refused[str(path)] and fs.refused == refused and fs.n_records == 0
        return
    fs = load_facts(path, limits=case.limits)
    assert fs.accounted, fs.summary()
    assert len(fs.accepted) == case.accepted, fs.quarantined
    assert len(fs.superseded) == case.superseded
    assert len(fs.quarantined) == len(case.quarantined), fs.quarantined
    for q, (line, field_name, fragment) in zip(fs.quarantined, case.quarantined):
        assert (q.file, q.line, q.field) == (str(path), line, field_name), q
        assert fragment in q.reason, q
        assert len(q.raw) <= case.limits.excerpt_chars


def test_the_corpus_is_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_an_os_error_other_than_not_found_is_a_refusal_not_a_traceback():
    with pytest.raises(FactFileError, match="cannot read"):
        load_facts("/proc/self/mem")


def test_quarantine_lists_keep_the_row_limit_per_feed_and_count_the_rest(tmp_path):
    junk, fine = tmp_path / "junk.jsonl", tmp_path / "fine.jsonl"
    junk.write_bytes(b"not json\n" * 50)
    fine.write_bytes(jsonl(rec(), rec(subject="Peru", target_new="\x1b")))
    fs = load_many([junk, fine])
    assert len(fs.quarantined) == 51 and fs.accounted
    fs.write_quarantine(tmp_path / "out", max_rows=10)
    rows = [json.loads(r) for r in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    counts = json.loads((tmp_path / "out" / "quarantine_counts.json").read_text())
    assert [r["file"] for r in rows].count(str(junk)) == 10
    assert [r["file"] for r in rows].count(str(fine)) == 1  # one feed's junk does not crowd out another's rows
    assert counts["quarantined"] == 51 and counts["quarantined_rows_omitted"] == {str(junk): 40}


def test_the_same_id_in_two_feeds_is_two_facts_and_the_same_content_is_one(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(jsonl(rec(id="1"), rec(id="2", subject="Peru")))
    b.write_bytes(jsonl(rec(id="1", subject="Chile"), rec(id="9", subject="Peru")))  # "9": Peru again, same content
    fs = load_many([a, b])
    assert fs.accounted and not fs.quarantined
    assert sorted(r.subject for r in fs.accepted) == ["Chile", "Norway", "Peru"] and len(fs.superseded) == 1
    assert fs.superseded[0].file == str(a)  # the tie goes to the later record
    winner = fs.superseded[0]
    assert (winner.by, winner.by_at) == ("9", f"{b}:2") and winner.by_key == winner.request.key  # same content, same key


# ---------------------------------------------------------------- properties: no row is ever lost silently

line_bytes = st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" "))
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(lines=st.lists(st.one_of(line_bytes, st.just(json.dumps(OK).encode())), max_size=15), bom=st.booleans())
def test_every_non_blank_line_of_a_jsonl_file_is_one_record(tmp_path, lines, bom):
    path = tmp_path / "p.jsonl"
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines)
    path.write_bytes(data)
    fs = load_facts(path, fmt="feed")
    assert fs.accounted
    # one leading byte-order mark is not content; every other non-blank line is one record
    assert fs.n_records == sum(1 for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip())


# ---------------------------------------------------------------- kedit check's exit status


@pytest.mark.parametrize(
    ("content", "status", "says"),
    [
        (jsonl(rec(), rec(subject="Peru", timestamp="2024-01-01"), rec(subject="Peru", target_new="Cusco")), 0, "1 superseded"),
        (jsonl(rec(), rec(subject="Nor\x1b[2Jway")), 1, "1 quarantined"),
        (None, 2, "no such file"),
    ],
    ids=["accepted", "quarantined", "unreadable"],
)
def test_kedit_check_exit_status_is_0_accepted_1_quarantined_2_unreadable(tmp_path, content, status, says):
    from click.testing import CliRunner

    from kedit.app.cli import cli

    path = tmp_path / "f.jsonl"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == status, result.output
    assert says in result.output
    assert "\x1b" not in result.output  # the feed's escape sequence is printed escaped, never sent to the terminal


def test_kedit_check_takes_limits_and_refuses_unknown_ones(tmp_path):
    from click.testing import CliRunner

    from kedit.app.cli import cli

    path = tmp_path / "f.jsonl"
    path.write_bytes(jsonl(rec(), rec(subject="Peru")))
    result = CliRunner().invoke(cli, ["check", "--limit", "records=1", str(path)])
    assert result.exit_code == 2 and "more than 1 records" in result.output
    result = CliRunner().invoke(cli, ["check", "--limit", "recrods=1", str(path)])
    assert result.exit_code == 2 and "unknown key 'recrods'" in result.output
