"""Research and feed formats, one module each, registered here.

A format module declares ``NAME``, ``convert(record, index) -> list[dict]`` (canonical dicts, see
``kedit.core.facts.schema.FEED_FIELDS``; raise ``FieldError`` for a record that cannot be
converted) and ``recognise(record) -> bool`` (how auto-detection knows a record of it; ``None``:
never sniffed). To add a format: write ``formats/<name>.py`` and add one line to the
registrations below; nothing else changes (``load_facts``, ``sniff_format`` and ``format_names``,
hence the CLI's ``--format`` choices, read the registry). Sniffing tries formats in registration
order; ``feed`` is the fallback.
"""

from kedit.core.facts.formats import counterfact, counterfact_easyedit, feed, mquake, zsre
from kedit.core.facts.formats.registry import (
    Format,
    format_names,
    get_format,
    register_format,
    sniff_format,
    unregister_format,
)

# Registration order is sniffing order (as before the split: mquake, counterfact, zsre, EasyEdit's CounterFact).
for _module in (mquake, counterfact, zsre, counterfact_easyedit, feed):
    register_format(_module.NAME, _module.convert, _module.recognise, fallback=getattr(_module, "FALLBACK", False))
del _module

__all__ = ["Format", "format_names", "get_format", "register_format", "sniff_format", "unregister_format"]
