import csv
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kedit.app.bench_facts import bench_facts
from kedit.core.facts import (
    FEED_FIELDS,
    EditRequest,
    FactFileError,
    FieldError,
    format_names,
    load_facts,
    load_many,
    register_format,
    sniff_format,
    unregister_format,
)
from kedit.core.facts.validate import validate_by_hand, validate_record

SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


GOOD = {"subject": "Twitter", "prompt": "{} is owned by", "target_new": "X Corp.", "target_true": "Twitter, Inc."}


def test_valid_feed_loads_with_subject_spelled_out(tmp_path):
    p = write_jsonl(
        tmp_path / "f.jsonl", [dict(GOOD, id="a"), {"subject": "Paris", "prompt": "Paris is in", "target_new": "Italy"}]
    )
    fs = load_facts(p)
    assert fs.summary() == "2 records: 2 accepted, 0 quarantined, 0 superseded"
    assert fs.accepted[1].prompt == "{} is in" and fs.accepted[1].text == "Paris is in"
    assert fs.accepted[1].id.startswith("fact-")  # derived from content when absent


@pytest.mark.parametrize(
    "record, field, reason",
    [
        (dict(GOOD, prompt="The owner is"), "prompt", "not in prompt"),
        (dict(GOOD, target_new="  "), "target_new", "missing or empty"),
        (dict(GOOD, target_new="twitter,  INC."), "target_new", "equal to target_true"),
        (dict(GOOD, colour="red"), "colour", "unknown field"),
        (dict(GOOD, subject="x" * 5000, prompt="{} is"), "subject", "oversized"),
        (dict(GOOD, target_new=7), "target_new", "expected a string"),
        (dict(GOOD, timestamp="yesterday"), "timestamp", "ISO 8601"),
        (dict(GOOD, neighborhood=[{"prompt": "a"}]), "neighborhood[0]", "exactly 'prompt' and 'answer'"),
        (dict(GOOD, paraphrase_prompts=["ok", ""]), "paraphrase_prompts[1]", "missing or empty"),
        (dict(GOOD, prompt="{} and {}"), "prompt", "more than one"),
        ("[1, 2]", "<record>", "expected a JSON object"),
        ("{not json", "<record>", "invalid JSON"),
    ],
)
def test_bad_records_are_quarantined_with_line_field_and_reason(tmp_path, record, field, reason):
    p = write_jsonl(tmp_path / "feed.jsonl", [dict(GOOD, id="ok"), record])
    fs = load_facts(p)
    assert [r.id for r in fs.accepted] == ["ok"]
    (q,) = fs.quarantined
    assert (q.file, q.line, q.field) == (str(p), 2, field)
    assert reason in q.reason
    assert str(q).startswith(f"{p}:2: field {field!r}")
    assert fs.accounted


