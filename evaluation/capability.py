"""General-capability regression checks through lm-eval on an in-memory model edited in place.

A :class:`CapabilitySuite` resolves and loads its tasks once (datasets included); each
:meth:`CapabilitySuite.evaluate` then scores the model's current weights on at most ``limit``
documents per task (or on chosen documents of them), through one lm-eval wrapper kept per model object,
so that edits made in place between calls are seen without saving or reloading anything. Each result keeps
lm-eval's per-document values, and :meth:`CapabilitySuite.aggregate` turns any subset of them into the
task's metric with lm-eval's own aggregation: a sampled check compares the same documents on two models.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from kedit.core.errors import KeditError
from kedit.core.paths import project_data_dir

log = logging.getLogger(__name__)

PROJECT_TASKS = ("kedit_mc", "kedit_ppl")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot seed; reset before every call so contexts repeat


class CapabilityError(KeditError):
    """A capability task that cannot be found or loaded."""


@dataclass(frozen=True)
class CapabilityResult:
    """Metric values of one evaluation, keyed ``task/metric`` (``task/metric/filter`` for filters other than none)."""

    values: dict[str, float]
    higher_is_better: dict[str, bool]  # same keys as values
    n_docs: dict[str, int]  # task -> documents scored
    seconds: float
    # "task/metric" -> document id -> lm-eval's value for that document (0/1 for acc, (loglikelihood, words)
    # for a perplexity): what ``CapabilitySuite.aggregate`` turns into the metric over any subset
    docs: dict[str, dict[int, Any]] = field(default_factory=dict)


def project_tasks_dir() -> Path:
    """The project's lm-eval task YAMLs and their data files (``data/lm_eval``)."""
    return project_data_dir() / "lm_eval"


