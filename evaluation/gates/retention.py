"""Retention: earlier accepted edits that held on the previous version still hold."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kedit.core.config import StrictConfig
from kedit.core.facts import EditRequest

from ..metrics import edit_success, mean
from .base import Gate, GateReport, Outcome, Step, Threshold, at_least, register_gate


class RetentionConfig(StrictConfig):
    min: Threshold  # fraction of the earlier edits that held on the previous version and still hold


@register_gate
class RetentionGate(Gate):
    name = "retention"
    Config = RetentionConfig
    cfg: RetentionConfig

    def __init__(self, cfg: RetentionConfig, source: str = "<dict>"):
        super().__init__(cfg, source)
        # earlier edits that hold on the previous version: one that never took (tolerated by a batch's
        # efficacy threshold) must not fail every later step
        self.holding: set[str] = set()

    def on_production(self, model, tok, earlier: Sequence[EditRequest]) -> None:
        ok = edit_success(model, tok, earlier).tolist() if earlier else []
        self.holding = {r.key for r, k in zip(earlier, ok) if k}

    def measure(self, step: Step, before: None) -> Outcome:
        earlier = step.earlier
        ok = edit_success(step.model, step.tok, earlier) if earlier else torch.zeros(0, dtype=torch.bool)
        held = torch.tensor([r.key in self.holding for r in earlier], dtype=torch.bool)
        metrics = {"retention": mean(ok[held]), "retention_all": mean(ok)}
        check = at_least("retention", metrics["retention"], self.cfg.min, f"over {int(held.sum())} earlier edits that held")
        batch_ok = step.edit_outcomes().rewrite_ok.tolist()
        holding = [r.key for r, k in zip(earlier, ok.tolist()) if k] + [r.key for r, k in zip(step.batch, batch_ok) if k]
        return Outcome(metrics, [check], holding)

    def on_accept(self, report: GateReport) -> None:
        self.holding = set(report.holding)
