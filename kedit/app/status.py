"""``kedit status``: the production version, recent verdicts, the drawdown history and where to look in the UI."""

from __future__ import annotations

from pathlib import Path

from kedit.core.facts import list_feeds
from kedit.pipeline.config import HISTORY_KEYS
from kedit.pipeline.monitor import limit_tag
from kedit.store.naming import identify
from kedit.store.tracking import T_N_EDITS, T_N_FACTS, T_PARENT_VERSION, T_VERDICT, T_VERSION, Tracker, metric_tag

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
                f"  {run.info.run_name:<36} {tags.get(T_VERDICT, '?'):<12} "
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
    if chain:
        lines += history_table(tracker, name, chain)
    streams = tracker.runs(name, "stream", max_results=1)
    links = tracker.ui_links(name, streams[0].info.run_id if streams else None)
    lines.append("in the MLflow UI (kedit up, or mlflow ui on this store):")
    lines += [f"  {what:<7} {url}" for what, url in links.items()]
    return "\n".join(lines)


def history_table(tracker: Tracker, name: str, chain: list) -> list[str]:
    """The production chain's drawdown history as a table: one row per version, each value with a bar as
    long as its share of the gate's limit (a full bar: at the limit), and the attempts rejected on top of it."""
    streams = tracker.runs(name, "stream", max_results=1)
    bounds = {k: streams[0].data.tags.get(limit_tag(k)) for k in HISTORY_KEYS} if streams else {}
    rejected: dict[str, int] = {}
    for run in tracker.runs(name, "attempt"):
        if run.data.tags.get(T_VERDICT) == "rolled_back":
            parent = run.data.tags.get(T_PARENT_VERSION, "")
            rejected[parent] = rejected.get(parent, 0) + 1
    said = ", ".join(f"{k} {b}" for k, b in bounds.items() if b)
    out = [f"drawdown history{f' (limits: {said})' if said else ''}:"]
    out.append(f"  {'version':<8}{'edits':>6}  " + "".join(f"{k:<22}" for k in HISTORY_KEYS) + "rejected on top")
    rows = [("base", {"n_edits": 0.0, "drawdown_base": 0.0, "drawdown_prev": 0.0, "retention": 1.0}, "")]
    rows += [(f"v{v.version}", _point(v.tags), v.version) for v in chain]
    for label, point, version in rows:
        cells = "".join(f"{_cell(point.get(k), bounds.get(k)):<22}" for k in HISTORY_KEYS)
        out.append(f"  {label:<8}{int(point.get('n_edits', 0)):>6}  {cells}{rejected.get(version, 0) or ''}")
    return out


def _point(tags: dict[str, str]) -> dict[str, float]:
    point = {k: float(tags[metric_tag(k)]) for k in HISTORY_KEYS if metric_tag(k) in tags}
    return point | ({"n_edits": float(tags[T_N_EDITS])} if T_N_EDITS in tags else {})


def _cell(value: float | None, bound: str | None) -> str:
    """``0.012 ██▍    `` : the value and a bar of 8 cells for value / limit (a max limit) or
    (1 - value) / (1 - limit) (a min limit: the bar is how much of the allowed loss is used)."""
    if value is None:
        return "-"
    if not bound:
        return f"{value:.3f}"
    kind, limit = bound.split()
    used = value / float(limit) if kind == "max" else (1 - value) / max(1 - float(limit), 1e-9)
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
