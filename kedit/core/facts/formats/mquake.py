"""MQuAKE: a case holds a list of rewrites (CounterFact-style); each becomes one edit request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.core.facts.formats.counterfact import REWRITE_KEYS
from kedit.core.facts.schema import EditRequest, FactFileError, FieldError
from kedit.core.facts.validate import require_keys, str_of, text, validate_record

NAME = "mquake"

KEYS = {
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


def recognise(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("requested_rewrite"), list)


def convert(rec: Any, index: int) -> list[dict]:
    rec = require_keys(rec, KEYS)
    rws = rec.get("requested_rewrite")
    if not isinstance(rws, list) or not rws:
        raise FieldError("requested_rewrite", "expected a non-empty list of rewrites")
    out = []
    for j, rw in enumerate(rws):
        rw = require_keys(rw, REWRITE_KEYS, f"requested_rewrite[{j}]")
        q = rw.get("question")
        out.append(
            {
                "id": f"mquake-{rec.get('case_id', index)}-{j}",
                "subject": rw.get("subject"),
                "prompt": rw.get("prompt"),
                "target_new": str_of(rw.get("target_new"), f"requested_rewrite[{j}].target_new"),
                "target_true": str_of(rw.get("target_true"), f"requested_rewrite[{j}].target_true"),
                "paraphrase_prompts": [q] if q else None,
            }
        )
    return out


@dataclass(frozen=True)
class MultiHopCase:
    """One MQuAKE case: its rewrites as edit requests, and the multi-hop questions whose answer they change."""

    case_id: str
    requests: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    answer: str  # before the edits
    new_answer: str  # after all of the case's edits


def load_multihop(path: str | Path, limit: int | None = None) -> list[MultiHopCase]:
    """The cases of an MQuAKE file (``MQuAKE-hard.json``), each with its requests validated as any feed record;
    an invalid case is an error naming the file, the case and the field."""
    path = Path(path)
    from kedit.core.facts.load import read_fact_file  # load imports the formats

    data = json.loads(read_fact_file(path).decode("utf-8"))
    if not isinstance(data, list):
        raise FactFileError(f"{path}: expected a JSON list of MQuAKE cases")
    cases = []
    for index, rec in enumerate(data[:limit] if limit is not None else data):
        where = f"{path}: case {index}"
        try:
            requests = tuple(validate_record(d, str(path)) for d in convert(rec, index))
            questions = tuple(text({"questions": q}, "questions") for q in rec.get("questions") or [])
            answer, new_answer = text(rec, "answer"), text(rec, "new_answer")
        except FieldError as e:
            raise FactFileError(f"{where}: field {e.field!r}: {e.reason}") from None
        if not questions:
            raise FactFileError(f"{where}: field 'questions': no multi-hop question")
        cases.append(MultiHopCase(str(rec.get("case_id", index)), requests, questions, answer, new_answer))
    return cases
