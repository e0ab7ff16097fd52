"""Portability: multi-hop questions whose answer follows from the chain's edits (MQuAKE) answered with the new answer.

Optional (not in the default gates). A case counts once all of its rewrites are live on the edited model
(each (subject, prompt) slot holds the rewrite's value, from earlier versions or this batch); until then it
is not measured, and a step that completes no case logs NaN and checks nothing.
"""

from __future__ import annotations

import logging

from kedit.core.config import StrictConfig
from kedit.core.facts.formats.mquake import MultiHopCase, load_multihop
from kedit.core.facts.schema import normalize

from ..metrics import multihop_metrics
from .base import Gate, Outcome, Step, Threshold, at_least, register_gate

log = logging.getLogger(__name__)


class PortabilityConfig(StrictConfig):
    questions: str  # an MQuAKE file (cases with requested_rewrite, questions, answer, new_answer)
    min: Threshold  # share of the complete cases' multi-hop questions answered with the new answer


@register_gate
class PortabilityGate(Gate):
    name = "portability"
    Config = PortabilityConfig
    cfg: PortabilityConfig

    def __init__(self, cfg: PortabilityConfig, source: str = "<dict>"):
        super().__init__(cfg, source)
        self.cases: list[MultiHopCase] = []

    def on_base(self, model, tok) -> None:
        self.cases = load_multihop(self.cfg.questions)
        log.info("portability: %d multi-hop cases from %s", len(self.cases), self.cfg.questions)

    def measure(self, step: Step, before: None) -> Outcome:
        live = {r.slot: normalize(r.target_new) for r in [*step.earlier, *step.batch]}
        complete = [c for c in self.cases if all(live.get(r.slot) == normalize(r.target_new) for r in c.requests)]
        m = multihop_metrics(step.model, step.tok, [(c.questions, c.answer, c.new_answer) for c in complete])
        metrics = {"portability": m["multihop"], "portability_cases": float(len(complete))}
        return Outcome(metrics, [at_least("portability", m["multihop"], self.cfg.min, f"over {len(complete)} complete cases")])
