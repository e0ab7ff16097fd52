"""Training an editor's network as a tracked pipeline (``kedit train mend``, flows/train.py).

The steps the flow runs, each a function here:
1. ``prepare_data``: the training facts, minus every record that a held-out file (a benchmark's evaluation data)
   holds by id or by subject; a seeded validation split; written to ``split.json`` with the files' hashes;
2. ``open_run``: the MLflow training run (reopened when the same output directory is trained again);
3. ``train_network``: the editor's own training, checkpointed under the output directory and resumed from it,
   its losses per step and its validations logged to the run (a step logged before a kill is not logged twice);
4. ``publish``: the trained network registered as a version of ``<model>-<editor>``, alias ``production``;
5. ``plot_training``: the run's loss curves and validations as ``training.png`` (on the run and in ``<out>``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kedit.core.errors import KeditError
from kedit.core.facts import EditRequest
from kedit.core.facts.load import load_facts, scored_cases
from kedit.core.facts.schema import normalize
from kedit.core.models import load_model
from kedit.store.naming import identify
from kedit.store.networks import network_name, publish_network, tree_sha256
from kedit.store.tracking import T_KIND, T_MANIFEST_SHA, Tracker

log = logging.getLogger(__name__)

SPLIT = "split.json"
RUN = "run.json"
NETWORK = "network"
T_PUBLISHED = "kedit.published_version"  # on a training run: the network version it registered last
T_PUBLISHED_STEP = "kedit.published_step"  # ... and the validated step that network is from


class TrainingError(KeditError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: tuple[str, ...]
    editor: str = "mend"
    holdout: tuple[str, ...] = ()  # files whose records (by id and by subject) are never trained on
    holdout_first: int | None = None  # of each holdout file, only the cases ``kedit bench --n N`` scores
    out: str = "out/train"
    tracking_uri: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # editor hparams, dotted keys (train.steps=...)
    device: str | None = None
    limit: int | None = None  # use only the first N usable training facts
    max_minutes: float | None = None  # end this sitting after that long; a rerun resumes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _editor(cfg: TrainConfig):
    from editing import get_editor

    cls = get_editor(cfg.editor)
    if not cls.trains:
        raise TrainingError(f"{cfg.editor} has nothing to train (editors with a trained network: see kedit editors)")
    return cls


def _facts(paths: tuple[str, ...], first: int | None = None) -> tuple[list[EditRequest], dict[str, str]]:
    """The accepted facts of each file (with ``first``, its first scored cases only) and the files' sha256."""
    facts, hashes = [], {}
    for p in paths:
        loaded = load_facts(p)
        facts.extend(loaded.accepted if first is None else scored_cases(loaded.accepted, first))
        hashes.update(loaded.sha256)
    return facts, hashes


def prepare_data(cfg: TrainConfig) -> dict[str, Any]:
    """Choose the training and validation facts and write them (by id) to ``<out>/split.json``."""
    import torch

    cls = _editor(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    facts, data_sha = _facts(cfg.data)
    held, holdout_sha = _facts(cfg.holdout, cfg.holdout_first)
    held_ids = {r.id for r in held}
    held_subjects = {normalize(r.subject) for r in held}
    usable = cls.trainable_facts(facts)
    kept = [r for r in usable if r.id not in held_ids and normalize(r.subject) not in held_subjects]
    n_held_out = len(usable) - len(kept)
    if cfg.limit is not None:
        kept = kept[: cfg.limit]
    hp = cls.preset(load_model(cfg.model, "cpu")[0], cfg.overrides or None)  # validated before anything long starts
    n_val = hp.train.val_facts
    if len(kept) <= n_val:
        raise TrainingError(f"{len(kept)} usable training facts; validation alone needs {n_val}")
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(hp.train.seed)).tolist()
    val = [kept[i].id for i in order[:n_val]]
    train = [kept[i].id for i in order[n_val:]]
    split = {
        "train": train,
        "val": val,
        "n_read": len(facts),
        "n_unusable": len(facts) - len(usable),
        "n_held_out": n_held_out,
        "data_sha256": data_sha,
        "holdout_sha256": holdout_sha,
    }
    (out / SPLIT).write_text(json.dumps(split))
    log.info(
        "training facts: %d train, %d validation, %d held out, %d unusable",
        len(train),
        len(val),
        split["n_held_out"],
        split["n_unusable"],
    )
    return {k: v for k, v in split.items() if k not in ("train", "val")} | {"n_train": len(train), "n_val": len(val)}


