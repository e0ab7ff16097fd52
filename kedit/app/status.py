"""``kedit status``: the production version, recent verdicts and the drawdown trend, in the terminal."""

from __future__ import annotations

from pathlib import Path

from kedit.core.facts import list_feeds
from kedit.store.naming import identify
from kedit.store.tracking import T_N_EDITS, T_N_FACTS, T_VERDICT, T_VERSION, Tracker, metric_tag

BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    hi = max(max(values), 1e-9)
    return "".join(BARS[min(len(BARS) - 1, round(v / hi * (len(BARS) - 1)))] if v > 0 else BARS[0] for v in values)


def status_text(model_ref: str, tracking_uri: str | None = None, last: int = 10, feeds_dir: Path | None = None) -> str:
    name, _ = identify(model_ref)
    tracker = Tracker(tracking_uri)
    lines = [f"model {model_ref} → registered model {name!r} (tracking: {tracker.uri})"]
    prod = tracker.production(name)
    if prod is None:
        lines.append("production: the base model (no accepted edits yet)")
        chain = []
    else:
        chain = tracker.chain(name, prod.version)
        lines.append(f"production: v{prod.version}, {prod.tags.get(T_N_EDITS, '?')} edits over {len(chain)} versions")
    attempts = tracker.runs(name, "attempt", max_results=last)
    if attempts:
        lines.append(f"last {len(attempts)} steps (newest first):")
        for run in attempts:
            tags = run.data.tags
            metrics = run.data.metrics
            version = ("v" + tags[T_VERSION]) if tags.get(T_VERSION) else ""
            lines.append(
                f"  {run.info.run_name:<20} {tags.get(T_VERDICT, '?'):<12} "
                f"{version:<5} facts={tags.get(T_N_FACTS, '?'):<3} "
                f"efficacy={metrics.get('efficacy', float('nan')):.2f} drawdown={metrics.get('drawdown_base', float('nan')):.3f}"
            )
    if feeds_dir is not None:
        ledger = tracker.feed_ledger(name)
        files = [Path(f) for f in list_feeds(feeds_dir)]  # the same files the watcher would fire on
        hashes = {p: _feed_hash(p) for p in files}
        pending = [p.name for p, sha in hashes.items() if sha is not None and sha not in ledger]
        unreadable = [p.name for p, sha in hashes.items() if sha is None]
        lines.append(
            f"feeds in {feeds_dir}: {len(files)}, pending: {len(pending)}" + (f" ({', '.join(pending[:10])})" if pending else "")
        )
        if unreadable:
            lines.append(f"  not readable as feeds (links, FIFOs, over a limit): {', '.join(unreadable[:10])}")
    dd = [float(v.tags[metric_tag("drawdown_base")]) for v in chain if metric_tag("drawdown_base") in v.tags]
    if dd:
        lines.append(f"drawdown vs base over versions: {sparkline(dd)}  first {dd[0]:.3f} → last {dd[-1]:.3f}")
    return "\n".join(lines)


def _feed_hash(path: Path) -> str | None:
    """The content hash the ledger keys a feed by, read as the loader reads it; None when it cannot be a feed."""
    from kedit.core.facts import FactFileError, feed_sha256

    try:
        return feed_sha256(path)
    except FactFileError:
        return None
