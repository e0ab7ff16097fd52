"""General capability through lm-eval: relative regression of chosen metrics against the base model.

Every step scores the same ``limit`` documents per task, unless ``sample: s``: then a step scores s of them per
task, drawn without replacement (seeded by the batch, so a rerun draws the same), and compares them with the same
documents on the base and on the previous version (lm-eval's per-document values, aggregated by lm-eval's own
functions): a paired check on fewer tokens. Every ``full_every``-th accepted version scores all of them, and so
does the stream's end after a version accepted on a sample. Between full checks a document not drawn keeps the
value it was last scored at (``cap/`` and the budget spent read those). What a sample can miss is exact for
a per-document 0/1 metric (accuracy): ``detection_power`` is the probability that a step turning a share
``detect`` of the base's right answers wrong fails the gate, reported with each sampled step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from kedit.core.config import ConfigError, Seq, StrictConfig
from kedit.core.facts import EditRequest

from ..capability import CapabilitySuite
from .base import Gate, GateReport, Outcome, Step, Threshold, at_most, register_gate
from .measures import draw, regression

log = logging.getLogger(__name__)


class CapabilityConfig(StrictConfig):
    tasks: Annotated[Seq[str], Field(min_length=1)]  # project task names, lm-eval task names or task YAML paths
    limit: Annotated[int, Field(ge=1)] | None  # documents per task at each step; null: all
    max_regression: dict[str, Threshold]  # "task/metric" -> allowed relative regression against the base
    sample: Annotated[int, Field(ge=1)] | None = None  # documents per task scored at a step, of the limit's; null: all
    full_every: Annotated[int, Field(ge=1)] = 10  # every k-th accepted version scores all of them
    detect: Annotated[float, Field(gt=0, le=1)] = 0.3  # the share of right answers broken whose detection is reported


def detection_power(right: int, total: int, sample: int, broken: float, max_regression: float) -> float:
    """P(a sample of ``sample`` of ``total`` documents, ``right`` of them answered right by the base, shows a
    relative accuracy loss above ``max_regression``) when a step turns a share ``broken`` of the right ones wrong
    and changes nothing else: the multivariate hypergeometric tail, exact. On a sample with b broken and k kept
    of the right ones the gate sees a loss of b / (b + k); a sample with none of them sees nothing."""
    sample = min(sample, total)
    bad = round(broken * right)
    kept, wrong = right - bad, total - right
    caught = 0
    for b in range(min(bad, sample) + 1):
        for k in range(min(kept, sample - b) + 1):
            if b + k and b / (b + k) > max_regression + 1e-9:
                caught += math.comb(bad, b) * math.comb(kept, k) * math.comb(wrong, sample - b - k)
    return caught / math.comb(total, sample)


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
        # "task/metric" -> document -> value, on the base and on production (a document keeps its last scored value)
        self.base_docs: dict[str, dict[int, Any]] = {}
        self.prev_docs: dict[str, dict[int, Any]] = {}
        self.pool: dict[str, list[int]] = {}  # task -> the documents a full check scores
        self.accepted = 0  # versions accepted since this stream started: when the next full check falls
        self.unchecked = False  # a version was accepted on a sample since the last full check
        # the last measured step: its batch's keys, the documents it scored, and its values where it scored all
        self.measured: tuple[tuple[str, ...], dict[str, dict[int, Any]], dict[str, float] | None] | None = None

    def on_base(self, model, tok) -> None:
        self.suite = CapabilitySuite(self.cfg.tasks, limit=self.cfg.limit)
        if self.cfg.sample is not None and self.suite.groups():
            raise ConfigError(f"{self.source}.sample: task groups ({', '.join(self.suite.groups())}) cannot be sampled")
        res = self.suite.evaluate(model, tok)
        self.base, self.prev = dict(res.values), dict(res.values)
        self.base_docs, self.prev_docs = _copy(res.docs), _copy(res.docs)
        self.pool = self.suite.doc_ids() if self.cfg.sample is not None else {}
        self.higher_is_better = dict(res.higher_is_better)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in res.values.items())
        log.info("capability on the base model (%.1f s): %s", res.seconds, shown)

    def on_production(self, model, tok, earlier: Sequence[EditRequest]) -> None:
        res = self.suite.evaluate(model, tok)
        self.prev, self.prev_docs = dict(res.values), _copy(res.docs)

    def _sampled(self) -> bool:
        s = self.cfg.sample
        return s is not None and any(len(p) > s for p in self.pool.values()) and (self.accepted + 1) % self.cfg.full_every != 0

    def measure(self, step: Step, before: None) -> Outcome:
        if not self._sampled():
            result = self.suite.evaluate(step.model, step.tok)
            self.measured = (_keys(step.batch), _copy(result.docs), dict(result.values))
            metrics = self._regressions(result.values, self.base, self.prev)
            return Outcome(metrics | self._whole(metrics), self._checks(result.values, metrics, "relative to base"))
        ids = {t: draw(len(p), self.cfg.sample, step.batch, salt=t) for t, p in self.pool.items()}
        ids = {t: [self.pool[t][i] for i in picked] for t, picked in ids.items()}
        result = self.suite.evaluate(step.model, step.tok, docs=ids)
        self.measured = (_keys(step.batch), _copy(result.docs), None)
        # the same documents on the base and on the previous version: a paired comparison
        base, prev = self.suite.aggregate(self.base_docs, ids), self.suite.aggregate(self.prev_docs, ids)
        metrics = self._regressions(result.values, base, prev)
        metrics |= {f"cap_sample/{k}": v for k, v in result.values.items()}
        # cap/: every document of the limit's, those not drawn at their last scored value (comparable across steps)
        metrics |= {f"cap/{k}": v for k, v in self.suite.aggregate(_merged(self.prev_docs, result.docs), self.pool).items()}
        metrics |= {f"cap_scored/{t}": float(len(i)) for t, i in ids.items()}
        metrics |= self._power() | self._whole(metrics)
        n = ", ".join(f"{len(i)} of {len(self.pool[t])} {t}" for t, i in ids.items())
        return Outcome(metrics, self._checks(result.values, metrics, f"relative to base, on a sample ({n} documents)"))

    def _regressions(self, values: dict[str, float], base: dict[str, float], prev: dict[str, float]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key, value in values.items():
            hib = self.higher_is_better.get(key, True)
            metrics[f"cap/{key}"] = value
            metrics[f"cap_regression_base/{key}"] = regression(base.get(key, float("nan")), value, hib)
            metrics[f"cap_regression_prev/{key}"] = regression(prev.get(key, float("nan")), value, hib)
        return metrics

    def _whole(self, metrics: dict[str, float]) -> dict[str, float]:
        """cap_all_regression_base/: ``cap/`` (every document, at its last scored value) against the base's whole. On
        a full check it is the checked regression; on a sample, the estimate that is comparable across steps, where
        the checked regression is the sample's against the same documents on the base."""
        out = {}
        for k, value in metrics.items():
            if (key := k.removeprefix("cap/")) != k:
                hib = self.higher_is_better.get(key, True)
                out[f"cap_all_regression_base/{key}"] = regression(self.base.get(key, float("nan")), value, hib)
        return out

    def _checks(self, values: dict[str, float], metrics: dict[str, float], detail: str) -> list:
        results = []
        for key, limit in self.cfg.max_regression.items():
            if key not in values:
                raise ConfigError(f"{self.source}.max_regression: metric {key!r} not produced; have {sorted(values)}")
            results.append(at_most(f"capability:{key}", metrics[f"cap_regression_base/{key}"], limit, detail, budget=True))
        return results

    def right_answers(self) -> dict[str, tuple[int, int]]:
        """Per gated metric whose per-document values are 0/1 (accuracy): the base's right answers and the documents
        a full check scores, what ``detection_power`` needs (a perplexity has no exact power and is left out)."""
        pool = self.pool or self.suite.doc_ids()
        out = {}
        for key, limit in self.cfg.max_regression.items():
            values = self.base_docs.get(key, {})
            if limit is None or not values or any(v not in (0, 1) for v in values.values()):
                continue
            task = key.split("/")[0]
            out[key] = (int(sum(values[i] for i in pool[task])), len(pool[task]))
        return out

    def _power(self) -> dict[str, float]:
        """Per gated 0/1 metric, the probability that this step's sample catches a step breaking ``detect`` of
        the base's right answers."""
        return {
            f"cap_power/{key}": detection_power(right, total, self.cfg.sample, self.cfg.detect, self.cfg.max_regression[key])
            for key, (right, total) in self.right_answers().items()
        }

    def on_accept(self, report: GateReport) -> None:
        self.accepted += 1
        if self.measured is not None and self.measured[0] == tuple(sorted(report.facts)):
            _, docs, values = self.measured
            if values is not None:  # a full check: production's values and documents as scored
                self.prev, self.prev_docs, self.unchecked = values, docs, False
            else:
                self.prev_docs = _merged(self.prev_docs, docs)
                self.prev, self.unchecked = self.suite.aggregate(self.prev_docs, self.pool), True
        else:  # a report this gate did not measure (a bench's bookkeeping): its values, if any
            values = {k.removeprefix("cap/"): v for k, v in report.metrics.items() if k.startswith("cap/")}
            self.prev = values or self.prev
        self.measured = None

    def on_end(self, model, tok, earlier: Sequence[EditRequest]) -> dict[str, float]:
        """After versions accepted on samples, every document scored once more on production."""
        if not self.unchecked:
            return {}
        result = self.suite.evaluate(model, tok)
        self.prev, self.prev_docs, self.unchecked = dict(result.values), _copy(result.docs), False
        out = {f"cap_final/{k}": v for k, v in result.values.items()}
        for key in self.cfg.max_regression:
            out[f"cap_final_regression_base/{key}"] = regression(
                self.base.get(key, float("nan")), result.values.get(key, float("nan")), self.higher_is_better.get(key, True)
            )
        return out

    def spent(self) -> dict[str, float]:
        return {
            f"capability:{key}": regression(self.base[key], self.prev[key], self.higher_is_better.get(key, True))
            for key in self.cfg.max_regression
            if key in self.base and key in self.prev
        }


def _keys(batch: Sequence[EditRequest]) -> tuple[str, ...]:
    return tuple(sorted(r.key for r in batch))


def _copy(docs: dict[str, dict[int, Any]]) -> dict[str, dict[int, Any]]:
    return {k: dict(v) for k, v in docs.items()}


def _merged(old: dict[str, dict[int, Any]], new: dict[str, dict[int, Any]]) -> dict[str, dict[int, Any]]:
    """``old`` with the documents ``new`` scored replaced by their new values."""
    return {k: {**old.get(k, {}), **new.get(k, {})} for k in old.keys() | new.keys()}


def _check_key(key: str, tasks: Sequence[str], where: str) -> None:
    if "/" not in key:
        raise ConfigError(f"{where}: key {key!r} is not 'task/metric'")
    task = key.split("/", 1)[0]
    if not any(task == t or Path(t).stem == task for t in tasks):
        raise ConfigError(f"{where}: {key!r} names task {task!r}, which is not in tasks ({', '.join(tasks)})")