def test_bad_utf8_line_is_quarantined_and_the_rest_loads(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_bytes(
        json.dumps(dict(GOOD, id="a")).encode()
        + b"\n"
        + b'{"subject": "\xff\xfe"}\n'
        + json.dumps(dict(GOOD, id="b", subject="X", prompt="{} is")).encode()
    )
    fs = load_facts(p)
    assert [r.id for r in fs.accepted] == ["a", "b"]
    assert fs.quarantined[0].line == 2 and "UTF-8" in fs.quarantined[0].reason


def test_later_timestamp_supersedes_earlier(tmp_path):
    recs = [
        dict(GOOD, id="new", target_new="X Holdings", timestamp="2024-03-01T00:00:00Z"),
        dict(GOOD, id="old", target_new="X Corp.", timestamp="2023-07-24"),
        dict(GOOD, id="other", subject="Facebook", target_new="Meta", timestamp="2021-10-28"),
    ]
    fs = load_facts(write_jsonl(tmp_path / "f.jsonl", recs))
    assert [r.id for r in fs.accepted] == ["other", "new"]  # ordered by timestamp
    (s,) = fs.superseded
    assert (s.request.id, s.by, s.line) == ("old", "new", 2)
    out = fs.write_quarantine(tmp_path / "out")
    assert out.read_text() == ""
    assert json.loads((tmp_path / "out" / "superseded.jsonl").read_text())["superseded_by"] == "new"


def test_duplicate_ids_are_quarantined(tmp_path):
    fs = load_facts(write_jsonl(tmp_path / "f.jsonl", [dict(GOOD, id="a"), dict(GOOD, id="a", subject="Y", prompt="{} is")]))
    assert len(fs.accepted) == 1 and fs.quarantined[0].field == "id" and "first at line 1" in fs.quarantined[0].reason


def test_csv_feed(tmp_path):
    p = tmp_path / "f.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "subject", "prompt", "target_new", "paraphrase_prompts", "neighborhood"])
        w.writerow(
            [
                "a",
                "Twitter",
                "{} is owned by",
                "X Corp.",
                "Who owns Twitter? | Twitter belongs to",
                '[{"prompt": "YouTube is owned by", "answer": "Google"}]',
            ]
        )
        w.writerow(["b", "Paris", "{} is in", "", "", ""])
        w.writerow(["c", "Rome"])
    fs = load_facts(p)
    assert [r.id for r in fs.accepted] == ["a"]
    assert fs.accepted[0].paraphrase_prompts == ("Who owns Twitter?", "Twitter belongs to")
    assert fs.accepted[0].neighborhood[0].answer == "Google"
    assert [(q.line, q.field) for q in fs.quarantined] == [(3, "target_new"), (4, "<record>")]


def test_csv_unknown_column_rejects_every_row(tmp_path):
    p = tmp_path / "f.csv"
    p.write_text("subject,prompt,target_new,colour\nA,{} is,b,red\nC,{} is,d,blue\n", encoding="utf-8")
    fs = load_facts(p)
    assert not fs.accepted and [q.field for q in fs.quarantined] == ["colour", "colour"] and fs.accounted


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FactFileError, match="no such file"):
        load_facts(tmp_path / "nope.jsonl")
    with pytest.raises(FactFileError, match="unknown format 'xml'"):
        load_facts(write_jsonl(tmp_path / "f.jsonl", [GOOD]), fmt="xml")


def test_broken_json_array_reports_the_line(tmp_path):
    p = tmp_path / "cf.json"
    p.write_text('[\n{"subject": "A", "prompt": "{} is", "target_new": "b"},\n{"subject": oops}\n]')
    fs = load_facts(p)
    assert len(fs.accepted) == 1 and fs.quarantined[0].line == 3 and fs.accounted


def test_supersession_across_feeds(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [dict(GOOD, id="a1", timestamp="2023-01-01")])
    b = write_jsonl(tmp_path / "b.jsonl", [dict(GOOD, id="b1", target_new="X Holdings", timestamp="2024-01-01")])
    fs = load_many([b, a])
    assert [r.id for r in fs.accepted] == ["b1"] and fs.superseded[0].request.id == "a1" and fs.accounted


def test_round_trip_through_the_canonical_schema():
    r = EditRequest.from_dict(dict(GOOD, id="z", paraphrase_prompts=["p {}"], timestamp="2024-05-01T10:00:00+02:00"))
    assert EditRequest.from_dict(r.to_dict()) == r


# ---------------------------------------------------------------- the shared research data sets


@pytest.mark.parametrize(
    "path, n, first_id",
    [
        ("counterfact/counterfact_500.rome.json", 500, "cf-20952"),
        ("counterfact/counterfact-edit.easyedit.json", 10000, "cf-0"),
        ("zsre/zsre_eval_1037.json", 1037, "zsre-0"),
        ("mquake/MQuAKE-hard.json", 429 * 4, None),
    ],
)
def test_research_formats_load_and_account_for_every_record(path, n, first_id):
    if not (SHARED / path).exists():
        pytest.skip("../shared/data not present")
    fs = load_facts(SHARED / path)
    assert fs.n_records == n and fs.accounted
    assert len(fs.accepted) > 0.4 * n  # MQuAKE cases share rewrites: repeats are superseded
    assert {s.by for s in fs.superseded} <= {r.id for r in fs.accepted}
    if first_id:
        assert first_id in {r.id for r in fs.accepted[:5]}
    r = fs.accepted[0]
    assert "{}" in r.prompt and r.target_new and r.target_true


