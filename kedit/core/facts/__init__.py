"""Edit requests: one schema, strict loaders for research data sets and fact feeds.

Every record that enters a loader ends in exactly one of three lists: ``accepted``,
``quarantined`` (with file, line, field and reason) or ``superseded`` (by a later update
of the same subject and prompt). ``FactSet.n_records`` counts what entered, so the
accounting can be checked.

One module per job:

- ``schema``: the dataclasses (``EditRequest``, ``Fact``, ``Neighbor``, ``Rejection``,
  ``Superseded``, ``FactSet``), the errors and ``FEED_FIELDS``;
- ``limits``: ``Limits``, every size limit on input in one place, with a CLI override;
- ``validate``: a raw canonical dict -> a valid ``EditRequest`` or a ``FieldError`` naming the
  field (a strict pydantic model, ``feed_record_model(limits)``; the hand-written checks it replaced are kept
  as ``validate_by_hand``, the baseline of ``kedit.app.bench_facts``);
- ``formats``: one module per research format plus ``feed``, and their registry. A new format is
  one new module in ``formats/`` plus one line in the registrations of ``formats/__init__.py``;
- ``readers``: JSONL, JSON array and CSV readers, chosen by file suffix (``READERS``);
- ``load``: ``load_facts``, ``load_many``, ``resolve_superseded``, ``load_known_facts``, ``scored_cases``;
- ``feeds``: feed file naming (``is_feed_name``, ``list_feeds``).

Importing defines things only: no file is read until a loader is called.
"""

from kedit.core.facts.feeds import FEED_SUFFIXES, PARTIAL_SUFFIXES, is_feed_name, list_feeds
from kedit.core.facts.formats import Format, format_names, get_format, register_format, sniff_format, unregister_format
from kedit.core.facts.limits import Limits, parse_limits
from kedit.core.facts.load import (
    feed_sha256,
    load_facts,
    load_known_facts,
    load_many,
    read_fact_file,
    resolve_superseded,
    scored_cases,
)
from kedit.core.facts.schema import (
    FEED_FIELDS,
    EditRequest,
    Fact,
    FactFileError,
    FactSet,
    FieldError,
    Neighbor,
    Rejection,
    Superseded,
)
from kedit.core.facts.validate import feed_record_model, validate_record

__all__ = [
    "FEED_FIELDS",
    "FEED_SUFFIXES",
    "PARTIAL_SUFFIXES",
    "EditRequest",
    "Fact",
    "FactFileError",
    "FactSet",
    "FieldError",
    "Limits",
    "Format",
    "Neighbor",
    "Rejection",
    "Superseded",
    "feed_record_model",
    "feed_sha256",
    "format_names",
    "get_format",
    "is_feed_name",
    "list_feeds",
    "load_facts",
    "load_known_facts",
    "load_many",
    "parse_limits",
    "read_fact_file",
    "register_format",
    "resolve_superseded",
    "scored_cases",
    "sniff_format",
    "unregister_format",
    "validate_record",
]
