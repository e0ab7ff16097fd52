"""The one module that talks to MLflow: runs, metrics, artifacts, the model registry and aliases.

Layout: one experiment per registered model (``kedit/<model>``), one parent run per stream,
one nested run per batch attempt (bisection included). Metrics use the model's global edit
count as the step, so every curve in the UI is "over edits". Each accepted batch becomes a
version of the registered model whose artifact is a directory (patch set, editor state, manifest);
the alias ``production`` names the version in service.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.core.errors import KeditError
from kedit.core.facts import EditRequest

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
PRODUCTION = "production"
VERSION_ARTIFACT = "version"

# tags
T_KIND = "kedit.kind"  # stream | attempt | rollback
T_MODEL = "kedit.registered_model"
T_VERDICT = "kedit.verdict"  # accepted | rolled_back | interrupted
T_PARENT_VERSION = "kedit.parent_version"
T_VERSION = "kedit.version"
T_MANIFEST_SHA = "kedit.manifest_sha256"
T_FINGERPRINT = "kedit.base_fingerprint"
T_BASE = "kedit.base_model"
T_N_QUARANTINED = "kedit.n_quarantined"
T_FEED_SHA = "kedit.feed_sha256"
T_FEED_STATUS = "kedit.feed_status"  # processed | held_back | invalid | refused
FEED_HELD_BACK = "held_back"  # a feed some of whose facts a spent budget held back: `kedit stream` retries them
T_N_FACTS = "kedit.n_facts"  # facts in an attempt
T_N_EDITS = "kedit.n_edits"  # edits the version holds, from the base
T_EDITOR = "kedit.editor"
T_EDITOR_ASSETS = "kedit.editor_assets"  # on a version: where the editor's trained assets came from (JSON)
T_SUPERSEDES = "kedit.supersedes"  # on a re-edit's attempt run and version: the versions whose facts it replaces
T_N_NOT_HELD = "kedit.n_not_held"  # on an accepted attempt: facts of the batch whose own edit did not hold
T_HELD_BACK = "kedit.n_held_back"  # on the attempt that found a budget spent: its facts, held back
T_ATTEMPT_RUN = "kedit.attempt_run"  # on a version: the attempt run whose artifact it is (the version links to the stream run)

UI_ENV = "KEDIT_UI_URL"  # where the MLflow UI of a non-HTTP store is served (kedit up: http://127.0.0.1:5000)
DEFAULT_UI = "http://127.0.0.1:5000"
# MLflow 3.17's UI opens an experiment in GenAI mode unless the URL says otherwise (no tag or server
# setting changes that default); the runs table, run charts and the model registry are its model-training views
ML_VIEW = "?workflowType=machine_learning"


def metric_tag(metric: str) -> str:
    """The version tag that keeps one of its gate metrics (drawdown, retention) for `kedit status` and plots."""
    return f"kedit.{metric}"


class TrackingError(KeditError):
    pass


def resolve_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the project's SQLite store under ``mlruns/``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def sqlite_path(uri: str | None) -> Path | None:
    """The resolved database file of a local SQLite tracking URI; None for any other store."""
    if uri is None or not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).resolve()


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: beside the database. MLflow's own
    default is ``./mlruns`` under the working directory, whichever database it is, so two stores (a bench's
    work dir and the project's) would write into one folder. None for a server, which has its own root."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return str(db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9._@-]", "_", experiment))


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    source: str
    run_id: str
    tags: dict[str, str]

    @property
    def parent(self) -> str | None:
        return self.tags.get(T_PARENT_VERSION) or None


def ui_base(uri: str) -> str:
    """The MLflow UI serving ``uri``: the server itself for an HTTP store, else ``$KEDIT_UI_URL`` or
    ``kedit up``'s address (a SQLite or file store has no UI of its own: ``kedit up`` or ``mlflow ui`` serves it)."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return (os.environ.get(UI_ENV) or DEFAULT_UI).rstrip("/")


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


