"""``kedit status``: the production version, recent verdicts, the drawdown history and where to look in the UI."""

from __future__ import annotations

from pathlib import Path

from kedit.core.facts import list_feeds
from kedit.pipeline.config import HISTORY_KEYS
from kedit.pipeline.monitor import BASE_POINT, limit_tag
from kedit.pipeline.session import history_point
from kedit.store.naming import identify
from kedit.store.tracking import (
    T_N_EDITS,
    T_N_FACTS,
    T_N_NOT_HELD,
    T_SUPERSEDES,
    T_VERDICT,
    T_VERSION,
    Tracker,
    feed_settled,
    metric_tag,
)

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
        width = max(len(run.info.run_name) for run in attempts)
        for run in attempts:
            tags = run.data.tags
            metrics = run.data.metrics
            version = ("v" + tags[T_VERSION]) if tags.get(T_VERSION) else ""
            not_held = int(tags.get(T_N_NOT_HELD, "0") or 0)
            also = f" ({not_held} did not hold: retried alone)" if not_held else ""
            also += f" supersedes {tags[T_SUPERSEDES]}" if tags.get(T_SUPERSEDES) else ""
            lines.append(
                f"  {run.info.run_name:<{width}} {tags.get(T_VERDICT, '?'):<12} "
                f"{version:<5} facts={tags.get(T_N_FACTS, '?'):<3} "
                f"efficacy={metrics.get('efficacy', float('nan')):.2f} drawdown={metrics.get('drawdown_base', float('nan')):.3f}"
                f"{also}"
            )
    if feeds_dir is not None:
        ledger = tracker.feed_ledger(name)
        files = [Path(f) for f in list_feeds(feeds_dir)]  # the same files the watcher would fire on
        hashes = {p: _feed_hash(p) for p in files}
        pending = [p.name for p, sha in hashes.items() if sha is not None and sha not in ledger]
        held = [p.name for p, sha in hashes.items() if sha in ledger and not feed_settled(ledger[sha])]
        unreadable = [p.name for p, sha in hashes.items() if sha is None]
        lines.append(
            f"feeds in {feeds_dir}: {len(files)}, pending: {len(pending)}" + (f" ({', '.join(pending[:10])})" if pending else "")
        )
        if held:  # the watcher does not send them again by itself
            lines.append(f"  facts held back by a spent budget (send again with kedit stream): {', '.join(held[:10])}")
        if unreadable:
            lines.append(f"  not readable as feeds (links, FIFOs, over a limit): {', '.join(unreadable[:10])}")
    dd = [float(v.tags[metric_tag("drawdown_base")]) for v in chain if metric_tag("drawdown_base") in v.tags]
    if dd:
        lines.append(f"drawdown vs base over versions: {sparkline(dd)}  first {dd[0]:.3f} → last {dd[-1]:.3f}")
    streams = tracker.runs(name, "stream")  # newest first
    if chain:
        lines += history_table(tracker, name, chain, _limits_said(streams))
    links = tracker.ui_links(name, streams[0].info.run_id if streams else None)
    lines.append("in the MLflow UI (kedit up, or mlflow ui on this store):")
    lines += [f"  {what:<7} {url}" for what, url in links.items()]
    return "\n".join(lines)


def _limits_said(streams: list) -> dict[str, str]:
    """The gates' limits in words (``{"drawdown_base": "max 0.05"}``) from the newest stream run that
    reached a verdict (one that found nothing to do, or is still running, has none)."""
    for run in streams:
        bounds = {k: run.data.tags[limit_tag(k)] for k in HISTORY_KEYS if limit_tag(k) in run.data.tags}
        if bounds:
            return bounds
    return {}


def history_table(tracker: Tracker, name: str, chain: list, bounds: dict[str, str]) -> list[str]:
    """The production chain's drawdown history as a table: one row per version, each value with a bar as
    long as its share of the gate's limit (a full bar: at the limit), and the attempts rejected on top of it."""
    rejected: dict[str, int] = {}
    for parent, *_ in tracker.rejected_attempts(name, ["", *(v.version for v in chain)]):
        rejected[parent] = rejected.get(parent, 0) + 1
    said = ", ".join(f"{k} {b}" for k, b in bounds.items())
    out = [f"drawdown history{f' (limits: {said})' if said else ''}:"]
    out.append(f"  {'version':<8}{'edits':>6}  " + "".join(f"{k:<22}" for k in HISTORY_KEYS) + "rejected on top")
    rows = [("base", BASE_POINT, "")] + [(f"v{v.version}", history_point(v.tags), v.version) for v in chain]
    for label, point, version in rows:
        cells = "".join(f"{_cell(point.get(k), bounds.get(k)):<22}" for k in HISTORY_KEYS)
        edits = f"{int(point['n_edits']):>6}" if "n_edits" in point else f"{'?':>6}"
        out.append(f"  {label:<8}{edits}  {cells}{rejected.get(version, 0) or ''}")
    return out


def _cell(value: float | None, bound: str | None) -> str:
    """``0.012 ██▍    `` : the value and a bar of 8 cells for value / limit (a max limit) or
    (1 - value) / (1 - limit) (a min limit: the bar is how much of the allowed loss is used)."""
    if value is None:
        return "-"
    if not bound:
        return f"{value:.3f}"
    kind, limit = bound.split()
    room = float(limit) if kind == "max" else 1 - float(limit)  # how much loss the gate allows
    lost = value if kind == "max" else 1 - value
    used = lost / room if room > 0 else (0.0 if lost <= 0 else 2.0)
    return f"{value:.3f} {bar(used)}{' !' if used > 1 + 1e-9 else ''}"


def bar(fraction: float, width: int = 8) -> str:
    """A horizontal bar of ``width`` cells in eighths; past 1 it is full (the cell says so with '!')."""
    eighths = round(min(max(fraction, 0.0), 1.0) * width * 8)
    return ("█" * (eighths // 8) + (" ▏▎▍▌▋▊▉"[eighths % 8] if eighths % 8 else "")).ljust(width)


def _feed_hash(path: Path) -> str | None:
    """The content hash the ledger keys a feed by, read as the loader reads it; None when it cannot be a feed."""
    from kedit.core.facts import FactFileError, feed_sha256

    try:
        return feed_sha256(path)
    except FactFileError:
        return None
