"""BalancEdit's samples: the inputs a fact's scope must take in, and the ones it must leave out.

Everything here is generated from the request itself, the batch it arrives with and the model: never from
what a benchmark scores (an editor's ``held_out`` texts are dropped, and the editor reports what it used).

- positives: the fact's prompt after the model's own generated prefixes (the context templates), in
  question and answer frames (the preset's), and without its closing punctuation;
- negatives, at the key's layer: every other token of those prompts (the subject's first tokens, the
  words after it), the same prompt about the batch's other subjects, and the other facts' keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from kedit.core.facts import EditRequest
from kedit.core.facts.schema import normalize


def _prompts(r: EditRequest, prefixes: Sequence[str]) -> list[str]:
    """``prefixes``: templates whose "{}" is the prompt, which holds the subject's "{}" in turn."""
    bare = r.prompt.rstrip(" ?.!:")
    out = [t.replace("{}", r.prompt, 1) for t in prefixes if t != "{}"]
    if "{}" in bare:  # the subject may close the prompt ("What is {}?")
        out.append(bare)
    return out


def positives(
    requests: Sequence[EditRequest], prefixes: Sequence[str], held_out: frozenset[str]
) -> tuple[list[EditRequest], list[int]]:
    """Per request, its rephrasings (as requests, so the subject's position is known) and the request each
    belongs to; duplicates, the prompt itself and held-out texts are left out."""
    out, owner = [], []
    for i, r in enumerate(requests):
        seen = {normalize(r.text)}
        for p in _prompts(r, prefixes):
            q = EditRequest(r.id, r.subject, p, r.target_new)
            key = normalize(q.text)
            if key in seen or key in held_out:
                continue
            seen.add(key)
            out.append(q)
            owner.append(i)
    return out, owner


def substitutions(requests: Sequence[EditRequest]) -> tuple[list[EditRequest], list[int]]:
    """Each request's prompt about every other subject of the batch: the same relation, another entity."""
    subjects = list(dict.fromkeys(r.subject for r in requests))
    out, owner = [], []
    for i, r in enumerate(requests):
        for s in subjects:
            if normalize(s) != normalize(r.subject):
                out.append(EditRequest(r.id, s, r.prompt, r.target_new))
                owner.append(i)
    return out, owner
