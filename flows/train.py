"""Training an editor's network (MEND's): prepare the data → open the run → train (resumable) → publish → plot.

Each task calls one function of ``kedit.pipeline.training`` with the config and what the last task returned
(ids stay in ``<out>/split.json``; the model never leaves the training task). Rerunning the flow with the same
config resumes the same run from its last checkpoint.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from kedit.pipeline import training
from kedit.pipeline.training import TrainConfig

ONCE = {"cache_policy": NO_CACHE, "persist_result": False, "retries": 0}


@task(name="prepare-data", **ONCE)
def prepare_data(cfg: TrainConfig) -> dict:
    return training.prepare_data(cfg)


@task(name="open-run", **ONCE)
def open_run(cfg: TrainConfig, split: dict) -> str:
    return training.open_run(cfg, split)


@task(name="train-network", **ONCE)
def train_network(cfg: TrainConfig, run_id: str) -> dict:
    return training.train_network(cfg, run_id)


@task(name="publish-network", **ONCE)
def publish(cfg: TrainConfig, run_id: str, summary: dict) -> dict:
    return training.publish(cfg, run_id, summary)


@task(name="plot-training", **ONCE)
def plot_training(cfg: TrainConfig, run_id: str) -> str:
    return training.plot_training(cfg, run_id)


@flow(name="kedit-train", log_prints=False)
def train(cfg: TrainConfig) -> dict:
    split = prepare_data(cfg)
    run_id = open_run(cfg, split)
    summary = train_network(cfg, run_id)
    published = publish(cfg, run_id, summary)
    return {"run_id": run_id, **split, **summary, **published, "plot": plot_training(cfg, run_id)}
