"""Command-line options, defined once and shared by every command that takes them.

Choices that come from a registry (editors, fact formats) are checked when the command line is
parsed, not when this module is imported: the registries live below (``editing``, ``kedit.core.facts``)
and importing ``editing`` loads torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

PathArg = click.Path(path_type=Path)


def compose(*decorators: Callable) -> Callable:
    """Several option decorators as one, applied in the order written."""

    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


class _Registered(click.ParamType):
    """A name from a registry read at parse time; the error lists what is registered."""

    def __init__(self, what: str, names: Callable[[], list[str]]):
        self.name = what
        self._names = names

    def convert(self, value: Any, param, ctx) -> str:
        names = self._names()
        if value not in names:
            self.fail(f"unknown {self.name} {value!r}; registered: {', '.join(names)}", param, ctx)
        return value


def editor_names() -> list[str]:
    import editing

    return sorted(editing.EDITORS)


def default_editor() -> str:
    import editing

    return editing.DEFAULT_EDITOR


def format_names() -> list[str]:
    from kedit.core.facts import format_names as names

    return list(names())


def split_names() -> list[str]:
    from kedit.pipeline.config import SPLITS

    return list(SPLITS)


def _editor_default(ctx, param, value: str | None) -> str:
    return value or default_editor()


def _model_default(ctx, param, value: str | None) -> str:
    from kedit.core.models import DEFAULT_MODEL

    return value or DEFAULT_MODEL


def sets_to_overrides(sets: tuple[str, ...]) -> dict[str, Any]:
    """``--set KEY=YAML_VALUE`` items as a mapping; values are read as YAML (numbers, lists, null)."""
    import yaml

    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=YAML_VALUE, got {item!r}", param_hint="--set")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise click.BadParameter(f"{item!r}: the value is not YAML ({str(e).splitlines()[0]})", param_hint="--set") from None
    return out


def _limits(ctx, param, pairs: tuple[str, ...]):
    from kedit.core.config import ConfigError
    from kedit.core.facts import parse_limits

    try:
        return parse_limits(pairs)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--limit") from None


def corpus_option(default: Callable[[], Path | None] | None, help_default: str) -> Callable:
    """``--corpus``; a callable default is called when the command runs, not at import."""
    return click.option(
        "--corpus",
        type=PathArg,
        default=default,
        help=f"Ordinary text editors read: key statistics, a learned scope's background negatives (default: {help_default}).",
    )


MODEL = click.option(
    "--model",
    default=None,
    callback=_model_default,
    help="Base model: known name (smollm2-135m, gemma3-270m), checkpoint directory, GGUF file or hub id (default: smollm2-135m).",
)
EDITOR = click.option(
    "--editor",
    type=_Registered("editor", editor_names),
    default=None,
    callback=_editor_default,
    help="A registered editor (`kedit editors` lists them and marks the default).",
)
BATCH_SIZE = click.option("--batch-size", type=int, default=10, show_default=True, help="Edits per batch.")
GATES = click.option("--gates", type=PathArg, default=None, help="Gates YAML (default: data/gates/default.yaml).")
TRACKING_URI = click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)."
)
SETS = click.option(
    "--set",
    "sets",
    multiple=True,
    help="Editor hparam override KEY=YAML_VALUE with dotted keys, e.g. statistics.samples=500 (floats as 1.0e3).",
)
FORMAT = click.option(
    "--format",
    "fmt",
    type=_Registered("format", format_names),
    default="auto",
    show_default=True,
    help="Fact file format: auto (sniffed per record) or a registered format name.",
)
LIMITS = click.option(
    "--limit",
    "limits",
    multiple=True,
    callback=_limits,
    metavar="KEY=VALUE|FILE",
    help="Input limits (repeatable): KEY=VALUE, e.g. records=500, or a YAML file of keys; "
    "keys and defaults: kedit.core.facts.Limits (README, 'Limits').",
)
DEVICE = click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
THREADS = click.option("--threads", type=int, default=None, help="torch CPU threads (default: all cores).")
JSON_OUT = click.option("--json", "json_out", type=PathArg, default=None, help="Write the result as JSON here.")
START = click.option(
    "--start", type=int, default=0, show_default=True, help="Skip this many records first (tune on one slice, report on another)."
)
DATA = click.option("--data", "data", required=True, type=PathArg, help="Evaluation data (CounterFact, zsRE, ...).")

# the options of every command that runs edits on a model
EDIT_RUN = compose(MODEL, EDITOR, BATCH_SIZE, GATES, TRACKING_URI, SETS, DEVICE)

# a stream as a federation's client (FLEKE): its registered model, and the MKV store it shares target vectors through
CLIENT = click.option("--client", default=None, help="Federated client name: the stream's model is <model>@<client>.")
MKV = click.option(
    "--mkv", type=PathArg, default=None, help="The federation's MKV store (a directory): reuse other clients' target vectors."
)
MKV_THRESHOLD = click.option(
    "--mkv-threshold", type=float, default=0.99, show_default=True, help="Cosine a fact's key must reach to reuse a vector."
)
MKV_REFINE = click.option(
    "--mkv-refine/--mkv-as-is",
    default=False,
    show_default=True,
    help="Check a reused vector on this model and step it where it falls short (default: use it as it is, FLEKE's reuse).",
)
FEDERATION = compose(CLIENT, MKV, MKV_THRESHOLD, MKV_REFINE)

# a federation's plan over one data file: which facts each client receives in each slot (`kedit federate`, and
# `kedit bench federated`, which runs the same plan alone, federated and central)
CLIENTS = click.option("--clients", type=click.IntRange(2), default=8, show_default=True, help="Clients.")
SPLIT = click.option(
    "--split",
    type=_Registered("split", split_names),
    default="relation",
    show_default=True,
    help="How facts are split into clients: by relation (prompt template), or spectral clusters of their embeddings (ZsRE).",
)
SLOTS = click.option("--slots", type=click.IntRange(1), default=10, show_default=True, help="Time slots.")
OWN = click.option(
    "--own", type=click.IntRange(1), default=2, show_default=True, help="New facts of its relations per client and slot."
)
SHARED = click.option(
    "--shared",
    type=click.IntRange(0),
    default=2,
    show_default=True,
    help="Facts per client and slot (from slot 1) that another client had earlier.",
)
SEED = click.option(
    "--seed", type=int, default=0, show_default=True, help="Which earlier facts each client shares; the clustering's seed."
)
FEDERATION_PLAN = compose(CLIENTS, SPLIT, SLOTS, OWN, SHARED, SEED)
