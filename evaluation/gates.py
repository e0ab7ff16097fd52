"""Gates: the checks a batch of edits must pass before it becomes a version.

A gate compares one number measured on the edited model with a threshold from a strict YAML
file (``data/gates/default.yaml``; unknown keys are errors, ``null`` disables a gate):

- efficacy, generalization: the batch's own edits hold on their prompt and paraphrases;
- specificity: neighbourhood prompts keep their own answer, compared with the same prompts
  just before the step;
- retention: earlier accepted edits that held on the previous version still hold;
- drawdown: facts the base model knew (the retain set) are lost, against the base model and
  against the previous accepted version;
- capability: lm-eval metrics regress by at most a relative amount against the base model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from kedit.core.errors import KeditError
from kedit.core.facts import EditRequest, Fact
from kedit.core.lm import score_targets
from kedit.core.paths import project_data_dir

from .metrics import edit_success, knows, prompt_holds


class GateConfigError(KeditError, ValueError):
    pass


# "task/metric" -> allowed relative regression against the base model
DEFAULT_CAPABILITY_REGRESSION = {"kedit_mc/acc": 0.1, "kedit_ppl/word_perplexity": 0.05}


@dataclass(frozen=True)
class GateConfig:
    efficacy_min: float | None = 0.75
    generalization_min: float | None = 0.25
    specificity_max_drop: float | None = 0.3
    retention_min: float | None = 0.8
    drawdown_max: float | None = 0.15
    drawdown_step_max: float | None = 0.05
    retain_facts: str | None = None  # default: the project's data/retain_facts.jsonl
    capability_tasks: tuple[str, ...] = ("kedit_mc", "kedit_ppl")
    capability_limit: int | None = 40
    capability_max_regression: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CAPABILITY_REGRESSION))
    bisect: bool = True
    source: str = "<defaults>"

    def retain_path(self) -> Path:
        return Path(self.retain_facts) if self.retain_facts else project_data_dir() / "retain_facts.jsonl"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["capability_tasks"] = list(self.capability_tasks)
        return d


_FLOAT_KEYS = ("efficacy_min", "generalization_min", "specificity_max_drop", "retention_min", "drawdown_max", "drawdown_step_max")


def default_gates_path() -> Path:
    return project_data_dir() / "gates" / "default.yaml"


def load_gates(path: str | Path | None = None) -> GateConfig:
    """Read a gates YAML strictly: unknown keys and wrong types name the file and the key."""
    path = Path(path) if path else default_gates_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise GateConfigError(f"{path}: no such gates file") from None
    except yaml.YAMLError as e:
        raise GateConfigError(f"{path}: invalid YAML: {e}") from None
    return gates_from_dict(data, str(path))


def gates_from_dict(data: dict[str, Any], source: str = "<dict>") -> GateConfig:
    if not isinstance(data, dict):
        raise GateConfigError(f"{source}: expected a mapping of gate settings")
    allowed = [f for f in GateConfig.__dataclass_fields__ if f != "source"]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise GateConfigError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    out: dict[str, Any] = {"source": source}
    for key in _FLOAT_KEYS:
        if key in data:
            out[key] = _number(data[key], f"{source}: {key}", nullable=True)
    if "retain_facts" in data:
        v = data["retain_facts"]
        if v is not None and not isinstance(v, str):
            raise GateConfigError(f"{source}: retain_facts: expected a path, got {v!r}")
        out["retain_facts"] = v
    if "capability_tasks" in data:
        v = data["capability_tasks"] or []
        if not isinstance(v, list) or not all(isinstance(t, str) and t for t in v):
            raise GateConfigError(f"{source}: capability_tasks: expected a list of task names or YAML paths, got {v!r}")
        out["capability_tasks"] = tuple(v)
    if "capability_limit" in data:
        v = data["capability_limit"]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise GateConfigError(f"{source}: capability_limit: expected a positive integer or null, got {v!r}")
        out["capability_limit"] = v
    if "capability_max_regression" in data:
        v = data["capability_max_regression"] or {}
        if not isinstance(v, dict):
            raise GateConfigError(f"{source}: capability_max_regression: expected a mapping task/metric -> fraction")
        reg = {}
        for k, x in v.items():
            if not isinstance(k, str) or "/" not in k:
                raise GateConfigError(f"{source}: capability_max_regression: key {k!r} is not 'task/metric'")
            reg[k] = _number(x, f"{source}: capability_max_regression.{k}", nullable=False)
        out["capability_max_regression"] = reg
    if "bisect" in data:
        if not isinstance(data["bisect"], bool):
            raise GateConfigError(f"{source}: bisect: expected true or false, got {data['bisect']!r}")
        out["bisect"] = data["bisect"]
    cfg = GateConfig(**out)
    for k in cfg.capability_max_regression:
        task = k.split("/", 1)[0]
        if not any(task == t or Path(t).stem == task for t in cfg.capability_tasks):
            raise GateConfigError(f"{source}: capability_max_regression names {k!r} but {task!r} is not in capability_tasks")
    return cfg


def _number(v: Any, where: str, nullable: bool) -> float | None:
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise GateConfigError(f"{where}: expected a non-negative number{' or null' if nullable else ''}, got {v!r}")
    return float(v)


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class EditChecks:
    """Per-request outcomes on one model: does each edit hold on its prompt and paraphrases,
    and do its neighbours keep their own answer (over ``target_new``)?"""

    rewrite_ok: torch.Tensor  # (n_requests,) bool
    paraphrase_ok: torch.Tensor  # (n_paraphrases,) bool
    neighbor_ok: torch.Tensor  # (n_neighbors,) bool

    @property
    def efficacy(self) -> float:
        return _mean(self.rewrite_ok)

    @property
    def generalization(self) -> float:
        return _mean(self.paraphrase_ok)

    @property
    def specificity(self) -> float:
        return _mean(self.neighbor_ok)


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")


def edit_checks(model, tokenizer, requests: Sequence[EditRequest], batch_size: int = 64) -> EditChecks:
    """Whether each edit holds on its prompt and paraphrases (``prompt_holds``), and whether its neighbours
    still prefer their own answer over ``target_new``."""
    rewrite = [(r.text, r) for r in requests]
    para = [(p, r) for r in requests for p in r.paraphrase_prompts]
    pairs = rewrite + para  # rewrite prompts first: the first len(requests) results are the rewrites
    ok = prompt_holds(
        model, tokenizer, [p for p, _ in pairs], [r.target_new for _, r in pairs], [r.target_true for _, r in pairs], batch_size
    )
    nb = [(n.prompt, n.answer, r.target_new) for r in requests for n in r.neighborhood]
    if nb:
        prob = score_targets(
            model, tokenizer, [p for p, _, _ in nb] * 2, [a for _, a, _ in nb] + [t for _, _, t in nb], batch_size
        ).prob
        nb_ok = prob[: len(nb)] > prob[len(nb) :]
    else:
        nb_ok = torch.zeros(0, dtype=torch.bool)
    return EditChecks(ok[: len(rewrite)], ok[len(rewrite) :], nb_ok)


# ----------------------------------------------------------------------------- deciding


@dataclass(frozen=True)
class Check:
    gate: str
    value: float
    threshold: float
    passed: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.gate}={self.value:.4g} ({'ok' if self.passed else 'FAILED'}; limit {self.threshold:.4g}{self.detail})"


@dataclass
class GateReport:
    checks: list[Check]
    metrics: dict[str, float]
    seconds: dict[str, float]
    holding: list[str] = field(default_factory=list)  # ids of edits (earlier and this batch's) that hold on this model

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def reason(self) -> str:
        return "; ".join(str(c) for c in self.failed) or "passed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "metrics": self.metrics,
            "seconds": self.seconds,
            "holding": self.holding,
        }


def _at_least(gate: str, value: float, minimum: float | None, detail: str = "") -> Check | None:
    if minimum is None or math.isnan(value):
        return None  # disabled, or nothing to measure (e.g. no paraphrases in the batch)
    return Check(gate, value, minimum, value >= minimum - 1e-9, f" min{detail}")


def _at_most(gate: str, value: float, maximum: float | None, detail: str = "") -> Check | None:
    if maximum is None or math.isnan(value):
        return None
    return Check(gate, value, maximum, value <= maximum + 1e-9, f" max{detail}")


@dataclass
class Baselines:
    """What the gates compare against: the base model's and the previous version's numbers."""

    retain: list[Fact]  # facts the base model knows
    retain_prev: float  # accuracy on them of the previous accepted version
    holding: set[str] = field(default_factory=set)  # earlier edits that hold on the previous accepted version
    capability_base: dict[str, float] = field(default_factory=dict)
    capability_prev: dict[str, float] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)


def regression(base: float, now: float, higher_is_better: bool) -> float:
    """Relative change in the bad direction: 0.1 means 10% worse than ``base``; negative is better."""
    if base == 0 or math.isnan(base) or math.isnan(now):
        return float("nan")
    return (base - now) / abs(base) if higher_is_better else (now - base) / abs(base)


def evaluate(
    model,
    tokenizer,
    cfg: GateConfig,
    batch: Sequence[EditRequest],
    before: EditChecks,
    earlier: Sequence[EditRequest],
    baselines: Baselines,
    capability=None,
) -> GateReport:
    """All gates on the current (edited) model. ``before`` holds the batch's checks from just before the edit;
    ``capability`` is an object with ``evaluate(model, tokenizer)`` (lm-eval), or None to skip that gate."""
    seconds: dict[str, float] = {}
    metrics: dict[str, float] = {}
    checks: list[Check | None] = []

    t = time.perf_counter()
    now = edit_checks(model, tokenizer, batch)
    metrics |= {"efficacy": now.efficacy, "generalization": now.generalization, "specificity": now.specificity}
    metrics["specificity_drop"] = before.specificity - now.specificity
    checks += [
        _at_least("efficacy", now.efficacy, cfg.efficacy_min),
        _at_least("generalization", now.generalization, cfg.generalization_min),
        _at_most("specificity_drop", metrics["specificity_drop"], cfg.specificity_max_drop, f" (was {before.specificity:.3f})"),
    ]
    seconds["edit_checks"] = time.perf_counter() - t

    t = time.perf_counter()
    # retention counts the earlier edits that held on the previous version: one that never took (tolerated by a
    # batch's efficacy threshold) must not fail every later step
    ok = edit_success(model, tokenizer, earlier) if earlier else torch.zeros(0, dtype=torch.bool)
    held = torch.tensor([r.id in baselines.holding for r in earlier], dtype=torch.bool)
    metrics["retention"] = _mean(ok[held])
    metrics["retention_all"] = _mean(ok)
    n_held = int(held.sum())
    checks.append(_at_least("retention", metrics["retention"], cfg.retention_min, f" over {n_held} earlier edits that held"))
    holding = [r.id for r, k in zip(earlier, ok.tolist()) if k] + [r.id for r, k in zip(batch, now.rewrite_ok.tolist()) if k]
    seconds["retention"] = time.perf_counter() - t

    t = time.perf_counter()
    acc = _mean(knows(model, tokenizer, baselines.retain)) if baselines.retain else float("nan")
    metrics["retain_accuracy"] = acc
    metrics["drawdown_base"] = 1.0 - acc if baselines.retain else float("nan")  # the base model knows all of them
    metrics["drawdown_prev"] = (
        (baselines.retain_prev - acc) / baselines.retain_prev if baselines.retain_prev > 0 else float("nan")
    )
    n = len(baselines.retain)
    checks += [
        _at_most("drawdown_base", metrics["drawdown_base"], cfg.drawdown_max, f" over {n} known facts"),
        _at_most("drawdown_prev", metrics["drawdown_prev"], cfg.drawdown_step_max, f" over {n} known facts"),
    ]
    seconds["drawdown"] = time.perf_counter() - t

    if capability is not None:
        t = time.perf_counter()
        result = capability.evaluate(model, tokenizer)
        for key, value in result.values.items():
            hib = result.higher_is_better.get(key, True)
            metrics[f"cap/{key}"] = value
            metrics[f"cap_regression_base/{key}"] = regression(baselines.capability_base.get(key, float("nan")), value, hib)
            metrics[f"cap_regression_prev/{key}"] = regression(baselines.capability_prev.get(key, float("nan")), value, hib)
        for key, limit in cfg.capability_max_regression.items():
            if key not in result.values:
                raise GateConfigError(f"{cfg.source}: capability metric {key!r} not produced; have {sorted(result.values)}")
            checks.append(_at_most(f"capability:{key}", metrics[f"cap_regression_base/{key}"], limit, " relative to base"))
        seconds["capability"] = time.perf_counter() - t

    return GateReport([c for c in checks if c is not None], metrics, seconds, holding)