# ---------------------------------------------------------------- property tests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "{}",
            "{} {}",
            "",
            " ",
            "\x00",
            "\u202e",
            "{0}",
            "x" * 3000,
            "é" * 300,
            "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape"),
        ]
    ),
)
feed_record = st.dictionaries(
    st.sampled_from(FEED_FIELDS + ("extra", "Subject")),
    st.one_of(hostile_text, json_values, st.lists(hostile_text, max_size=3)),
    max_size=8,
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(records=st.lists(feed_record, max_size=12), garbage=st.lists(st.binary(max_size=60), max_size=4))
def test_jsonl_loader_never_crashes_and_never_loses_a_record(tmp_path, records, garbage):
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogateescape") for r in records] + [
        g.replace(b"\n", b" ") for g in garbage
    ]
    p = tmp_path / "h.jsonl"
    data = b"\n".join(lines)
    p.write_bytes(data)
    fs = load_facts(p, fmt="feed")
    assert fs.accounted
    # a byte-order mark opening the file is not content; every other non-blank line is one record
    assert fs.n_records == sum(1 for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip())


one_line_text = hostile_text.filter(lambda t: "\n" not in t and "\r" not in t)


@SETTINGS
@given(rows=st.lists(st.lists(one_line_text, min_size=0, max_size=6), max_size=10))
def test_csv_loader_never_crashes_and_never_loses_a_record(tmp_path, rows):
    p = tmp_path / "h.csv"
    with p.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["subject", "prompt", "target_new", "target_true", "id"])
        w.writerows(rows)
    fs = load_facts(p)
    assert fs.accounted
    assert fs.n_records == sum(1 for r in rows if any(c.strip() for c in r))


@SETTINGS
@given(rows=st.lists(st.lists(hostile_text, min_size=1, max_size=6), max_size=10))
def test_csv_every_physical_line_is_one_outcome_even_when_fields_hold_newlines(tmp_path, rows):
    p = tmp_path / "h.csv"
    with p.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["subject", "prompt", "target_new", "target_true", "id"])
        w.writerows(rows)
    fs = load_facts(p)
    lines = p.read_bytes().split(b"\n")[1:]
    assert fs.accounted
    assert fs.n_records == len(lines) - sum(1 for line in lines if _holds_nothing(line))


def _holds_nothing(line: bytes) -> bool:
    """The one kind of line a CSV feed may skip: empty, or well-formed cells that are all blank."""
    if not line.strip():
        return True
    try:
        (row,) = csv.reader([line.decode("utf-8")], strict=True)
    except (UnicodeDecodeError, csv.Error, ValueError):
        return False
    return all(not c.strip() for c in row)


@SETTINGS
@given(blob=st.binary(max_size=300))
def test_any_bytes_as_a_json_array_file(tmp_path, blob):
    p = tmp_path / "h.json"
    p.write_bytes(b"[" + blob)
    assert load_facts(p).accounted


def test_ids_are_unique_per_feed_and_facts_are_told_apart_by_content(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [dict(GOOD, id="x")])
    b = write_jsonl(
        tmp_path / "b.jsonl", [dict(GOOD, id="y", subject="Y", prompt="{} is"), dict(GOOD, id="x", subject="Z", prompt="{} is")]
    )
    fs = load_many([a, b])
    # a producer may number every feed from 1: the second "x" is another fact, not a duplicate
    assert sorted(r.id for r in fs.accepted) == ["x", "x", "y"] and fs.accounted and not fs.quarantined
    assert sorted(r.subject for r in fs.accepted if r.id == "x") == ["Twitter", "Z"]
    assert len({r.key for r in fs.accepted}) == 3
    assert fs.origins[next(r.key for r in fs.accepted if r.subject == "Z")] == (str(b), 2)
    # within one feed an id is still unique
    c = write_jsonl(tmp_path / "c.jsonl", [dict(GOOD, id="x"), dict(GOOD, id="x", subject="Z", prompt="{} is")])
    (q,) = load_facts(c).quarantined
    assert (q.line, q.field) == (2, "id") and "first at line 1" in q.reason


