"""CounterFact as ROME ships it: ``requested_rewrite`` is one object with ``{"str": ...}`` targets."""

from __future__ import annotations

from typing import Any

from kedit.core.facts.schema import FieldError
from kedit.core.facts.validate import require_keys, str_of

NAME = "counterfact"

KEYS = {
    "case_id",
    "pararel_idx",
    "requested_rewrite",
    "paraphrase_prompts",
    "neighborhood_prompts",
    "attribute_prompts",
    "generation_prompts",
}
REWRITE_KEYS = {"prompt", "relation_id", "target_new", "target_true", "subject", "question"}  # also MQuAKE's


def recognise(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("requested_rewrite"), dict)


def convert(rec: Any, index: int) -> list[dict]:
    rec = require_keys(rec, KEYS)
    rw = require_keys(rec.get("requested_rewrite"), REWRITE_KEYS, "requested_rewrite")
    true = str_of(rw.get("target_true"), "requested_rewrite.target_true")
    neighbors = rec.get("neighborhood_prompts") or []
    if not isinstance(neighbors, list):
        raise FieldError("neighborhood_prompts", "expected a list")
    return [
        {
            "id": f"cf-{rec.get('case_id', index)}",
            "subject": rw.get("subject"),
            "prompt": rw.get("prompt"),
            "target_new": str_of(rw.get("target_new"), "requested_rewrite.target_new"),
            "target_true": true,
            "paraphrase_prompts": rec.get("paraphrase_prompts"),
            "neighborhood": [{"prompt": p, "answer": true} for p in neighbors],
            "generation_prompts": rec.get("generation_prompts"),
        }
    ]