class Tracker:
    """A thin, explicit-run-id wrapper over ``MlflowClient`` (no fluent global state, so it is thread-safe).

    Searches page through every result (``page_size`` per request), so no lookup stops at a server's page.
    """

    PAGE_SIZE = 1000

    def __init__(self, uri: str | None = None, page_size: int = PAGE_SIZE):
        from mlflow import MlflowClient

        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.page_size = page_size

    def _paged(self, search, limit: int | None = None, **kwargs) -> list:
        """Every item ``search`` (an MlflowClient search returning a PagedList) finds, page after page, up to ``limit``."""
        out: list = []
        token = None
        while limit is None or len(out) < limit:
            size = self.page_size if limit is None else min(self.page_size, limit - len(out))
            page = search(max_results=size, page_token=token, **kwargs)
            out.extend(page)
            token = page.token
            if not token:
                break
        return out

    # ------------------------------------------------------------------ experiments and runs

    def experiment_id(self, registered: str) -> str:
        name = f"kedit/{registered}"
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=artifact_location(self.uri, name), tags={T_MODEL: registered}
            )
        except Exception:  # created concurrently by another stream
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(self, registered: str, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        tags = {T_MODEL: registered, **tags}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(registered), run_name=name, tags=tags)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def reopen_run(self, run_id: str) -> None:
        """Mark a run RUNNING again: a resumed training continues its own run."""
        self.client.update_run(run_id, "RUNNING")

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def rename_run(self, run_id: str, name: str) -> None:
        """A run's name as the runs table shows it (a verdict in the name makes a rejection stand out)."""
        self.client.set_tag(run_id, "mlflow.runName", name)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in _finite(metrics).items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def metric_keys(self, run_id: str) -> list[str]:
        return sorted(self.client.get_run(run_id).data.metrics)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def runs(self, registered: str, kind: str, max_results: int | None = None, extra: str = "") -> list:
        """Runs of one kind for a model, newest first: all of them, or the newest ``max_results``."""
        flt = f"tags.`{T_KIND}` = '{kind}'" + (f" and {extra}" if extra else "")
        return self._paged(
            self.client.search_runs,
            max_results,
            experiment_ids=[self.experiment_id(registered)],
            filter_string=flt,
            order_by=["attributes.start_time DESC"],
        )

    def rejected_attempts(self, registered: str, parents: Iterable[str]) -> list[tuple[str, int, str, dict[str, float]]]:
        """Attempts rolled back on top of one of ``parents`` (versions; "" for the base), oldest first:
        (parent version, facts in the attempt, run name, its gate metrics)."""
        allowed = set(parents)
        out = []
        for run in reversed(self.runs(registered, "attempt", extra=f"tags.`{T_VERDICT}` = 'rolled_back'")):
            tags = run.data.tags
            parent = tags.get(T_PARENT_VERSION, "")
            if parent in allowed and tags.get(T_N_FACTS, "").isdigit():
                out.append((parent, int(tags[T_N_FACTS]), run.info.run_name, dict(run.data.metrics)))
        return out

    def close_interrupted(self, registered: str) -> int:
        """Runs left RUNNING by a killed stream are marked KILLED with verdict ``interrupted``."""
        n = 0
        exp = self.experiment_id(registered)
        running = self._paged(self.client.search_runs, experiment_ids=[exp], filter_string="attributes.status = 'RUNNING'")
        for run in running:
            self.set_tags(run.info.run_id, {T_VERDICT: "interrupted"})
            self.end_run(run.info.run_id, "KILLED")
            n += 1
        return n

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))

    def ui_links(self, registered: str, run_id: str | None = None) -> dict[str, str]:
        """Links that open the right view of the MLflow UI directly: the runs table (model-training mode),
        the stream run's metric charts, and the registered model with its versions and alias."""
        from urllib.parse import quote

        base = ui_base(self.uri)
        experiment = f"{base}/#/experiments/{self.experiment_id(registered)}"
        links = {"runs": f"{experiment}/runs{ML_VIEW}", "model": f"{base}/#/models/{quote(registered)}{ML_VIEW}"}
        if run_id:
            links["stream"] = f"{experiment}/runs/{run_id}/model-metrics{ML_VIEW}"
        return links

    # ------------------------------------------------------------------ registry

    def ensure_registered(self, name: str, fingerprint: str, base_ref: str) -> None:
        """Create the registered model for a base model; refuse a name bound to different base weights."""
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    name, tags={T_FINGERPRINT: fingerprint, T_BASE: base_ref}, description=f"kedit edits of {base_ref}"
                )
            except MlflowException:  # created concurrently
                pass
            return
        have = rm.tags.get(T_FINGERPRINT)
        if have and have != fingerprint:
            raise TrackingError(f"registered model {name!r} belongs to base weights {have[:12]}, not {fingerprint[:12]}")

    def _info(self, mv) -> VersionInfo:
        return VersionInfo(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags))

    def production(self, name: str) -> VersionInfo | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self.client.get_model_version_by_alias(name, PRODUCTION))
        except MlflowException:
            return None

    def version(self, name: str, version: str) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self.client.get_model_version(name, str(version)))
        except MlflowException:
            raise TrackingError(f"registered model {name!r} has no version {version!r}") from None

    def versions(self, name: str) -> list[VersionInfo]:
        found = self._paged(self.client.search_model_versions, filter_string=f"name = '{name}'")
        return sorted((self._info(mv) for mv in found), key=lambda v: int(v.version))

    def version_index(self, name: str) -> dict[str, VersionInfo]:
        """Every version of ``name`` by number, in one paged search: a chain walk then asks the registry
        once, not once per version (200 lookups took a third of rebuilding a 200-version chain)."""
        return {v.version: v for v in self.versions(name)}

    def chain(self, name: str, version: str | None) -> list[VersionInfo]:
        """The versions from the first edit of the base model up to ``version``, oldest first, as the registry's
        parent tags link them: for display. What is applied to a model is walked and verified from the
        manifests themselves (``kedit.store.versions``)."""
        out: list[VersionInfo] = []
        seen = set()
        index = self.version_index(name) if version else {}
        while version:
            if version in seen:
                raise TrackingError(f"{name}: version chain has a cycle at {version}")
            seen.add(version)
            info = index.get(version) or self.version(name, version)
            out.append(info)
            version = info.parent
        return out[::-1]

    def register_version(
        self, name: str, run_id: str, local_dir: Path, tags: dict[str, str], artifact_path: str = VERSION_ARTIFACT
    ) -> str:
        """Upload ``local_dir`` as the run's artifact ``artifact_path`` and make it a new model version of
        that run. A stream registers its versions on the stream run (its page then lists them under
        "Registered models"; a tracking server accepts a version only from the run that holds its files),
        with the attempt that made each in the tag ``kedit.attempt_run``."""
        self.log_artifacts(run_id, local_dir, artifact_path)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        mv = self.client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        return str(mv.version)

    def set_production(self, name: str, version: str) -> None:
        self.client.set_registered_model_alias(name, PRODUCTION, str(version))

    def fetch_version(self, info: VersionInfo, dst: Path) -> Path:
        """Download a version's artifact directory (then verified by the caller against the registry's hash)."""
        import mlflow

        dst.mkdir(parents=True, exist_ok=True)
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(dst), tracking_uri=self.uri))
        except Exception as e:
            raise TrackingError(f"{info.name} v{info.version}: cannot fetch its artifact {info.source}: {e}") from None

    # ------------------------------------------------------------------ the fact ledger

    def quarantined(self, name: str, chain_versions: Iterable[str]) -> dict[str, dict]:
        """Facts quarantined by attempts made on top of a version of the chain (or on the base): key -> record
        (records written before facts had keys are listed by their id)."""
        allowed = {"", *chain_versions}
        out: dict[str, dict] = {}
        runs = self.runs(name, "attempt", extra=f"tags.`{T_N_QUARANTINED}` != '0'")
        for run in runs:
            if run.data.tags.get(T_PARENT_VERSION, "") not in allowed:
                continue
            try:
                text = self.client.download_artifacts(run.info.run_id, "quarantine.json")
            except Exception:
                continue  # the attempt died before writing it: its facts are simply retried
            for rec in json.loads(Path(text).read_text()):
                out[_fact_key(rec)] = rec
        return out

    # ------------------------------------------------------------------ the feed ledger

    def feed_ledger(self, name: str) -> dict[str, dict]:
        """Feeds already processed for a model, by content hash: sha256 -> {status, feed, run_id}."""
        out = {}
        for run in self.runs(name, "feed"):
            sha = run.data.tags.get(T_FEED_SHA)
            if sha and sha not in out:
                out[sha] = {"status": run.data.tags.get(T_FEED_STATUS), "feed": run.info.run_name, "run_id": run.info.run_id}
        return out

    def record_feed(
        self, name: str, parent_run_id: str | None, feed: str, sha: str, status: str, counts: dict, quarantine: list
    ) -> str:
        """One ledger entry: a finished run of kind ``feed`` under the stream that processed it."""
        run = self.start_run(name, Path(feed).name, {T_KIND: "feed", T_FEED_SHA: sha, T_FEED_STATUS: status}, parent_run_id)
        self.log_params(run, {"path": feed, "sha256": sha})
        self.log_metrics(run, {k: float(v) for k, v in counts.items()}, step=0)
        self.log_dict(run, quarantine, "quarantine.json")
        self.end_run(run)
        return run


def feed_settled(entry: dict | None) -> bool:
    """Whether a feed's ledger entry (``feed_ledger``) settles its content: any status but ``held_back``, whose
    held-back facts a stream sent the same feed tries again."""
    return entry is not None and entry["status"] != FEED_HELD_BACK


def _fact_key(record: dict) -> str:
    """A quarantine record's fact key; records written before facts had keys carry the request, whose key
    is computed, so a fact quarantined then is still not retried."""
    if record.get("key"):
        return record["key"]
    try:
        return EditRequest.from_dict(record["request"]).key
    except (KeyError, TypeError, ValueError):  # no request kept, or one today's rules refuse
        return record["id"]
