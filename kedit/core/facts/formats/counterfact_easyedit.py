"""CounterFact as EasyEdit ships it: flat records with ``ground_truth``, ``rephrase_prompt`` and one locality pair."""

from __future__ import annotations

from typing import Any

from kedit.core.facts.validate import require_keys

NAME = "counterfact-easyedit"

KEYS = {
    "case_id",
    "prompt",
    "target_new",
    "subject",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
}


def recognise(record: Any) -> bool:
    return isinstance(record, dict) and "ground_truth" in record and "rephrase_prompt" in record


def convert(rec: Any, index: int) -> list[dict]:
    rec = require_keys(rec, KEYS)
    loc, loc_ans = rec.get("locality_prompt"), rec.get("locality_ground_truth")
    neighborhood = [{"prompt": loc, "answer": loc_ans}] if loc is not None or loc_ans is not None else None
    return [
        {
            "id": f"cf-{rec.get('case_id', index)}",
            "subject": rec.get("subject"),
            "prompt": rec.get("prompt"),
            "target_new": rec.get("target_new"),
            "target_true": rec.get("ground_truth"),
            "paraphrase_prompts": rec.get("rephrase_prompt"),
            "neighborhood": neighborhood,
        }
    ]
