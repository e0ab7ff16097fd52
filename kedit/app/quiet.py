"""What the command line prints: progress, verdicts and results by default; everything with ``-v``.

``configure_output`` runs first thing in the CLI, before Prefect or MLflow are imported (their
settings are read at import, and the ephemeral Prefect server and flow-run subprocesses inherit the
environment). It sets only environment variables the user has not set.

By default:

- Prefect's server analytics are off (``PREFECT_SERVER_ANALYTICS_ENABLED=false``; without internet
  they end in ``ERROR ... Failed to send telemetry``). This holds with ``-v`` too: on only when the
  user sets it to ``true``;
- Prefect's flow- and task-run loggers log warnings and errors only (no "Finished in state
  Completed()" per task), here and in the flow runs ``kedit serve`` starts; unless the user set
  ``PREFECT_LOGGING_LEVEL``;
- MLflow, httpx, httpcore, alembic and urllib3 log warnings and errors only (no line per HTTP request);
- the console shows INFO lines from the pipeline, store, application and flows (feeds, verdicts,
  production, locks) and WARNING and above from anyone.

With ``-v``: DEBUG from everything, Prefect's and the libraries' own levels.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

FORMAT = "%(levelname)s %(name)s: %(message)s"
# INFO from the pipeline, store, application and flows (feeds, verdicts, versions); editors and metrics
# log their internals (target losses, capability timings) at INFO, shown with -v
OWN_PACKAGES = ("kedit", "flows")
NOISY_LOGGERS = ("httpx", "httpcore", "mlflow", "alembic", "urllib3")


def output_env(verbose: bool, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """The environment defaults for this verbosity (before the user's own settings are respected)."""
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if verbose:
        return env
    env["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    if "PREFECT_LOGGING_LEVEL" not in environ:  # a user who chose Prefect's level gets it for the run loggers too
        env["PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL"] = "WARNING"
        env["PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"] = "WARNING"
    return env


def set_defaults(env: dict[str, str], environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the variables of ``env`` that are not set yet; return those that were set."""
    added = {k: v for k, v in env.items() if k not in environ}
    environ.update(added)
    return added


class OwnInfo(logging.Filter):
    """Passes WARNING and above from any logger, and lower levels only from ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...] = OWN_PACKAGES):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or any(
            record.name == p or record.name.startswith(p + ".") for p in self.prefixes
        )


def configure_output(verbose: bool) -> None:
    """Environment defaults for Prefect and MLflow, the root console handler, and the libraries' levels."""
    late = [m for m in ("prefect", "mlflow") if m in sys.modules]
    added = set_defaults(output_env(verbose))
    handler = logging.StreamHandler()
    if not verbose:
        user_prefect = "PREFECT_LOGGING_LEVEL" in os.environ
        handler.addFilter(OwnInfo(OWN_PACKAGES + (("prefect",) if user_prefect else ())))
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, handlers=[handler])
    log.debug("output: verbose=%s, environment defaults set: %s", verbose, added or "none")
    if late:
        log.debug("%s imported before configure_output: their settings were read already", ", ".join(late))