def open_run(cfg: TrainConfig, split: dict[str, Any]) -> str:
    """The training run of ``<out>``: created once, reopened when the same output directory trains again."""
    out = Path(cfg.out)
    tracker = Tracker(cfg.tracking_uri)
    registered, fingerprint = identify(cfg.model)
    saved = json.loads((out / RUN).read_text()) if (out / RUN).is_file() else {}
    if saved.get("run_id") and saved.get("config") == _run_config(cfg):
        log.info("reopening training run %s", saved["run_id"])
        tracker.reopen_run(saved["run_id"])
        return saved["run_id"]
    name = network_name(registered, cfg.editor)
    run = tracker.start_run(registered, f"train-{cfg.editor}", {T_KIND: "train", "kedit.network": name})
    params = {"model": cfg.model, "editor": cfg.editor, "base_fingerprint": fingerprint, "data": ",".join(cfg.data)}
    params |= {"holdout": ",".join(cfg.holdout), "holdout_first": cfg.holdout_first}
    params |= {f"set.{k}": v for k, v in cfg.overrides.items()}
    params |= {f"data_sha256.{Path(k).name}": v for k, v in split["data_sha256"].items()}
    params |= {f"holdout_sha256.{Path(k).name}": v for k, v in split["holdout_sha256"].items()}
    params |= {k: split[k] for k in ("n_train", "n_val", "n_held_out", "n_unusable")}
    tracker.log_params(run, params)
    (out / RUN).write_text(json.dumps({"run_id": run, "config": _run_config(cfg)}))
    return run


def _run_config(cfg: TrainConfig) -> dict[str, Any]:
    """What makes two sittings one training: everything but the sitting's time budget."""
    return json.loads(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "max_minutes"}))  # as run.json holds it


def _last_logged(tracker: Tracker, run_id: str, key: str) -> int:
    history = tracker.metric_history(run_id, key)
    return max((s for s, _ in history), default=0)


def train_network(cfg: TrainConfig, run_id: str) -> dict[str, Any]:
    """Train (or resume) the editor's network under ``<out>``; logs to the run; returns the summary."""
    cls = _editor(cfg)
    out = Path(cfg.out)
    split = json.loads((out / SPLIT).read_text())
    model, tok = load_model(cfg.model, cfg.device)
    registered, fingerprint = identify(cfg.model, model)
    facts = {r.id: r for r in _facts(cfg.data)[0]}
    train = [facts[i] for i in split["train"]]
    val = [facts[i] for i in split["val"]]
    tracker = Tracker(cfg.tracking_uri)
    # the steps a killed sitting logged after its last checkpoint are replayed exactly; log them once
    logged = {key: _last_logged(tracker, run_id, key) for key in ("total_loss", "val_total_loss")}

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        key = "val_total_loss" if "val_total_loss" in metrics else "total_loss"
        if step > logged[key]:
            tracker.log_metrics(run_id, metrics, step)

    hp = cls.preset(model, cfg.overrides or None)
    summary = cls.train_asset(
        model,
        tok,
        hp,
        train,
        val,
        out / "checkpoints",
        out / NETWORK,
        fingerprint,
        {"training_run": run_id, "training_ids": sorted(split["train"] + split["val"])},
        on_metrics,
        cfg.max_minutes * 60 if cfg.max_minutes else None,
    )
    tracker.log_metrics(run_id, {"best_step": summary["best_step"], "steps_done": summary["step"]}, summary["step"])
    tracker.set_tags(run_id, {"kedit.stopped": summary["stopped"]})
    return summary


