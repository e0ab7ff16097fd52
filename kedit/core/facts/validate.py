"""Turning a raw canonical (feed-schema) dict into a valid ``EditRequest``, or a ``FieldError`` naming the field.

Two validators give the same answer on every record (``tests/test_facts.py`` and
``kedit.app.bench_facts`` check it): ``validate_record``, a strict pydantic model (the one
``load_facts`` uses), and ``validate_by_hand``, the hand-written checks it
replaced, kept as the baseline of the benchmark. The helpers at the top are also used by the
format converters and by ``load_known_facts``.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from kedit.core.facts.limits import Limits
from kedit.core.facts.schema import FEED_FIELDS, EditRequest, FieldError, Neighbor, content_hash, normalize

UNKNOWN_FIELD = f"unknown field (allowed: {', '.join(FEED_FIELDS)})"
NEIGHBOR_SHAPE = "expected an object with exactly 'prompt' and 'answer'"

# ----------------------------------------------------------------------------- shared helpers


DEFAULT_LIMITS = Limits()


def excerpt(raw: Any, limits: Limits = DEFAULT_LIMITS) -> str:
    s = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return s[: limits.excerpt_chars]


# lone surrogates: undecodable bytes kept by errors="surrogateescape", or a "\\ud800" escape in JSON
_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 and C1 controls (NUL, newline, tab, ESC, DEL...), the Unicode line and paragraph separators, and the
# bidirectional controls of "Trojan Source" (embeddings, overrides, isolates, LRM/RLM, the Arabic letter
# mark): text that displays differently from what the model reads.
CONTROL_CHARS = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[{CONTROL_CHARS}]")
# Prompts that are context for the model (paraphrases, generation prompts) may break lines: CounterFact's
# paraphrases put a sentence of unrelated text, a line feed, then the question (one has a tab). LF and tab only.
_CONTROL_MULTILINE = re.compile(f"(?![\n\t])[{CONTROL_CHARS}]")
MULTILINE_FIELDS = ("paraphrase_prompts", "generation_prompts")
# Invisible characters refused in the fields that identify a fact (subject, id): "Ira\u200bn" is not "Iran".
_INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff\u00ad]")
IDENTITY_FIELDS = ("subject", "id")


def has_surrogates(s: str) -> bool:
    return _SURROGATE.search(s) is not None


def derived_id(subject: str, prompt: str, target_new: str, ts: datetime | None) -> str:
    """The id of a record that names none: from its content, like its key."""
    return "fact-" + content_hash(subject, prompt, target_new, ts)[:12]


def text_problem(v: str, limit: int, identity: bool = False, multiline: bool = False) -> str | None:
    """Why a string is not acceptable as a text field, or None (the string is already known to be a str)."""
    if has_surrogates(v):
        return "invalid UTF-8"
    bad = (_CONTROL_MULTILINE if multiline else _CONTROL).search(v)
    if bad:
        c = bad.group()
        return "contains a NUL character" if c == "\x00" else f"contains a control character (U+{ord(c):04X})"
    if identity and (bad := _INVISIBLE.search(v)):
        return f"contains an invisible character (U+{ord(bad.group()):04X})"
    if len(v) > limit:
        return f"oversized: {len(v)} characters (limit {limit})"
    return None


def text(d: dict, name: str, *, required: bool = True, limit: int = DEFAULT_LIMITS.text_chars) -> str | None:
    v = d.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise FieldError(name, "missing or empty")
        return None
    if not isinstance(v, str):
        raise FieldError(name, _not_a_string(name, v))
    problem = text_problem(v, limit, identity=name in IDENTITY_FIELDS, multiline=name in MULTILINE_FIELDS)
    if problem:
        raise FieldError(name, problem)
    return v


def _not_a_string(name: str, v: Any) -> str:
    if name == "id" and isinstance(v, (int, float)) and not isinstance(v, bool):
        # 7 and "7" would be one id: producers quote their ids
        return f'expected a string, got {type(v).__name__} (quote numeric ids: "{v}")'
    return f"expected a string, got {type(v).__name__}"


def require_keys(d: Any, allowed: set[str], where: str = "") -> dict:
    if not isinstance(d, dict):
        raise FieldError(where or "<record>", f"expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise FieldError(f"{where}.{unknown[0]}" if where else unknown[0], "unknown field")
    return d


def str_of(v: Any, name: str) -> Any:
    """CounterFact targets are ``{"str": ..., "id": ...}``; take the string."""
    if isinstance(v, dict):
        if "str" not in v:
            raise FieldError(name, "expected an object with a 'str' key")
        return v["str"]
    return v


def parse_timestamp(v: Any, future_days: float | None = None) -> datetime | None:
    """``None`` or ``""`` -> None; an ISO 8601 string -> an aware datetime (UTC when no zone); else FieldError.

    With ``future_days``, a date-time later than now plus that many days is refused: it would win every
    supersession (a 9999-12-31 update could never be replaced)."""
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise FieldError("timestamp", f"expected an ISO 8601 string, got {type(v).__name__}")
    try:
        ts = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
    except ValueError:
        raise FieldError("timestamp", f"not an ISO 8601 date-time: {v[:40]!r}") from None
    ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    if future_days is not None:
        latest = datetime.now(UTC) + timedelta(days=future_days)
        if ts > latest:
            raise FieldError("timestamp", f"in the future: {ts.isoformat()} is after {latest.isoformat(timespec='seconds')}")
    return ts


def list_problem(v: Any, what: str, limit: int) -> str | None:
    if not isinstance(v, list):
        return f"expected a list of {what}, got {type(v).__name__}"
    if len(v) > limit:
        return f"oversized: {len(v)} items (limit {limit})"
    return None


def _placeholder(subject: str, prompt: str) -> str:
    """The prompt with ``{}`` where the subject goes; raises the prompt's FieldError.

    Without a placeholder the subject must occur as a whole word: "Ira" is not the subject of
    "The capital of Iran is"."""
    if prompt.count("{}") > 1:
        raise FieldError("prompt", "has more than one '{}' placeholder")
    if "{}" not in prompt:
        found = re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", prompt)
        if found is None:
            raise FieldError("prompt", f"subject {subject!r} not in prompt as a whole word (and no '{{}}' placeholder)")
        prompt = prompt[: found.start()] + "{}" + prompt[found.end() :]
    return prompt


def _same_target(target_new: str, target_true: str | None) -> None:
    if target_true is not None and normalize(target_new) == normalize(target_true):
        raise FieldError("target_new", f"equal to target_true ({target_true!r}): nothing to edit")


# ----------------------------------------------------------------------------- by hand (the benchmark's baseline)


def _text_list(d: dict, name: str, limits: Limits) -> tuple[str, ...]:
    v = d.get(name)
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    problem = list_problem(v, "strings", limits.list_items)
    if problem:
        raise FieldError(name, problem)
    out = []
    for i, item in enumerate(v):
        try:
            out.append(text({name: item}, name, limit=limits.text_chars))
        except FieldError as e:
            raise FieldError(f"{name}[{i}]", e.reason) from None
    return tuple(out)


def _neighbors(d: dict, limits: Limits, name: str = "neighborhood") -> tuple[Neighbor, ...]:
    v = d.get(name)
    if v is None:
        return ()
    problem = list_problem(v, "{prompt, answer} objects", limits.list_items)
    if problem:
        raise FieldError(name, problem)
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, dict) or set(item) != {"prompt", "answer"}:
            raise FieldError(f"{name}[{i}]", NEIGHBOR_SHAPE)
        try:
            out.append(Neighbor(text(item, "prompt", limit=limits.text_chars), text(item, "answer", limit=limits.text_chars)))
        except FieldError as e:
            raise FieldError(f"{name}[{i}].{e.field}", e.reason) from None
    return tuple(out)


def validate_by_hand(d: dict, origin: str = "", limits: Limits = DEFAULT_LIMITS) -> EditRequest:
    """Validate a dict in the canonical (feed) schema; raises ``FieldError`` naming the field."""
    unknown = [k for k in d if k not in FEED_FIELDS]
    if unknown:
        raise FieldError(str(unknown[0]), UNKNOWN_FIELD)
    subject = text(d, "subject", limit=limits.text_chars)
    prompt = _placeholder(subject, text(d, "prompt", limit=limits.text_chars))
    target_new = text(d, "target_new", limit=limits.target_chars)
    target_true = text(d, "target_true", required=False, limit=limits.target_chars)
    _same_target(target_new, target_true)
    ts = parse_timestamp(d.get("timestamp"), limits.future_days)
    rid = text(d, "id", required=False, limit=limits.id_chars) or derived_id(subject, prompt, target_new, ts)
    return EditRequest(
        id=rid,
        subject=subject,
        prompt=prompt,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_text_list(d, "paraphrase_prompts", limits),
        neighborhood=_neighbors(d, limits),
        generation_prompts=_text_list(d, "generation_prompts", limits),
        source=text(d, "source", required=False, limit=limits.text_chars) or origin,
        timestamp=ts,
    )


# ----------------------------------------------------------------------------- pydantic
# Strict types and extra="forbid" come from pydantic; the content checks are the helpers above,
# raised as custom errors whose message is today's reason. A check that belongs to another field
# than the one it runs in (target_new equal to target_true) names it in the error's context.
# The limits are part of the types, so one model class is built per ``Limits`` (and cached).


def _fail(reason: str, field: str | None = None) -> PydanticCustomError:
    return PydanticCustomError("kedit", "{reason}", {"reason": reason, "field": field} if field else {"reason": reason})


def _checked(limit: int, identity: bool = False, multiline: bool = False):
    control = _CONTROL_MULTILINE if multiline else _CONTROL

    def check(v: str) -> str:  # text_problem, with a fast path: this runs for every string of every record
        if not v.strip():
            raise _fail("missing or empty")
        if (
            _SURROGATE.search(v) is not None
            or control.search(v) is not None
            or (identity and _INVISIBLE.search(v) is not None)
            or len(v) > limit
        ):
            raise _fail(text_problem(v, limit, identity, multiline))
        return v

    return AfterValidator(check)


def _blank_is_none(v: Any) -> Any:
    return None if isinstance(v, str) and not v.strip() else v


def _id_before(v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        raise _fail(_not_a_string("id", v))
    return _blank_is_none(v)


def _list_before(limit: int, what: str):
    def before(v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str) and what == "strings":
            v = [v]
        problem = list_problem(v, what, limit)
        if problem:
            raise _fail(problem)
        return v

    return BeforeValidator(before)


def _timestamp_before(future_days: float):
    def before(v: Any) -> Any:
        try:
            return parse_timestamp(v, future_days)
        except FieldError as e:
            raise _fail(e.reason) from None

    return BeforeValidator(before)


class _FeedRecordBase(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _subject_in_prompt(cls, prompt: str, info: ValidationInfo) -> str:
        subject = info.data.get("subject")
        if subject is None:  # the subject's own error is reported first
            return prompt
        try:
            return _placeholder(subject, prompt)
        except FieldError as e:
            raise _fail(e.reason) from None

    @field_validator("target_true", check_fields=False)
    @classmethod
    def _something_to_edit(cls, target_true: str | None, info: ValidationInfo) -> str | None:
        target_new = info.data.get("target_new")
        if target_new is not None:
            try:
                _same_target(target_new, target_true)
            except FieldError as e:
                raise _fail(e.reason, e.field) from None
        return target_true


@lru_cache(maxsize=8)
def feed_record_model(limits: Limits = DEFAULT_LIMITS) -> type[BaseModel]:
    """The strict model of one canonical record under ``limits``. Fields are declared in the order the
    checks report: the first error (after unknown fields) is the one a record is quarantined for."""
    text_t = Annotated[str, _checked(limits.text_chars)]
    target_t = Annotated[str, _checked(limits.target_chars)]
    context_t = Annotated[str, _checked(limits.text_chars, multiline=True)]  # MULTILINE_FIELDS
    text_list = Annotated[list[context_t], _list_before(limits.list_items, "strings")]

    class NeighborModel(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")

        prompt: text_t
        answer: text_t

    class FeedRecord(_FeedRecordBase):
        subject: Annotated[str, _checked(limits.text_chars, identity=True)]
        prompt: text_t
        target_new: target_t
        target_true: Annotated[target_t | None, BeforeValidator(_blank_is_none)] = None
        timestamp: Annotated[datetime | None, _timestamp_before(limits.future_days)] = None
        id: Annotated[Annotated[str, _checked(limits.id_chars, identity=True)] | None, BeforeValidator(_id_before)] = None
        paraphrase_prompts: text_list = Field(default_factory=list)
        neighborhood: Annotated[list[NeighborModel], _list_before(limits.list_items, "{prompt, answer} objects")] = Field(
            default_factory=list
        )
        generation_prompts: text_list = Field(default_factory=list)
        source: Annotated[text_t | None, BeforeValidator(_blank_is_none)] = None

    return FeedRecord


# the order of feed_record_model's fields: the order in which a record's errors are reported
CHECK_ORDER = (
    "subject", "prompt", "target_new", "target_true", "timestamp", "id",
    "paraphrase_prompts", "neighborhood", "generation_prompts", "source",
)  # fmt: skip
_ORDER = {name: i for i, name in enumerate(CHECK_ORDER)}
_NEIGHBOR_ORDER = {"prompt": 0, "answer": 1}
_SHAPE_ERRORS = {"missing", "extra_forbidden", "model_type", "dict_type", "model_attributes_type"}


def _field_error(err: dict) -> tuple[tuple, FieldError]:
    """One pydantic error as (sort key, FieldError with today's field name and reason)."""
    loc, kind, ctx, value = err["loc"], err["type"], err.get("ctx") or {}, err.get("input")
    name = str(loc[0]) if loc else "<record>"
    if kind == "extra_forbidden" and len(loc) == 1:
        return (-1,), FieldError(name, UNKNOWN_FIELD)
    rank = _ORDER.get(name, len(_ORDER))
    index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1
    if index >= 0:
        name = f"{name}[{index}]"
        if len(loc) > 2:  # inside a neighbour
            if kind in _SHAPE_ERRORS:
                return (rank, index, -1), FieldError(name, NEIGHBOR_SHAPE)
            name = f"{name}.{loc[2]}"
            index_key = (rank, index, _NEIGHBOR_ORDER.get(str(loc[2]), 2))
        elif kind in _SHAPE_ERRORS:  # a neighbour that is not an object
            return (rank, index, -1), FieldError(name, NEIGHBOR_SHAPE)
        else:
            index_key = (rank, index)
    else:
        index_key = (rank, -1)
    if kind == "kedit":
        return index_key, FieldError(ctx.get("field") or name, ctx["reason"])
    if kind == "missing" or value is None:
        return index_key, FieldError(name, "missing or empty")
    return index_key, FieldError(name, f"expected a string, got {type(value).__name__}")


def field_error_of(e: ValidationError) -> FieldError:
    """The error a record is quarantined for: the first one in the order the checks run."""
    return min((_field_error(err) for err in e.errors(include_url=False)), key=lambda p: p[0])[1]


def validate_record(d: dict, origin: str = "", limits: Limits = DEFAULT_LIMITS) -> EditRequest:
    """Validate a dict in the canonical (feed) schema with ``feed_record_model(limits)``; raises ``FieldError``
    naming the field."""
    try:
        m = feed_record_model(limits).model_validate(d)
    except ValidationError as e:
        raise field_error_of(e) from None
    return EditRequest(
        id=m.id or derived_id(m.subject, m.prompt, m.target_new, m.timestamp),
        subject=m.subject,
        prompt=m.prompt,
        target_new=m.target_new,
        target_true=m.target_true,
        paraphrase_prompts=tuple(m.paraphrase_prompts),
        neighborhood=tuple(Neighbor(n.prompt, n.answer) for n in m.neighborhood),
        generation_prompts=tuple(m.generation_prompts),
        source=m.source or origin,
        timestamp=m.timestamp,
    )
