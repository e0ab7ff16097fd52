"""What the person watching a stream sees in MLflow: the stream run's series and ``drawdown.png``.

The stream run carries, with the model's edit count as the step:

- the history series (``HISTORY_KEYS``: drawdown against the base and the previous version, retention) from
  0 edits (the base: nothing lost) through every version of the production chain to now, so each stream
  run shows the whole curve, not only its own steps;
- ``limit.<gate>``: every gate's threshold as a series at the same steps (a flat line on the chart);
- ``rejected.<key>``: the history metrics of each rejected attempt, at the edit count it would have
  reached (one point per attempt: markers where the stream stepped back);
- the other metrics of each accepted report, and the stream's totals.

Each (series, step) is logged once, rejected attempts excepted (two attempts may be rejected at one count).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .config import HISTORY_KEYS

if TYPE_CHECKING:
    from evaluation.gates import GateReport

    from .session import Session

LIMIT = "limit."
REJECTED = "rejected."
BASE_POINT = {"n_edits": 0.0, "drawdown_base": 0.0, "drawdown_prev": 0.0, "retention": 1.0}  # the base model


def log_point(session: Session, step: int, metrics: dict[str, float]) -> None:
    """Log ``metrics`` on the stream run at ``step``, each series at most once per step."""
    new = {k: v for k, v in metrics.items() if (k, step) not in session.logged and v is not None and math.isfinite(v)}
    if new:
        session.tracker.log_metrics(session.run_id, new, step=step)
        session.logged |= {(k, step) for k in new}


def start_series(session: Session) -> None:
    """The history so far on a new stream run: the base, every version of the production chain, and the
    attempts rejected on top of them by earlier streams."""
    for point in _located(session.history):
        log_point(session, int(point["n_edits"]), _values(point) | _limits(session))
    for point in session.rejected:
        _log_rejected(session, point)


def earlier_rejections(session: Session) -> list[dict]:
    """The points of attempts earlier streams rejected on top of a version of the production chain (or the base)."""
    at = {"": 0.0} | {v: p["n_edits"] for v, p in zip(session.chain, session.history[1:]) if "n_edits" in p}
    return [
        {"n_edits": at[parent] + n_facts, "attempt": name, **_values(metrics)}
        for parent, n_facts, name, metrics in session.tracker.rejected_attempts(session.registered, at)
    ]


def note_limits(session: Session, report: GateReport) -> None:
    """Keep each gate's threshold; a gate seen for the first time gets its limit series back to step 0.
    The session learns the limit only once it is written, so a retried call writes what a failed one did not."""
    new = {c.gate: c.threshold for c in report.results if c.gate not in session.limits}
    if not new:
        return
    bounds = {c.gate: f"{c.bound} {c.threshold:g}" for c in report.results if c.gate in new}
    session.tracker.set_tags(session.run_id, {limit_tag(g): b for g, b in bounds.items()})  # for `kedit status`
    for point in _located(session.history):
        log_point(session, int(point["n_edits"]), {LIMIT + g: t for g, t in new.items()})
    session.limits |= new


def log_accepted(session: Session, report: GateReport, totals: dict[str, float]) -> None:
    """The new version's point: every metric of its report, the limits and the stream's totals."""
    log_point(session, session.n_edits, report.metrics | _limits(session) | totals)


def rejected_point(session: Session, n_facts: int, name: str, report: GateReport) -> dict:
    """Log a rejected attempt's point at the edit count it would have reached; the caller keeps it for drawdown.png."""
    point = {"n_edits": float(session.n_edits + n_facts), "attempt": name, **_values(report.metrics)}
    _log_rejected(session, point)
    return point


def _log_rejected(session: Session, point: dict) -> None:
    """``rejected.*`` at the point's edit count, once per attempt (two attempts may be rejected at one count)."""
    step, once = int(point["n_edits"]), (REJECTED + point["attempt"], int(point["n_edits"]))
    if once not in session.logged:
        session.tracker.log_metrics(session.run_id, {REJECTED + k: v for k, v in _values(point).items()}, step=step)
        session.logged.add(once)


def _located(points: list[dict]) -> list[dict]:
    """The points that know their edit count (a version written without the tag has none)."""
    return [p for p in points if "n_edits" in p]


def limit_tag(gate: str) -> str:
    """The stream run's tag that says a gate's limit in words: ``kedit.limit.drawdown_base = "max 0.05"``."""
    return f"kedit.limit.{gate}"


def _values(point: dict) -> dict[str, float]:
    return {k: float(point[k]) for k in HISTORY_KEYS if k in point and math.isfinite(float(point[k]))}


def _limits(session: Session) -> dict[str, float]:
    return {LIMIT + g: t for g, t in session.limits.items()}


# ----------------------------------------------------------------------------- drawdown.png

# one look per series: distinct colours, line styles and markers, so lines that lie on each other both show
STYLE = {
    "drawdown_base": {"color": "#1f77b4", "linestyle": "-", "marker": "o", "markersize": 8, "label": "drawdown vs base"},
    "drawdown_prev": {
        "color": "#ff7f0e",
        "linestyle": "--",
        "marker": "s",
        "markersize": 4,
        "label": "drawdown vs previous version",
    },
    "retention": {"color": "#2ca02c", "linestyle": "-", "marker": "^", "markersize": 5, "label": "retention of earlier edits"},
}
# rejected attempts in red, with a marker of their own per series (two may fall on one point)
REJECTED_MARKER = {"drawdown_base": "x", "drawdown_prev": "+", "retention": "x"}
PANELS = (("drawdown_base", "drawdown_prev"), ("retention",))


def plot_drawdown(session: Session) -> None:
    """drawdown.png on the stream run: drawdown (top) and retention (bottom) over the edits applied, with
    the gates' limits as horizontal lines and each rejected attempt as a red cross where it would have landed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (MaxNLocator below)

    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True, height_ratios=(3, 2))
    for ax, keys in zip(axes, PANELS):
        for key in keys:
            _draw_series(ax, key, session)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of known facts lost")
    axes[1].set_ylabel("fraction of earlier edits held")
    axes[1].set_ylim(-0.02, 1.05)
    axes[1].set_xlabel("edits applied to the model")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_title(f"{session.registered}: knowledge drawdown over edits")
    fig.tight_layout()
    session.tracker.log_figure(session.run_id, fig, "drawdown.png")
    plt.close(fig)


def _draw_series(ax, key: str, session: Session) -> None:
    style = STYLE[key]
    kept = [p for p in _located(session.history) if key in p]
    ax.plot([p["n_edits"] for p in kept], [p[key] for p in kept], **style)
    if key in session.limits:
        ax.axhline(
            session.limits[key], color=style["color"], linestyle=":", linewidth=1.2, label=f"limit: {key} {session.limits[key]:g}"
        )
    rejected = [p for p in session.rejected if key in p]
    if rejected:
        ax.scatter(
            [p["n_edits"] for p in rejected],
            [p[key] for p in rejected],
            marker=REJECTED_MARKER[key],
            s=110,
            linewidths=2,
            color="#d62728",
            zorder=5,
            label=f"rejected attempt ({style['label']})",
        )