class CapabilitySuite:
    """Tasks built once per stream; evaluate() runs them on the current in-memory weights."""

    def __init__(
        self,
        tasks: Sequence[str | Path],
        limit: int | None = 50,
        batch_size: int = 16,
        include_paths: Sequence[Path] = (),
    ):
        if isinstance(tasks, str | Path) or not tasks:
            raise CapabilityError("capability tasks must be a non-empty list of task names or YAML files")
        if limit is not None and limit < 1:
            raise CapabilityError(f"capability limit must be a positive number of documents, got {limit}")
        self.limit = limit
        self.batch_size = batch_size
        self.include_paths = tuple(Path(p).expanduser().resolve() for p in include_paths)
        self.task_specs = tuple(str(t) for t in tasks)
        self._loaded = self._load(self.task_specs)  # lm-eval TaskDict: {"tasks", "groups", "group_map"}
        self._tok: tuple[Any, Any] | None = None  # (the caller's tokenizer, the copy HFLM is given)

    # ------------------------------------------------------------------ building tasks

    def _load(self, specs: Sequence[str]) -> dict:
        """Resolve every spec to a registered task or a YAML file, then build all tasks once."""
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._index import TaskIndex

        files: dict[str, Path] = {}
        for spec in specs:
            if spec.endswith((".yaml", ".yml")):
                path = Path(spec).expanduser().resolve()
                if not path.is_file():
                    raise CapabilityError(f"capability task file not found: {spec}")
                files[spec] = path
        roots = list(dict.fromkeys([project_tasks_dir(), *self.include_paths, *(p.parent for p in files.values())]))
        names = [s for s in specs if s not in files]
        with _quiet_lm_eval():
            # lm-eval's own task index takes seconds to build; skip it unless a name needs it
            manager = TaskManager(include_defaults=False, include_path=roots)
            if any(n not in manager.task_index for n in names):
                manager = TaskManager(include_defaults=True, include_path=roots)
            entries = []
            for spec in specs:
                if spec in files:
                    try:
                        entry = TaskIndex.entry_from_path(files[spec])
                    except Exception as exc:
                        raise CapabilityError(f"cannot read capability task file {spec}: {_first_line(exc)}") from exc
                    if entry is None:
                        raise CapabilityError(f"capability task file {spec} defines no 'task' or 'group'")
                else:
                    entry = manager.task_index.get(spec)
                    if entry is None:
                        raise CapabilityError(
                            f"unknown capability task {spec!r}: not a kedit task ({', '.join(PROJECT_TASKS)}), "
                            "a registered lm-eval task or a path to a task YAML file"
                        )
                entries.append(entry)
            try:
                loaded = manager.load([_spec_of(e) for e in entries])
            except Exception as exc:
                raise CapabilityError(f"cannot load capability tasks {', '.join(specs)}: {_first_line(exc)}") from exc
        for task in loaded["tasks"].values():
            # what simple_evaluate would do; evaluate() alone leaves num_fewshot unset
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        log.info("capability tasks: %s (limit %s per task)", ", ".join(loaded["tasks"]), self.limit)
        return loaded

    # ------------------------------------------------------------------ evaluating

    def doc_ids(self) -> dict[str, list[int]]:
        """Per task, the documents a full evaluation scores: the first ``limit`` (all without one)."""
        out = {}
        for name, task in self._loaded["tasks"].items():
            n = len(task.eval_docs)
            out[name] = list(range(n if self.limit is None else min(n, self.limit)))
        return out

    def groups(self) -> list[str]:
        """The task groups among the tasks (their metrics aggregate subtasks, not documents)."""
        return list(self._loaded.get("groups") or {})

    def aggregate(self, docs: Mapping[str, Mapping[int, Any]], ids: Mapping[str, Sequence[int]]) -> dict[str, float]:
        """Each task's metrics over the documents ``ids`` names, from per-document values ``docs`` (a result's
        ``docs``), with the task's own lm-eval aggregation (mean, weighted perplexity, ...)."""
        values = {}
        for key, per_doc in docs.items():
            task, metric = key.split("/")[:2]
            chosen = [per_doc[i] for i in ids.get(task, ()) if i in per_doc]
            if chosen:
                values[key] = float(self._loaded["tasks"][task].aggregation()[metric](chosen))
        return values

    def evaluate(self, model, tokenizer, docs: Mapping[str, Sequence[int]] | None = None) -> CapabilityResult:
        """Score the model's current weights on every task: at most ``limit`` documents each, or, with ``docs``
        (task -> document ids), those documents only (a task left out is not scored)."""
        from lm_eval.evaluator import evaluate

        was_training = model.training  # read first: building the wrapper puts the model in eval mode
        lm = self._wrapper(model, tokenizer)
        model.eval()
        start = time.perf_counter()
        try:
            with _quiet_lm_eval(), _no_progress_bars():
                for task in self._loaded["tasks"].values():
                    # fewshot sampling draws from a per-task RNG; reseed so every call sees the same contexts
                    task.set_fewshot_seed(seed=FEWSHOT_SEED)
                # bootstrap_iters=0: stderr bootstraps would cost more than the forward passes on small limits
                # log_samples: the per-document values a sampled check aggregates (a few dozen small dicts)
                out = evaluate(
                    lm=lm,
                    task_dict=self._subset(docs) if docs is not None else self._loaded,
                    limit=None if docs is not None else self.limit,
                    samples={t: sorted(ids) for t, ids in docs.items()} if docs is not None else None,
                    bootstrap_iters=0,
                    log_samples=True,
                )
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        values, hib = _flatten(out)
        n_docs = {t: int(n["effective"]) for t, n in out.get("n-samples", {}).items()}
        log.info("capability in %.1f s: %s", seconds, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
        return CapabilityResult(values=values, higher_is_better=hib, n_docs=n_docs, seconds=seconds, docs=_per_doc(out))

    def _subset(self, docs: Mapping[str, Sequence[int]]) -> dict:
        """The loaded task dict with only the tasks ``docs`` names (lm-eval scores every task it is handed)."""
        unknown = set(docs) - set(self._loaded["tasks"])
        if unknown:
            raise CapabilityError(f"no capability task {sorted(unknown)}; have {sorted(self._loaded['tasks'])}")
        tasks = {t: task for t, task in self._loaded["tasks"].items() if t in docs}
        return {**self._loaded, "tasks": tasks}

    def _wrapper(self, model, tokenizer):
        """An HFLM around the model as it is, built per evaluation: it holds the model by reference, and a wrapper
        kept between evaluations would keep alive a model the caller has let go (the gates' per-hook copies)."""
        import torch
        from lm_eval.models.huggingface import HFLM

        # HFLM sets a missing pad token on the tokenizer it is given; keep the caller's tokenizer untouched. One copy
        # per caller's tokenizer: a deepcopy of a real tokenizer costs more than building the HFLM
        if self._tok is None or self._tok[0] is not tokenizer:
            self._tok = (tokenizer, copy.deepcopy(tokenizer))
        with _quiet_lm_eval(logging.ERROR), _no_retie(model):
            return HFLM(
                pretrained=model,  # kept by reference: HFLM neither copies nor moves a model instance
                tokenizer=self._tok[1],
                backend="causal",
                batch_size=self.batch_size,
                # bf16 log-softmax visibly rounds perplexities; the model's own dtype is left as it is
                softmax_dtype=torch.float32,
            )


# ---------------------------------------------------------------------------- helpers


def _spec_of(entry) -> str | dict:
    """What to hand TaskManager.load for an index entry: a YAML task becomes a dict with absolute data files."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    if entry.kind is not Kind.TASK or entry.yaml_path is None:
        return entry.name
    path = Path(entry.yaml_path)
    given = (load_yaml(path, resolve_func=False).get("dataset_kwargs") or {}).get("data_files")
    files = _beside(given, path.parent)
    if files == given:
        return str(path)  # nothing to resolve: lm-eval loads the file itself (by path, in case the name is shadowed)
    # datasets resolves relative data_files against the working directory; these lie beside the YAML
    cfg = load_yaml(path, resolve_func=True)
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": files}
    return cfg


def _beside(files, root: Path):
    """data_files (a path, a list or a split -> path(s) dict) with relative paths that exist under root made absolute."""
    if isinstance(files, dict):
        return {split: _beside(f, root) for split, f in files.items()}
    if isinstance(files, list | tuple):
        return [_beside(f, root) for f in files]
    if not isinstance(files, str):
        return files
    p = Path(files).expanduser()
    return str(root / p) if not p.is_absolute() and (root / p).exists() else files


def _flatten(out: dict) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval's nested results as flat ``task/metric`` values, leaving out stderrs and aliases."""
    values: dict[str, float] = {}
    hib: dict[str, bool] = {}
    for section in ("results", "groups"):
        for task, metrics in (out.get(section) or {}).items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if not filt or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"
                values[name] = float(value)
                hib[name] = bool(out.get("higher_is_better", {}).get(task, {}).get(metric, True))
    return values, hib


def _per_doc(out: dict) -> dict[str, dict[int, Any]]:
    """lm-eval's logged samples as ``task/metric`` (``task/metric/filter``) -> document id -> its value."""
    docs: dict[str, dict[int, Any]] = {}
    for task, examples in (out.get("samples") or {}).items():
        for ex in examples:
            for metric in ex["metrics"]:
                name = f"{task}/{metric}" if ex["filter"] == "none" else f"{task}/{metric}/{ex['filter']}"
                docs.setdefault(name, {})[int(ex["doc_id"])] = ex[metric]
    return docs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def _quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """lm-eval logs every task build and request batch at INFO; raise its threshold for the duration."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(max(level, old) if old != logging.NOTSET else level)
    try:
        yield
    finally:
        logger.setLevel(old)


# lm-eval modules that draw progress bars with their own ``tqdm`` name
_LM_EVAL_BARS = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """lm-eval draws a progress bar per task and request type at every gate step; the stream's own
    progress bar is the one users watch, so lm-eval's bars are created disabled meanwhile."""
    import importlib

    from tqdm import tqdm

    def quiet(*args, **kwargs):  # lm-eval passes disable= itself: override it, not default it
        return tqdm(*args, **{**kwargs, "disable": True})

    with contextlib.ExitStack() as stack:
        for name in _LM_EVAL_BARS:
            module = importlib.import_module(name)
            if getattr(module, "tqdm", None) is tqdm:
                stack.enter_context(mock.patch.object(module, "tqdm", quiet))
        yield


@contextlib.contextmanager
def _no_retie(model) -> Iterator[None]:
    """HFLM calls model.tie_weights(), which would re-tie an lm_head that an edit has untied; make it a no-op meanwhile."""
    model.tie_weights = lambda *args, **kwargs: None  # instance attribute shadows the method
    try:
        yield
    finally:
        del model.tie_weights


__all__ = ["CapabilityError", "CapabilityResult", "CapabilitySuite", "PROJECT_TASKS", "project_tasks_dir"]