def publish(cfg: TrainConfig, run_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Register the best validated network as a version of ``<model>-<editor>`` with alias ``production``.

    A sitting cut short by its time budget publishes its best network so far (the manifest says it stopped on
    time) and a resumed training publishes again when it ends; the same files are never published twice, and
    nothing before the first validation."""
    tracker = Tracker(cfg.tracking_uri)
    registered, fingerprint = identify(cfg.model)
    name = network_name(registered, cfg.editor)
    if not summary["best_step"]:
        if summary["stopped"] == "time":
            tracker.end_run(run_id, "KILLED")
        return {"published": None, "why": "no validation yet; rerun the same command to resume"}
    tags = tracker.run_tags(run_id)
    if tags.get(T_PUBLISHED_STEP) == str(summary["best_step"]) and _same_files(tracker, name, tags[T_PUBLISHED], cfg):
        # a rerun of a finished training; the same step in other files (written by a fixed serializer) publishes
        tracker.end_run(run_id, "KILLED" if summary["stopped"] == "time" else "FINISHED")
        return {"published": name, "version": tags[T_PUBLISHED]}
    version = publish_network(tracker, registered, cfg.editor, fingerprint, cfg.model, run_id, Path(cfg.out) / NETWORK)
    tracker.set_tags(run_id, {T_PUBLISHED: version, T_PUBLISHED_STEP: summary["best_step"]})
    tracker.end_run(run_id, "KILLED" if summary["stopped"] == "time" else "FINISHED")
    return {"published": name, "version": version}


def _same_files(tracker: Tracker, name: str, version: str, cfg: TrainConfig) -> bool:
    """Whether the registered ``version`` holds exactly the network files under ``<out>`` now."""
    return tracker.version(name, version).tags.get(T_MANIFEST_SHA) == tree_sha256(Path(cfg.out) / NETWORK)


VALIDATIONS = ("val_edit_success", "val_rephrase_success", "val_loc_agreement")
SMOOTH = 50  # steps in the running mean of the per-step losses


def plot_training(cfg: TrainConfig, run_id: str) -> str:
    """Per-step losses (running mean over ``SMOOTH`` steps, log scale) above the validations, from the run's
    metric histories; logged to the run and written to ``<out>/training.png``; returns that path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    tracker = Tracker(cfg.tracking_uri)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, height_ratios=(3, 2))
    # every per-step loss the method logs ("..._loss", validations apart), the total first
    losses = sorted(
        (k for k in tracker.metric_keys(run_id) if k.endswith("_loss") and not k.startswith("val_")),
        key=lambda k: (k != "total_loss", k),
    )
    for key in losses:
        hist = tracker.metric_history(run_id, key)
        if len(hist) >= 2:
            steps, values = torch.tensor(hist, dtype=torch.float64).T
            width = min(SMOOTH, len(values))
            sums = torch.cat([torch.zeros(1, dtype=values.dtype), values.cumsum(0)])
            smooth = (sums[width:] - sums[:-width]) / width  # running mean over `width` steps
            top.plot(steps[width - 1 :].tolist(), smooth.tolist(), label=f"{key} (mean of {width} steps)")
    top.set_yscale("log")
    top.set_ylabel("loss")
    for key in VALIDATIONS:
        hist = tracker.metric_history(run_id, key)
        if hist:
            bottom.plot([h[0] for h in hist], [h[1] for h in hist], marker="o", label=key.removeprefix("val_"))
    best = tracker.metric_history(run_id, "best_step")
    if best:
        bottom.axvline(best[-1][1], color="grey", linestyle=":", label="best validation (published)")
    bottom.set_ylim(-0.02, 1.05)
    bottom.set_ylabel("held-out training facts")
    bottom.set_xlabel("training step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    top.set_title(f"{cfg.editor} training on {cfg.model}")
    fig.tight_layout()
    path = Path(cfg.out) / "training.png"
    fig.savefig(path, dpi=110)
    tracker.log_figure(run_id, fig, "training.png")
    plt.close(fig)
    return str(path)
