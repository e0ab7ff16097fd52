"""Every limit on what a fact file may hold, in one place.

A ``Limits`` is a strict config section (``kedit.core.config``): the defaults below, changed by a
YAML file of the same keys or by ``key=value`` items, both through the one shared CLI option
``--limit`` (``--limit limits.yaml --limit records=500``; later items win). A record over
a field limit is quarantined naming the field; a file over the size or record limit is refused
whole (applying the first N records of a feed that was cut would be worse than applying none);
quarantine lists keep ``quarantine_rows`` rows and count the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field

from kedit.core.config import ConfigError, StrictConfig, read_yaml, with_overrides


class Limits(StrictConfig):
    file_bytes: int = Field(64 * 2**20, gt=0)  # a feed file larger than this is refused unread
    records: int = Field(100_000, gt=0)  # raw records per file; more and the file is refused
    record_bytes: int = Field(256 * 1024, gt=0)  # one JSONL line / JSON array item / CSV row
    text_chars: int = Field(1000, gt=0)  # subject, prompts, answers
    target_chars: int = Field(200, gt=0)  # target_new, target_true
    id_chars: int = Field(200, gt=0)
    list_items: int = Field(64, gt=0)  # paraphrases / neighbours / generation prompts per record
    quarantine_rows: int = Field(1000, gt=0)  # rows written and uploaded per list; the rest are counted
    excerpt_chars: int = Field(500, ge=0)  # of a quarantined record's raw text
    future_days: float = Field(1.0, ge=0)  # a timestamp later than now + this is quarantined


def parse_limits(items: Iterable[str], base: Limits | None = None) -> Limits:
    """``["limits.yaml", "records=500"]`` -> ``Limits``: an item with ``=`` sets one key, any other item
    is a YAML file of keys; a bad file, key or value raises ``ConfigError`` naming it."""
    import yaml

    limits = base or Limits()
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            limits = with_overrides(limits, read_yaml(item) or {}, item)
        elif not key.strip():
            raise ConfigError(f"--limit {item!r}: expected KEY=VALUE or a YAML file (keys: {', '.join(Limits.model_fields)})")
        else:
            limits = with_overrides(limits, {key.strip(): yaml.safe_load(value)}, "--limit")
    return limits
