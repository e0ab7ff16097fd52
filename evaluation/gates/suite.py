"""The gates file and the suite built from it: every listed gate's hooks, in file order, into one report."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from kedit.core.config import ConfigError, Seq, StrictConfig, flatten, from_mapping, read_yaml
from kedit.core.facts import EditRequest
from kedit.core.paths import project_data_dir
from kedit.core.precision import low_precision, low_precision_copy
from kedit.core.routing import routers

from .base import GATES, Gate, GateReport, GateResult, Step, round_sig

log = logging.getLogger(__name__)

# keys of the flat layout used before gates were listed by name: recognised only to point to the new one
_FLAT_KEYS = {
    "efficacy_min",
    "generalization_min",
    "specificity_max_drop",
    "retention_min",
    "drawdown_max",
    "drawdown_step_max",
    "retain_facts",
    "capability_tasks",
    "capability_limit",
    "capability_max_regression",
}


class GatesFile(StrictConfig):
    """The top of a gates file; each entry of ``gates`` is validated by its own gate's section class."""

    gates: Seq[dict[str, Any]]  # in the order they run; a gate left out is not run
    bisect: bool  # retry a failing batch's halves until the facts that fail are isolated
    # A fact that fails nothing but budgets against the base (GateResult.budget) while production has used
    # this share of each of them already is held back, not quarantined, and the stream stops: the budget is
    # spent, and every further fact would fail it too. Absent or null: such a fact is quarantined like any.
    spent_at: Annotated[float, Field(gt=0, le=1)] | None = None
    # What the gates score on: "model" (the model itself), or a copy made per hook in a lower precision ("auto":
    # bfloat16 where its matmuls are native; kedit/core/precision.py). Every hook, the base's baselines included,
    # scores on the same kind of copy, so what is compared was measured alike; the model and its versions keep
    # their own precision (docs/benchmarks.md, "The gates on a bf16 copy"). Not float16: its range overflows on
    # some models (Gemma), and a NaN metric is a check not made. Not with installed memories (``scored``).
    precision: Literal["model", "auto", "bfloat16"] = "model"


def default_gates_path() -> Path:
    return project_data_dir() / "gates" / "default.yaml"


def load_gates(path: str | Path | None = None) -> GateSuite:
    """Read a gates file strictly: unknown gates, unknown keys and wrong types name the file and the key."""
    path = Path(path) if path else default_gates_path()
    return suite_from_mapping(read_yaml(path) or {}, str(path))


def suite_from_mapping(data: Any, source: str = "<dict>") -> GateSuite:
    if isinstance(data, Mapping) and "gates" not in data and _FLAT_KEYS & set(data):
        raise ConfigError(
            f"{source}: flat gate keys ({', '.join(sorted(_FLAT_KEYS & set(data)))}) are the old layout; "
            "list gates by name instead: `gates: [{gate: edits, efficacy_min: 0.75, ...}, {gate: drawdown, ...}]` "
            "and `bisect: true` (see data/gates/default.yaml)"
        )
    top = from_mapping(GatesFile, data, source)
    gates = [_build(entry, i, source) for i, entry in enumerate(top.gates)]
    names = [g.name for g in gates]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{source}: gates[{i}]: gate {name!r} is listed twice (its metrics would collide)")
    return GateSuite(gates, top.bisect, source, top.spent_at, top.precision)


def _build(entry: dict[str, Any], i: int, source: str) -> Gate:
    section = dict(entry)
    name = section.pop("gate", None)
    if not isinstance(name, str) or name not in GATES:
        what = f"unknown gate {name!r}" if name is not None else "missing key 'gate'"
        raise ConfigError(f"{source}: gates[{i}]: {what} (registered: {', '.join(sorted(GATES))})")
    cls = GATES[name]
    return cls(from_mapping(cls.Config, section, source, at=f"gates[{i}]"), f"{source}: gates[{i}]")


def fact_outcomes(step: Step) -> dict[str, dict[str, Any]]:
    """Per fact of the batch, whether its own edit holds on its prompt (one scoring call, shared with the gates)."""
    out = step.edit_outcomes()
    p_old = [None if math.isnan(p) else round_sig(p) for p in out.rewrite_p_true.tolist()]
    return {
        r.key: {"held": bool(ok), "p_new": round_sig(p), "p_old": old}
        for r, ok, p, old in zip(step.batch, out.rewrite_ok.tolist(), out.rewrite_p_new.tolist(), p_old)
    }


