"""Installed memories (memory editors): how full they are, and how often they answer unrelated prompts.

A memory editor installs a module that answers some inputs from its own store (``kedit.core.routing``). Its
scope must stay on the edited facts: the share of retain-set prompts (facts the edits are not about; a prompt an
edit of the chain restates is left out, since answering it is the edit's job) that a memory answers at any token is
its leak, logged at every step with the number of entries. A model with no
memory installed (weight editors) measures and checks nothing here.
"""

from __future__ import annotations

from kedit.core.config import StrictConfig
from kedit.core.facts import load_known_facts

from ..metrics import memory_routing, restated_by
from .base import Gate, Outcome, Step, Threshold, at_most, register_gate, retain_path


class MemoryConfig(StrictConfig):
    retain_hit_max: Threshold  # share of the retain-set prompts an installed memory may answer
    retain_facts: str | None  # prompts (the drawdown gate's file format); null: the project's data/retain_facts.jsonl


@register_gate
class MemoryGate(Gate):
    name = "memory"
    Config = MemoryConfig
    cfg: MemoryConfig

    def __init__(self, cfg: MemoryConfig, source: str = "<dict>"):
        super().__init__(cfg, source)
        self.prompts: list[str] = []

    def on_base(self, model, tok) -> None:
        # every prompt, known or not: a memory must not answer any of them
        self.prompts = [f.prompt for f in load_known_facts(retain_path(self.cfg.retain_facts))]

    def measure(self, step: Step, before: None) -> Outcome:
        restated = restated_by(self.prompts, [*step.earlier, *step.batch]).tolist()
        prompts = [p for p, r in zip(self.prompts, restated) if not r]
        metrics = memory_routing(step.model, step.tok, prompts)
        if not metrics:
            return Outcome({})
        rate = metrics["memory_retain_hit_rate"]
        return Outcome(
            metrics, [at_most("memory_retain_hit_rate", rate, self.cfg.retain_hit_max, f"over {len(prompts)} prompts")]
        )
