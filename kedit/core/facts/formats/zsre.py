"""zsRE (MEND / EasyEdit evaluation split): ``src`` question, ``alt`` new answer, ``answers``, one ``loc`` pair."""

from __future__ import annotations

from typing import Any

from kedit.core.facts.schema import FieldError
from kedit.core.facts.validate import require_keys

NAME = "zsre"

KEYS = {"case_id", "subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond", "portability"}


def recognise(record: Any) -> bool:
    return isinstance(record, dict) and "src" in record and "alt" in record


def convert(rec: Any, index: int) -> list[dict]:
    rec = require_keys(rec, KEYS)
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