# ---------------------------------------------------------------- the format registry


def test_the_format_registry_refuses_a_name_taken():
    for name in ("feed", "counterfact", "auto"):
        with pytest.raises(ValueError, match="already registered"):
            register_format(name, lambda rec, index: [rec])
    assert format_names()[0] == "auto" and {"feed", "counterfact", "counterfact-easyedit", "zsre", "mquake"} <= set(
        format_names()
    )


def _toy_convert(rec, index):
    """A toy format, as one module would declare it: ``{"toy": subject, "q": prompt, "a": answer}``."""
    if set(rec) != {"toy", "q", "a"}:
        raise FieldError("<record>", "expected exactly toy, q, a")
    return [{"id": f"toy-{index}", "subject": rec["toy"], "prompt": rec["q"], "target_new": rec["a"]}]


@pytest.fixture
def toy_format():
    register_format("toy", _toy_convert, lambda rec: isinstance(rec, dict) and "toy" in rec)
    yield "toy"
    unregister_format("toy")


def test_a_registered_format_is_sniffed_and_loaded(tmp_path, toy_format):
    p = write_jsonl(
        tmp_path / "toy.jsonl", [{"toy": "Rome", "q": "{} is in", "a": "France"}, {"toy": "Oslo", "q": "?", "a": "b"}]
    )
    assert sniff_format({"toy": "Rome"}) == "toy" and sniff_format(GOOD) == "feed"
    assert "toy" in format_names()
    for fmt in ("auto", "toy"):
        fs = load_facts(p, fmt=fmt)
        assert [r.id for r in fs.accepted] == ["toy-0"] and fs.accepted[0].text == "Rome is in"
        assert [(q.line, q.field) for q in fs.quarantined] == [(2, "prompt")] and fs.accounted


def test_an_unregistered_format_is_gone(tmp_path):
    register_format("toy2", _toy_convert, lambda rec: isinstance(rec, dict) and "toy" in rec)
    unregister_format("toy2")
    assert "toy2" not in format_names() and sniff_format({"toy": "x"}) == "feed"
    with pytest.raises(FactFileError, match="unknown format 'toy2'"):
        load_facts(write_jsonl(tmp_path / "f.jsonl", [GOOD]), fmt="toy2")


# ---------------------------------------------------------------- pydantic errors -> field names

NB = {"prompt": "YouTube is owned by", "answer": "Google"}


