"""Knowledge drawdown: facts the base model knew (the retain set), lost against the base and the previous version.

A retain fact that an edit of the chain restates (its prompt, with another answer) counts as lost: an edit that
rewrites a fact the operator listed as stable is what this gate is there to see. Beside it the gate logs how many
retain facts the chain restates and the drawdown over the others, the knowledge no edit asked to change (a
CounterFact stream rewrites "The capital of Norway is" on purpose; that is not the damage drawdown measures)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from kedit.core.config import StrictConfig
from kedit.core.facts import EditRequest, Fact, load_known_facts

from ..metrics import build_retain_set, drawdown, knowledge_accuracy, knows, mean, restated_by
from .base import Gate, GateReport, Outcome, Step, Threshold, at_most, register_gate, retain_path

log = logging.getLogger(__name__)


class DrawdownConfig(StrictConfig):
    base_max: Threshold  # fraction of the retain set lost against the base model
    step_max: Threshold  # relative loss against the previous accepted version
    retain_facts: str | None  # candidate facts (JSONL); null: the project's data/retain_facts.jsonl


@register_gate
class DrawdownGate(Gate):
    name = "drawdown"
    Config = DrawdownConfig
    cfg: DrawdownConfig

    def __init__(self, cfg: DrawdownConfig, source: str = "<dict>"):
        super().__init__(cfg, source)
        self.retain: list[Fact] = []  # facts the base model knows
        self.prev = 1.0  # accuracy on them of the previous accepted version (the base knows them all)

    def retain_path(self) -> Path:
        return retain_path(self.cfg.retain_facts)

    def on_base(self, model, tok) -> None:
        self.retain = build_retain_set(model, tok, load_known_facts(self.retain_path()))
        log.info("retain set: %d facts the base model knows (of %s)", len(self.retain), self.retain_path())

    def on_production(self, model, tok, earlier: Sequence[EditRequest]) -> None:
        self.prev = knowledge_accuracy(model, tok, self.retain)

    def measure(self, step: Step, before: None) -> Outcome:
        n = len(self.retain)
        ok = knows(step.model, step.tok, self.retain).cpu()  # (n,) bool
        acc = mean(ok)  # NaN without a retain set
        restated = restated_by([f.prompt for f in self.retain], [*step.earlier, *step.batch])  # (n,) bool
        metrics = {
            "retain_accuracy": acc,
            "drawdown_base": drawdown(1.0, acc),  # the base model knows all of them
            "drawdown_prev": drawdown(self.prev, acc),
            "retain_restated": float(restated.sum()),
            "drawdown_base_unrestated": drawdown(1.0, mean(ok[~restated])),  # NaN when every fact is restated
        }
        return Outcome(
            metrics,
            [
                at_most("drawdown_base", metrics["drawdown_base"], self.cfg.base_max, f"over {n} known facts", budget=True),
                at_most("drawdown_prev", metrics["drawdown_prev"], self.cfg.step_max, f"over {n} known facts"),
            ],
        )

    def on_accept(self, report: GateReport) -> None:
        self.prev = report.metrics.get("retain_accuracy", self.prev)

    def spent(self) -> dict[str, float]:
        return {"drawdown_base": drawdown(1.0, self.prev)}
