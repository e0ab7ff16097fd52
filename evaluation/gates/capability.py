"""General capability through lm-eval: relative regression of chosen metrics against the base model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field

from kedit.core.config import ConfigError, Seq, StrictConfig
from kedit.core.facts import EditRequest

from ..capability import CapabilitySuite
from .base import Gate, GateReport, Outcome, Step, Threshold, at_most, register_gate
from .measures import regression

log = logging.getLogger(__name__)


class CapabilityConfig(StrictConfig):
    tasks: Annotated[Seq[str], Field(min_length=1)]  # project task names, lm-eval task names or task YAML paths
    limit: Annotated[int, Field(ge=1)] | None  # documents per task at each step; null: all
    max_regression: dict[str, Threshold]  # "task/metric" -> allowed relative regression against the base


@register_gate
class CapabilityGate(Gate):
    name = "capability"
    Config = CapabilityConfig
    cfg: CapabilityConfig

    def __init__(self, cfg: CapabilityConfig, source: str = "<dict>"):
        super().__init__(cfg, source)
        for key in cfg.max_regression:
            _check_key(key, cfg.tasks, f"{source}.max_regression")
        self.suite: CapabilitySuite | None = None  # tasks are built on the base model, not when the file is read
        self.base: dict[str, float] = {}
        self.prev: dict[str, float] = {}
        self.higher_is_better: dict[str, bool] = {}

    def on_base(self, model, tok) -> None:
        self.suite = CapabilitySuite(self.cfg.tasks, limit=self.cfg.limit)
        res = self.suite.evaluate(model, tok)
        self.base, self.prev = dict(res.values), dict(res.values)
        self.higher_is_better = dict(res.higher_is_better)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in res.values.items())
        log.info("capability on the base model (%.1f s): %s", res.seconds, shown)

    def on_production(self, model, tok, earlier: Sequence[EditRequest]) -> None:
        self.prev = dict(self.suite.evaluate(model, tok).values)

    def measure(self, step: Step, before: None) -> Outcome:
        result = self.suite.evaluate(step.model, step.tok)
        metrics: dict[str, float] = {}
        for key, value in result.values.items():
            hib = result.higher_is_better.get(key, True)
            metrics[f"cap/{key}"] = value
            metrics[f"cap_regression_base/{key}"] = regression(self.base.get(key, float("nan")), value, hib)
            metrics[f"cap_regression_prev/{key}"] = regression(self.prev.get(key, float("nan")), value, hib)
        results = []
        for key, limit in self.cfg.max_regression.items():
            if key not in result.values:
                raise ConfigError(f"{self.source}.max_regression: metric {key!r} not produced; have {sorted(result.values)}")
            regressed = metrics[f"cap_regression_base/{key}"]
            results.append(at_most(f"capability:{key}", regressed, limit, "relative to base", budget=True))
        return Outcome(metrics, results)

    def on_accept(self, report: GateReport) -> None:
        values = {k.removeprefix("cap/"): v for k, v in report.metrics.items() if k.startswith("cap/")}
        self.prev = values or self.prev

    def spent(self) -> dict[str, float]:
        return {
            f"capability:{key}": regression(self.base[key], self.prev[key], self.higher_is_better.get(key, True))
            for key in self.cfg.max_regression
            if key in self.base and key in self.prev
        }


def _check_key(key: str, tasks: Sequence[str], where: str) -> None:
    if "/" not in key:
        raise ConfigError(f"{where}: key {key!r} is not 'task/metric'")
    task = key.split("/", 1)[0]
    if not any(task == t or Path(t).stem == task for t in tasks):
        raise ConfigError(f"{where}: {key!r} names task {task!r}, which is not in tasks ({', '.join(tasks)})")
