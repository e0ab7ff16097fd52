"""What a gate is: a YAML section, baselines it keeps, a measurement on the edited model and its thresholded results.

The pipeline never calls a gate directly: a :class:`~evaluation.gates.suite.GateSuite` runs the hooks of
every gate named in the gates file, in file order. The hooks, and when they run:

- ``on_base(model, tok)``: once, on the base model, before any edit (drawdown's retain set, lm-eval base values);
- ``on_production(model, tok, earlier)``: after a stream restores a production version other than the base
  (the previous version's numbers: which earlier edits hold, its retain-set accuracy, its lm-eval values);
- ``before(model, tok, batch)``: just before a batch is edited in (the neighbours' answers);
- ``measure(step, before)``: on the edited model; returns the gate's metrics and results;
- ``on_accept(report)``: the batch became a version: move the previous-version baseline on from the report;
- ``on_end(model, tok, earlier)``: the stream ends; metrics of a last check on production (retention scores all
  it sampled, and so does a sampled capability gate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field

from kedit.core import registry
from kedit.core.config import StrictConfig
from kedit.core.facts import EditRequest
from kedit.core.paths import project_data_dir

from .measures import EditOutcomes, edit_outcomes

# A gate threshold in a YAML section: a non-negative finite number, or null to log the number without enforcing it.
Threshold = Annotated[float, Field(ge=0, allow_inf_nan=False)] | None


@dataclass(frozen=True)
class GateResult:
    gate: str
    value: float
    threshold: float
    passed: bool
    bound: str = "max"  # "min": the value must reach the threshold; "max": it must not exceed it
    detail: str = ""  # what the value is over, e.g. "over 41 known facts"
    # a limit on the model's cumulative change against the base model (perplexity, facts the base knew):
    # production already uses part of it, so once production is near it any further fact fails it
    budget: bool = False

    def __str__(self) -> str:
        detail = f" {self.detail}" if self.detail else ""
        return (
            f"{self.gate}={self.value:.4g} ({'ok' if self.passed else 'FAILED'}; limit {self.threshold:.4g} {self.bound}{detail})"
        )


@dataclass
class GateReport:
    """Every configured gate on one edited model; crosses the flow's task boundary as it is."""

    results: list[GateResult]
    metrics: dict[str, float]
    seconds: dict[str, float]  # gate name -> seconds
    holding: list[str] = field(default_factory=list)  # keys of edits (earlier and this batch's) that hold on this model
    # per fact of the batch (EditRequest.key): does its own edit hold on its prompt, and the probabilities
    # it was decided on ({"held": bool, "p_new": float, "p_old": float | None}); whatever the gates' thresholds
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.results)

    @property
    def not_held(self) -> list[str]:
        """The batch's facts whose own edit does not hold (a batch threshold below 1 lets them through)."""
        return [k for k, f in self.facts.items() if not f["held"]]

    @property
    def failed(self) -> list[GateResult]:
        return [c for c in self.results if not c.passed]

    def reason(self) -> str:
        return "; ".join(str(c) for c in self.failed) or "passed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "results": [asdict(c) | {"value": round_sig(c.value)} for c in self.results],
            "metrics": self.metrics,
            "seconds": self.seconds,
            "holding": self.holding,
            "facts": self.facts,
        }


@dataclass
class Outcome:
    """One gate's share of a report; results that are None (threshold disabled, nothing measured) are dropped."""

    metrics: dict[str, float]
    results: list[GateResult | None] = field(default_factory=list)
    holding: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.results = [c for c in self.results if c is not None]


@dataclass
class Step:
    """The edited model and the batch, as every gate's ``measure`` sees them in one evaluation."""

    model: Any
    tok: Any
    batch: Sequence[EditRequest]
    earlier: Sequence[EditRequest]  # accepted along the production chain, before this batch
    _edit_outcomes: EditOutcomes | None = field(default=None, repr=False)

    def edit_outcomes(self) -> EditOutcomes:
        """The batch's own edit outcomes, one batched scoring call per step whichever gate asks first
        (the edits gate reads all of it, retention reads which of the batch's edits hold)."""
        if self._edit_outcomes is None:
            self._edit_outcomes = edit_outcomes(self.model, self.tok, self.batch)
        return self._edit_outcomes


class Gate:
    """Base of every gate; a subclass sets ``name`` and ``Config`` and overrides the hooks it needs."""

    name: ClassVar[str]
    Config: ClassVar[type[StrictConfig]]  # its section of the gates file, without the ``gate`` key

    def __init__(self, cfg: StrictConfig, source: str = "<dict>"):
        self.cfg = cfg
        self.source = source  # "data/gates/x.yaml: gates[2]", for errors that appear only when measuring

    def on_base(self, model, tok) -> None:
        pass

    def on_production(self, model, tok, earlier: Sequence[EditRequest]) -> None:
        pass

    def before(self, model, tok, batch: Sequence[EditRequest]) -> Any:
        return None

    def measure(self, step: Step, before: Any) -> Outcome:
        raise NotImplementedError

    def on_accept(self, report: GateReport) -> None:
        pass

    def on_end(self, model, tok, earlier: Sequence[EditRequest]) -> dict[str, float]:
        """When the stream ends, on the production model: a last check of what steps only sampled."""
        return {}

    def spent(self) -> dict[str, float]:
        """Production's own value of each of this gate's budget results (``GateResult.budget``), by result
        name: how much of each budget against the base the chain has used so far."""
        return {}


GATES: dict[str, type[Gate]] = {}


def register_gate(cls: type[Gate]) -> type[Gate]:
    """Class decorator: make a gate available by its ``name`` in gates files."""
    return registry.add(GATES, cls.name, cls, "gate")


def at_least(gate: str, value: float, minimum: float | None, detail: str = "") -> GateResult | None:
    if minimum is None or math.isnan(value):
        return None  # disabled, or nothing to measure (e.g. no paraphrases in the batch)
    return GateResult(gate, value, minimum, value >= minimum - 1e-9, "min", detail)


def at_most(gate: str, value: float, maximum: float | None, detail: str = "", budget: bool = False) -> GateResult | None:
    if maximum is None or math.isnan(value):
        return None
    return GateResult(gate, value, maximum, value <= maximum + 1e-9, "max", detail, budget)


def retain_path(configured: str | None) -> Path:
    """The retain facts a gate reads (drawdown, memory): the configured file, else the project's
    data/retain_facts.jsonl."""
    return Path(configured) if configured else project_data_dir() / "retain_facts.jsonl"


def round_sig(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant digits, for what people read (reports, tags); NaN stays NaN."""
    return float(f"{value:.{digits}g}")