@pytest.mark.parametrize(
    "record, field, reason",
    [
        (dict(GOOD, neighborhood=[NB, NB, dict(NB, answer=" ")]), "neighborhood[2].answer", "missing or empty"),
        (dict(GOOD, neighborhood=[NB, dict(NB, prompt=3)]), "neighborhood[1].prompt", "expected a string, got int"),
        (dict(GOOD, neighborhood=[NB, NB, NB, {"prompt": "a", "answer": "b", "x": 1}]), "neighborhood[3]", "exactly"),
        (dict(GOOD, neighborhood=[NB, "YouTube"]), "neighborhood[1]", "exactly 'prompt' and 'answer'"),
        (dict(GOOD, neighborhood=[NB] * 65), "neighborhood", "oversized: 65 items"),
        (dict(GOOD, neighborhood={"prompt": "a"}), "neighborhood", "got dict"),
        (dict(GOOD, generation_prompts=["ok", "ok", None]), "generation_prompts[2]", "missing or empty"),
        (dict(GOOD, paraphrase_prompts=["a\x00"]), "paraphrase_prompts[0]", "NUL"),
        (dict(GOOD, target_true="x" * 300), "target_true", "oversized: 300 characters (limit 200)"),
        (dict(GOOD, target_new="\udcff"), "target_new", "invalid UTF-8"),
        (dict(GOOD, id=True), "id", "expected a string, got bool"),
        (dict(GOOD, timestamp=20240101), "timestamp", "expected an ISO 8601 string, got int"),
        ({"prompt": "{} is", "target_new": "b"}, "subject", "missing or empty"),
        (dict(GOOD, zz=1, aa=2), "zz", "unknown field"),  # the first unknown one, as written
        # several problems: the one the checks meet first (subject, prompt, targets, timestamp, id, lists, source)
        (dict(GOOD, prompt="The owner is", target_new=7, timestamp="x"), "prompt", "not in prompt"),
        (dict(GOOD, target_new="Twitter, Inc.", timestamp="x"), "target_new", "equal to target_true"),
        (dict(GOOD, source=5, paraphrase_prompts=[1]), "paraphrase_prompts[0]", "expected a string"),
    ],
)
def test_pydantic_error_locations_become_field_names(tmp_path, record, field, reason):
    p = tmp_path / "feed.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [dict(GOOD, id="ok"), record]), encoding="utf-8")  # \udcff escaped
    fs = load_facts(p)
    (q,) = fs.quarantined
    assert (q.file, q.line, q.field) == (str(p), 2, field) and reason in q.reason
    for validate in (validate_record, validate_by_hand):
        with pytest.raises(FieldError) as e:
            validate(record, "")
        assert (e.value.field, e.value.reason) == (q.field, q.reason)


canonical_record = st.fixed_dictionaries(
    {},
    optional={name: st.one_of(hostile_text, st.none(), st.integers(), st.lists(hostile_text, max_size=3)) for name in FEED_FIELDS}
    | {
        "neighborhood": st.lists(
            st.one_of(
                st.dictionaries(st.sampled_from(["prompt", "answer", "x"]), st.one_of(hostile_text, st.none(), st.integers())),
                hostile_text,
            ),
            max_size=4,
        ),
        "timestamp": st.sampled_from(["2024-01-01", "2024-01-01T10:00:00+02:00", "x", 3, None, ""]),
        "colour": st.just("red"),
    },
)


@SETTINGS
@given(record=st.one_of(feed_record, st.builds(lambda extra: {**GOOD, **extra}, canonical_record)))
def test_the_pydantic_model_and_the_hand_written_checks_agree(record):
    def outcome(validate):
        try:
            return validate(record, "origin")
        except FieldError as e:
            return (e.field, e.reason)

    assert outcome(validate_record) == outcome(validate_by_hand)


@pytest.mark.parametrize("path", ["counterfact/counterfact_500.rome.json", "zsre/zsre_eval_1037.json", "mquake/MQuAKE-hard.json"])
def test_research_formats_load_the_same_with_either_validator(path):
    if not (SHARED / path).exists():
        pytest.skip("../shared/data not present")
    new, old = load_facts(SHARED / path), load_facts(SHARED / path, validate=validate_by_hand)
    assert new.accepted == old.accepted and new.quarantined == old.quarantined and new.superseded == old.superseded


def test_bench_facts_old_and_new_agree(tmp_path):
    out = bench_facts(2000, tmp_path / "bench.json", repeats=1)
    assert json.loads((tmp_path / "bench.json").read_text()) == out
    assert out["same_accepted_ids"] and out["same_quarantine_triples"] and out["same_quarantine_reasons"]
    assert out["same_superseded"] and out["accounted"]
    assert out["n_accepted"] > 1500 and out["n_quarantined"] > 100 and out["n_superseded"] > 0
    assert {"neighborhood[2].answer", "neighborhood[1]", "colour", "<record>"} <= set(out["quarantined_by_field"])
