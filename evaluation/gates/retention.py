"""Retention: earlier accepted edits that held on the previous version still hold.

Scoring every earlier edit at every step costs O(N²) prompts over an N-edit stream. With ``sample: s`` a step
scores s of the edits that held, drawn uniformly without replacement (seeded by the batch, so a rerun draws
the same); every ``full_every``-th accepted version scores them all, and so does the stream's end (``on_end``)
after a version accepted on a sample. Between full checks an unsampled edit counts as holding until a sample
or a full check finds otherwise. What a sample can miss is exact:
``detection_power`` (hypergeometric) is the probability that a step breaking a share f of the holding edits
fails the gate, reported with each sampled step for the share ``detect``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from kedit.core.config import StrictConfig
from kedit.core.facts import EditRequest

from ..metrics import edit_success, mean
from .base import Gate, GateReport, Outcome, Step, Threshold, at_least, register_gate
from .measures import draw


class RetentionConfig(StrictConfig):
    min: Threshold  # fraction of the earlier edits that held on the previous version and still hold
    sample: int | None = Field(default=None, ge=1)  # holding edits scored per step; null: all of them
    full_every: int = Field(default=10, ge=1)  # every k-th accepted version scores all of them
    detect: float = Field(default=0.3, gt=0, le=1)  # the broken share whose detection power a sampled step reports


def detection_power(holding: int, sample: int, broken: float, minimum: float) -> float:
    """P(a sample of ``sample`` of ``holding`` edits shows retention below ``minimum``) when a share ``broken``
    of them no longer holds: the hypergeometric tail, exact (no normal approximation)."""
    sample = min(sample, holding)
    bad = round(broken * holding)
    allowed = math.floor(sample * (1 - minimum) + 1e-9)  # broken ones a passing sample may contain
    total = math.comb(holding, sample)
    passes = sum(math.comb(bad, x) * math.comb(holding - bad, sample - x) for x in range(min(allowed, bad) + 1))
    return 1.0 - passes / total


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
        self.accepted = 0  # versions accepted since this stream started: when the next full check falls
        self.unchecked = False  # a version was accepted on a sample since the last full check

    def on_production(self, model, tok, earlier: Sequence[EditRequest]) -> None:
        ok = edit_success(model, tok, earlier).tolist() if earlier else []
        self.holding = {r.key for r, k in zip(earlier, ok) if k}

    def _sampled(self, n_holding: int) -> bool:
        s = self.cfg.sample
        return s is not None and n_holding > s and (self.accepted + 1) % self.cfg.full_every != 0

    def measure(self, step: Step, before: None) -> Outcome:
        held_list = [r for r in step.earlier if r.key in self.holding]
        if self._sampled(len(held_list)):
            return self._measure_sample(step, held_list)
        earlier = step.earlier
        ok = edit_success(step.model, step.tok, earlier) if earlier else torch.zeros(0, dtype=torch.bool)
        held = torch.tensor([r.key in self.holding for r in earlier], dtype=torch.bool)
        metrics = {"retention": mean(ok[held]), "retention_all": mean(ok), "retention_scored": float(len(earlier))}
        check = at_least("retention", metrics["retention"], self.cfg.min, f"over {int(held.sum())} earlier edits that held")
        holding = [r.key for r, k in zip(earlier, ok.tolist()) if k]
        return Outcome(metrics, [check], holding + self._batch_holding(step))

    def _measure_sample(self, step: Step, held_list: list[EditRequest]) -> Outcome:
        s = self.cfg.sample
        picked = [held_list[i] for i in draw(len(held_list), s, step.batch)]
        ok = edit_success(step.model, step.tok, picked)
        power = detection_power(len(held_list), s, self.cfg.detect, self.cfg.min or 0.0)
        metrics = {"retention": mean(ok), "retention_scored": float(s), "retention_power": power}
        detail = f"over a sample of {s} of {len(held_list)} earlier edits that held"
        detail += f" (catches {self.cfg.detect:.0%} broken with P {power:.3f})"
        check = at_least("retention", metrics["retention"], self.cfg.min, detail)
        lost = {r.key for r, k in zip(picked, ok.tolist()) if not k}
        holding = [r.key for r in held_list if r.key not in lost]  # unsampled: presumed held until checked
        return Outcome(metrics, [check], holding + self._batch_holding(step))

    @staticmethod
    def _batch_holding(step: Step) -> list[str]:
        return [r.key for r, k in zip(step.batch, step.edit_outcomes().rewrite_ok.tolist()) if k]

    def on_accept(self, report: GateReport) -> None:
        self.holding = set(report.holding)
        self.accepted += 1
        if "retention_scored" in report.metrics:
            self.unchecked = "retention_power" in report.metrics  # a sampled step reports its power

    def on_end(self, model, tok, earlier: Sequence[EditRequest]) -> dict[str, float]:
        """After sampled steps, every edit that was holding scored once more on production."""
        if not self.unchecked:
            return {}
        held = [r for r in earlier if r.key in self.holding]
        ok = edit_success(model, tok, held) if held else torch.zeros(0, dtype=torch.bool)
        return {"retention_final": mean(ok), "retention_final_lost": float((~ok).sum())}
