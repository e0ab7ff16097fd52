"""The batch's own edits: efficacy on their prompt, generalization on paraphrases, specificity of the neighbourhood."""

from __future__ import annotations

from collections.abc import Sequence

from kedit.core.config import StrictConfig
from kedit.core.facts import EditRequest

from ..metrics import mean
from .base import Gate, Outcome, Step, Threshold, at_least, at_most, register_gate
from .measures import neighbours_keep


class EditsConfig(StrictConfig):
    efficacy_min: Threshold  # fraction of the batch's edits that hold on their own prompt
    generalization_min: Threshold  # fraction of the batch's paraphrase prompts where the edit holds
    specificity_max_drop: Threshold  # drop in neighbours keeping their answer, against just before the step


@register_gate
class EditsGate(Gate):
    """Three thresholds read from one batched scoring call on the edited model (``Step.edit_outcomes``)."""

    name = "edits"
    Config = EditsConfig
    cfg: EditsConfig

    def before(self, model, tok, batch: Sequence[EditRequest]) -> float:
        """Specificity just before the edit: the neighbours are compared with themselves, not with the base."""
        return mean(neighbours_keep(model, tok, batch))

    def measure(self, step: Step, before: float) -> Outcome:
        now = step.edit_outcomes()
        drop = before - now.specificity
        metrics = {
            "efficacy": now.efficacy,
            "generalization": now.generalization,
            "specificity": now.specificity,
            "specificity_drop": drop,
        }
        return Outcome(
            metrics,
            [
                at_least("efficacy", now.efficacy, self.cfg.efficacy_min),
                at_least("generalization", now.generalization, self.cfg.generalization_min),
                at_most("specificity_drop", drop, self.cfg.specificity_max_drop, f"(was {before:.3f})"),
            ],
        )