class GateSuite:
    """The gates of one file, with the baselines they keep; one per stream."""

    def __init__(
        self,
        gates: Sequence[Gate],
        bisect: bool,
        source: str = "<dict>",
        spent_at: float | None = None,
        precision: str = "model",
    ):
        self.gates = list(gates)
        self.bisect = bisect
        self.source = source
        self.spent_at = spent_at
        self.precision = precision

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.gates]

    def params(self) -> dict[str, Any]:
        """Dotted settings for run parameters: ``edits.efficacy_min``, ``capability.max_regression.kedit_mc/acc``, bisect."""
        sections = {f"{g.name}.{k}": v for g in self.gates for k, v in flatten(g.cfg).items()}
        return {"bisect": self.bisect, "spent_at": self.spent_at, "precision": self.precision, **sections}

    def lowered(self, model) -> torch.dtype | None:
        """The dtype the gates score ``model`` in when it is not the model's own (None: the model itself)."""
        return low_precision(self.precision, model)

    def refuse_memories(self, installs: str | None, model) -> None:
        """Raise if the gates would score a lower-precision copy of a model that ``installs`` (a memory editor's name;
        None: the model's installed memories as they are) puts memories in: their keys, radii and counts decide by
        margins the copy's rounding moves (a WISE count of 257 is not a bfloat16 number), so the gates would judge
        another router than the one production serves."""
        if self.lowered(model) is None:
            return
        installed = routers(model)
        if not (installs or installed):
            return
        what = f"{installs} installs memories" if installs else f"the model has installed memories ({', '.join(installed)})"
        raise ConfigError(
            f"{self.source}: precision: {self.precision} scores a lower-precision copy, but {what}, whose keys and "
            "radii decide by margins the copy's rounding moves; use precision: model"
        )

    @contextmanager
    def scored(self, model) -> Iterator[Any]:
        """What a hook scores on: the model, or a copy of it as it is now in the suite's lower precision (made per
        hook: the model changes between hooks, and a copy of it is 0.1 s on SmolLM2-135M)."""
        dtype = self.lowered(model)
        if dtype is None:
            yield model
            return
        self.refuse_memories(None, model)
        yield low_precision_copy(model, dtype)

    def on_base(self, model, tok) -> None:
        with self.scored(model) as m:
            for g in self.gates:
                g.on_base(m, tok)

    def on_production(self, model, tok, earlier: Sequence[EditRequest]) -> None:
        with self.scored(model) as m:
            for g in self.gates:
                g.on_production(m, tok, earlier)

    def before(self, model, tok, batch: Sequence[EditRequest]) -> dict[str, Any]:
        """Each gate's measurement just before the edit, by gate name; hand it back to ``measure``."""
        with self.scored(model) as m:
            return {g.name: g.before(m, tok, batch) for g in self.gates}

    def measure(
        self, model, tok, batch: Sequence[EditRequest], earlier: Sequence[EditRequest], before: Mapping[str, Any]
    ) -> GateReport:
        """Every gate on the current (edited) model, timed per gate (the first gate's time includes the copy)."""
        results: list[GateResult] = []
        metrics: dict[str, float] = {}
        seconds: dict[str, float] = {}
        holding: list[str] = []
        t = time.perf_counter()
        with self.scored(model) as m:
            step = Step(m, tok, batch, earlier)
            for g in self.gates:
                out = g.measure(step, before.get(g.name))
                seconds[g.name], t = time.perf_counter() - t, time.perf_counter()
                results += out.results
                metrics |= out.metrics
                holding += out.holding
            return GateReport(results, metrics, seconds, holding, fact_outcomes(step))

    def on_accept(self, report: GateReport) -> None:
        for g in self.gates:
            g.on_accept(report)

    def budget_spent(self, report: GateReport) -> str | None:
        """Why ``report``'s rejection is the budget's rather than its facts': every failed result is a budget
        against the base, and production already uses ``spent_at`` of each; None otherwise."""
        if self.spent_at is None or not report.failed:
            return None
        used = {name: value for g in self.gates for name, value in g.spent().items()}
        if not all(r.budget and used.get(r.gate, -math.inf) >= self.spent_at * r.threshold for r in report.failed):
            return None
        return "budget spent: " + "; ".join(
            f"{r.gate} is at {used[r.gate]:.4g} on production, {r.value:.4g} with this fact (limit {r.threshold:.4g}"
            f"{' ' + r.detail if r.detail else ''})"
            for r in report.failed
        )

    def on_end(self, model, tok, earlier: Sequence[EditRequest]) -> dict[str, float]:
        """Each gate's last check on the production model when the stream ends, merged."""
        out: dict[str, float] = {}
        with self.scored(model) as m:
            for g in self.gates:
                out |= g.on_end(m, tok, earlier)
        return out
