"""MQuAKE: a case holds a list of rewrites (CounterFact-style); each becomes one edit request."""

from __future__ import annotations

from typing import Any

from kedit.core.facts.formats.counterfact import REWRITE_KEYS
from kedit.core.facts.schema import FieldError
from kedit.core.facts.validate import require_keys, str_of

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
