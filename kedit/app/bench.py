"""Benchmarks on real models. Numbers in docs/benchmarks.md come from these functions."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.metrics import counterfact_from_probs, counterfact_pairs
from kedit.core.errors import KeditError
from kedit.core.facts import load_facts, scored_cases
from kedit.core.facts.schema import normalize
from kedit.core.lm import score_targets
from kedit.core.models import KNOWN_MODELS, default_device, default_dtype, load_model, pull

log = logging.getLogger(__name__)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": str(default_dtype(default_device())).removeprefix("torch."),
    }


def bench_metrics(model_ref: str, data: Path, n: int, batch_size: int = 32, single_limit: int | None = None) -> dict:
    """Time the CounterFact protocol's pairs: batched (packed, one forward per batch) against
    one (prompt, target) pair per forward, on the same model and pairs; check they agree."""
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    model, tok = load_model(model_ref)
    reqs = _cases(data, n)
    pairs = counterfact_pairs(reqs)
    m = len(pairs.prompts)
    score_targets(model, tok, pairs.prompts[:8], pairs.targets[:8])  # warm-up

    t0 = time.perf_counter()
    batched = score_targets(model, tok, pairs.prompts, pairs.targets, batch_size)
    t_batched = time.perf_counter() - t0

    k = m if single_limit is None else min(single_limit, m)
    single_lp = torch.empty(k)
    t0 = time.perf_counter()
    for i in tqdm(range(k), desc="one pair at a time", unit="pair"):
        single_lp[i] = score_targets(model, tok, [pairs.prompts[i]], [pairs.targets[i]]).logprob[0]
    t_single = (time.perf_counter() - t0) * m / k
    return {
        "model": model_ref,
        "data": str(data),
        "n_records": len(reqs),
        "n_pairs": m,
        "n_unique_prompts": len(set(pairs.prompts)),
        "batch_size": batch_size,
        "batched_s": round(t_batched, 2),
        "single_s": round(t_single, 2),
        "single_timed_pairs": k,
        "pairs_per_s_batched": round(m / t_batched, 1),
        "pairs_per_s_single": round(m / t_single, 1),
        "speedup": round(t_single / t_batched, 2),
        "max_abs_logprob_diff": float((batched.logprob[:k] - single_lp).abs().max()),
        "unedited": counterfact_from_probs(pairs, batched.prob),
        "machine": machine(),
    }


def _cases(data: Path | str, n: int | None, start: int = 0) -> list:
    """The first n cases of a file that have an outdated answer (every protocol metric needs it), after the
    first ``start`` of those."""
    return scored_cases(load_facts(data).accepted, None if n is None else start + n)[start:]


def _corpus_file(corpus: Path | str | None) -> str | None:
    """The statistics corpus if the file is there; None (with a warning) means text sampled from the model."""
    if corpus and Path(corpus).is_file():
        return str(corpus)
    if corpus:
        log.warning("corpus %s not found; key statistics will use text sampled from the model", corpus)
    return None


def editor_on(model_ref: str, method: str, corpus_path: str | None, overrides: dict | None, device: str | None = None):
    """A fresh model and ``method``'s editor on it with its key statistics prepared (statistics from
    ``corpus_path``, else text sampled from the model); returns (model, tokenizer, editor, prepare seconds)."""
    from editing import make_editor
    from editing.stats import corpus_from_files

    model, tok = load_model(model_ref, device)
    corpus = corpus_from_files([corpus_path]) if corpus_path else None
    editor = make_editor(method, model, tok, overrides, assets={"corpus": corpus, **_trained(model_ref, model, method)})
    t0 = time.perf_counter()
    editor.prepare()
    return model, tok, editor, time.perf_counter() - t0


def _trained(model_ref: str, model, method: str) -> dict:
    """A trained editor's network, from the registry of $MLFLOW_TRACKING_URI (default ./mlruns) for this base."""
    from editing import get_editor
    from kedit.store.naming import identify
    from kedit.store.networks import trained_assets
    from kedit.store.tracking import Tracker

    cls = get_editor(method)
    if not cls.trains:
        return {}
    registered, fingerprint = identify(model_ref, model)
    return trained_assets(Tracker(), cls, registered, fingerprint)


def _assets_now(model_ref: str, method: str) -> dict:
    """The provenance a run of ``method`` would record now (its production network's name, version and sha256;
    {} for an editor that trains nothing): a stored result made with another network is stale."""
    from editing import get_editor
    from kedit.store.naming import identify
    from kedit.store.networks import production_provenance
    from kedit.store.tracking import Tracker

    if not get_editor(method).trains:
        return {}
    return production_provenance(Tracker(), identify(model_ref)[0], method) or {}


def _copy_trained(model_ref: str, editor: str | None, uri: str) -> None:
    """A trained editor's network, from the registry of $MLFLOW_TRACKING_URI (default ./mlruns), into the
    benchmark's scratch store, where its stream will look for it."""
    from editing import get_editor
    from kedit.store.naming import identify
    from kedit.store.networks import copy_network
    from kedit.store.tracking import Tracker

    if editor is None or not get_editor(editor).trains:
        return
    registered, fingerprint = identify(model_ref)
    copy_network(Tracker(), Tracker(uri), registered, editor, fingerprint, model_ref)


def code_fingerprint() -> str:
    """sha256 over the source of what a benchmark's numbers depend on (editors, metrics and gates, the core): a
    result or a saved step made with other code is stale, and is run again rather than resumed."""
    import hashlib

    import editing
    import evaluation
    import kedit.core

    h = hashlib.sha256()
    for pkg in (editing, evaluation, kedit.core):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*")):
            if f.suffix in (".py", ".yaml") and f.is_file():
                h.update(f"{pkg.__name__}/{f.relative_to(root)}".encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def with_code(settings: dict) -> dict:
    """A benchmark's resume settings with the code they were run with (``code_fingerprint``)."""
    return {**settings, "code": code_fingerprint()}


def resumed(json_out: Path | None, settings: dict) -> dict:
    """The per-method results of an earlier run written to ``json_out`` with the same ``settings`` (else none)."""
    if not (json_out and Path(json_out).is_file()):
        return {}
    before = json.loads(Path(json_out).read_text())
    if {k: before.get(k) for k in settings} != settings:
        return {}
    log.info("resuming %s: %s done", json_out, ", ".join(before.get("results", {})) or "nothing")
    return before.get("results", {})


def save_json(json_out: Path | None, out: dict) -> None:
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(out, indent=2))


def exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """In a benchmark's worker process: exit as soon as ``parent`` is no longer the process's parent (it was
    killed), rather than run on for an hour as an orphan beside whatever runs next."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def worker_pool():
    """One fresh spawned process that ends with the benchmark that started it."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        max_workers=1, mp_context=mp.get_context("spawn"), initializer=exit_with_parent, initargs=(os.getpid(),)
    )


def each_method_alone(out: dict, methods: list[str], run, args, json_out: Path | None) -> dict:
    """``out["results"][m] = run(m, *args(m))`` for each method not there yet, each in a fresh process (its peak
    memory is its own), rewriting ``json_out`` after each so that a stopped run resumes per method."""
    for method in methods:
        if method in out["results"]:
            continue
        with worker_pool() as pool:
            out["results"][method] = pool.submit(run, method, *args(method)).result()
        log.info("%s: %s", method, out["results"][method])
        save_json(json_out, out)
    return out


def _counterfact_scores(model, tok, reqs, earlier, reference) -> dict:
    """ROME's CounterFact protocol: P(new) against P(true) on prompts, paraphrases and neighbours; retention
    of the earlier batches' edits; fluency of one generation per request."""
    from evaluation.metrics import counterfact_metrics, fluency, retention

    scores = counterfact_metrics(model, tok, reqs)
    gen_prompts = [p for r in reqs for p in r.generation_prompts[:1]]
    return {
        "efficacy": scores["efficacy"],
        "generalization": scores["generalization"],
        "specificity": scores["specificity"],
        "retention": retention(model, tok, earlier) if earlier else scores["efficacy"],
        "fluency": fluency(model, tok, gen_prompts) if gen_prompts else float("nan"),
        **_unrelated_routed(model, tok, reqs),
    }


def _unrelated_routed(model, tok, reqs) -> dict:
    """For a model with a memory installed (GRACE, BalancEdit, WISE), the share of the neighbourhood / unrelated
    prompts that a memory answers at some token: each such prompt's output is the memory's, not the model's
    ({} for an editor that installs none)."""
    from evaluation.metrics import memory_routing

    routing = memory_routing(model, tok, [n.prompt for r in reqs for n in r.neighborhood])
    return {"unrelated_routed": routing["memory_retain_hit_rate"]} if routing else {}


LOCALITY_TOKENS = 8  # generated after an unrelated question, compared with the unedited model's


def _zsre_reference(model, tok, reqs) -> dict:
    """What the unedited model does on the unrelated questions, which the edited model must reproduce: its
    tokens along each teacher-forced answer, and its greedy continuation."""
    from evaluation.metrics import reference_predictions
    from kedit.core.lm import greedy_generate

    loc = [(n.prompt, n.answer) for r in reqs for n in r.neighborhood]
    prompts = [p for p, _ in loc]
    return {
        "tokens": reference_predictions(model, tok, prompts, [a for _, a in loc]),
        "generated": greedy_generate(model, tok, prompts, LOCALITY_TOKENS),
    }


def _zsre_scores(model, tok, reqs, earlier, reference) -> dict:
    """The MEND / WISE zsRE protocol: teacher-forced token accuracy of the new answer on the question
    (reliability) and its rephrasing (generalization); locality as agreement with the unedited model's
    tokens on the unrelated question. The same three under live generation (``generated_*``): greedy
    decoding must begin with the new answer, and decode the unrelated question as the unedited model did."""
    from evaluation.metrics import begins_with, locality_agreement, mean, shared_subject, zsre_metrics
    from kedit.core.lm import greedy_generate

    s = zsre_metrics(model, tok, reqs)
    loc = [(n.prompt, n.answer) for r in reqs for n in r.neighborhood]
    prompts = [p for p, _ in loc]
    para = [(p, r.target_new, i) for i, r in enumerate(reqs) for p in r.paraphrase_prompts]
    distinct = ~shared_subject(reqs)[[i for _, _, i in para]]  # (n_para,) the rephrasing's subject is its own
    generated_para = begins_with(model, tok, [p for p, _, _ in para], [t for _, t, _ in para])
    same = [a == b for a, b in zip(greedy_generate(model, tok, prompts, LOCALITY_TOKENS), reference["generated"])]
    return {
        "reliability": s["efficacy"],
        "generalization": s["generalization"],
        "generalization_distinct_subject": s["generalization_distinct_subject"],
        "locality": locality_agreement(model, tok, prompts, [a for _, a in loc], reference["tokens"]),
        "generated_reliability": mean(begins_with(model, tok, [r.text for r in reqs], [r.target_new for r in reqs])),
        "generated_generalization": mean(generated_para),
        "generated_generalization_distinct_subject": mean(generated_para[distinct]),
        "generated_locality": mean(torch.tensor(same)),
        "shared_subject": s["shared_subject"],
        **_unrelated_routed(model, tok, reqs),
    }


# protocol -> (what to read on the model before editing, the scores on the final model)
PROTOCOLS = {
    "counterfact": (lambda model, tok, reqs: None, _counterfact_scores),
    "zsre": (_zsre_reference, _zsre_scores),
}


def scored_texts(reqs) -> frozenset[str]:
    """What a benchmark scores besides the edit prompts (rephrasings, neighbourhood and unrelated prompts),
    normalized: an editor must not see any of it."""
    return frozenset(normalize(t) for r in reqs for t in (*r.paraphrase_prompts, *(x.prompt for x in r.neighborhood)))


def require_held_out(method: str, scored: frozenset[str], seen: set[str]) -> None:
    """Refuse a result scored on inputs the editor generated and used as samples: it would measure recall."""
    leaked = sorted(scored & seen)
    if leaked:
        raise KeditError(
            f"{method} used {len(leaked)} scored prompt(s) as samples (first: {leaked[0]!r}): the score would not hold out"
        )


def require_not_trained_on(editor, reqs) -> None:
    """Refuse to score requests that the editor's trained network learned from: it would measure recall."""
    seen = sorted({r.id for r in reqs} & editor.trained_on())
    if seen:
        raise KeditError(
            f"{editor.name}'s network was trained on {len(seen)} of the scored records (first: {seen[0]}); "
            "train it with --holdout on this data"
        )


def latency_ratio(model, tok, prompts: list[str], pairs: int = 7) -> float:
    """What the edit costs inference: one batched forward over ``prompts`` with the model as edited, against the
    same forward with its installed modules bypassed (``editing.patches.bypassed``; weight deltas cost nothing).
    The two run in alternation and the median of the pairs' ratios is taken, so that a change in the machine's
    load between them cancels (timed minutes or hours apart, as before, such a change lands in the ratio)."""
    from editing.patches import bypassed
    from kedit.core.lm import encode_prompts, model_device, pad_batch, pad_id_of

    ids = encode_prompts(tok, prompts)
    input_ids, mask, positions, _ = pad_batch(ids, pad_id_of(tok), "right", model_device(model))

    def seconds() -> float:
        t0 = time.perf_counter()
        model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        return time.perf_counter() - t0

    ratios = []
    with torch.no_grad():
        seconds()  # warm both paths once
        with bypassed(model):
            seconds()
        for _ in range(pairs):
            edited = seconds()
            with bypassed(model):
                base = seconds()
            ratios.append(edited / base)
    return statistics.median(ratios)


def _run_method(
    method: str,
    model_ref: str,
    data: str,
    n: int,
    batch_size: int,
    corpus_path: str | None,
    overrides: dict,
    protocol: str = "counterfact",
    steps_dir: str | None = None,
    sequential: bool = True,
    start: int = 0,
) -> dict:
    """One editor on a fresh model, in its own process (so peak memory is its own). With ``steps_dir`` each
    batch's patches and the editor's state are kept there, and a rerun with the same settings resumes.
    Not ``sequential``: each batch is edited on the unedited model, scored, and reverted."""
    import resource

    from .bench_steps import open_steps, replay, save_step

    model, tok, editor, t_stats = editor_on(model_ref, method, corpus_path, overrides)
    reqs = _cases(data, n, start)
    read, scores_of = PROTOCOLS[protocol]
    require_not_trained_on(editor, reqs)
    assets = editor.provenance()  # the network a trained editor edits with: part of what a result depends on
    if not sequential:
        return _independent(model, tok, editor, reqs, batch_size, read, scores_of) | {"statistics_s": t_stats, "assets": assets}
    reference = read(model, tok, reqs)
    editor.held_out = scored_texts(reqs)
    seen: set[str] = set()
    batches = [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)]
    done, t_edit = 0, 0.0
    root = Path(steps_dir) if steps_dir else None
    if root is not None:
        settings = {"method": method, "model": model_ref, "data": data, "n": n, "batch_size": batch_size}
        settings |= {"corpus": corpus_path, "overrides": overrides, "protocol": protocol, "assets": assets}
        saved = open_steps(root, with_code(settings))
        if saved:
            counts = replay(saved, model, editor)
            done, t_edit = len(saved), counts["edit_s"]
            seen |= counts["samples"]
    bar = tqdm(batches[done:], desc=f"{method}: batches of {batch_size}", unit="batch", initial=done, total=len(batches))
    replayed, t_replayed = sum(len(b) for b in batches[:done]), t_edit
    for i, b in enumerate(bar, start=done):
        t0 = time.perf_counter()
        patches = editor.edit(b)
        editor.commit()
        t_edit += time.perf_counter() - t0
        mine = {normalize(t) for t in editor.samples}
        seen |= mine
        if root is not None:
            save_step(root, i, patches, editor.state_dict(), {"edit_s": t_edit, "samples": sorted(mine)})
    require_held_out(method, editor.held_out, seen)
    earlier = [r for b in batches[:-1] for r in b]
    return {
        **scores_of(model, tok, reqs, earlier, reference),
        "seconds_per_edit": t_edit / max(len(reqs), 1),
        # a resumed run: the edits replayed from an earlier start (whose seconds are in seconds_per_edit, made under
        # whatever else ran then), and the seconds per edit of the edits made in this run alone
        "edits_resumed": replayed,
        "seconds_per_edit_this_run": (t_edit - t_replayed) / max(len(reqs) - replayed, 1),
        # the edited model's forward over the first 64 prompts, against its installs bypassed (memory lookups cost)
        "latency_ratio": latency_ratio(model, tok, [r.text for r in reqs[:64]]),
        "statistics_s": t_stats,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "n_edits": len(reqs),
        "assets": assets,
    }


def _independent(model, tok, editor, reqs, batch_size: int, read, scores_of) -> dict:
    """Each batch edited on the unedited model, scored, reverted (bit for bit): the single-edit protocol of
    MEND's and ROME's papers. Scores are means over requests; there is no retention (nothing accumulates)."""
    import resource

    editor.held_out = scored_texts(reqs)
    seen: set[str] = set()
    batches = [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)]
    totals: dict[str, float] = {}
    t_edit = 0.0
    for b in tqdm(batches, desc=f"{editor.name}: independent batches of {batch_size}", unit="batch"):
        reference = read(model, tok, b)
        t0 = time.perf_counter()
        editor.edit(b)
        t_edit += time.perf_counter() - t0
        seen |= {normalize(t) for t in editor.samples}
        scores = scores_of(model, tok, b, [], reference)
        editor.revert()
        for k, v in scores.items():
            if k != "retention":
                totals[k] = totals.get(k, 0.0) + float(v) * len(b)
    require_held_out(editor.name, editor.held_out, seen)
    return {
        **{k: v / len(reqs) for k, v in totals.items()},
        "seconds_per_edit": t_edit / max(len(reqs), 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "n_edits": len(reqs),
        "sequential": False,
    }


def _unedited(model_ref: str, data: str, n: int, protocol: str = "counterfact", start: int = 0) -> dict:
    model, tok = load_model(model_ref)
    reqs = _cases(data, n, start)
    read, scores_of = PROTOCOLS[protocol]
    scores = scores_of(model, tok, reqs, [], read(model, tok, reqs))
    return {k: v for k, v in scores.items() if k != "retention"}


def bench_editors(
    model_ref: str,
    data: Path,
    methods: list[str],
    n: int,
    batch_size: int,
    corpus: Path | None = None,
    overrides: dict[str, dict] | None = None,
    protocol: str = "counterfact",
    json_out: Path | None = None,
    sequential: bool = True,
    start: int = 0,
) -> dict:
    """N edits in successive batches per method (not ``sequential``: each batch alone on the unedited model,
    reverted after scoring), each method on a fresh model in its own process; the cases are the ``n`` after the
    first ``start`` (a development slice: one the reported runs do not reach); metrics on the final model
    (``protocol``: a key of ``PROTOCOLS``). ``overrides`` maps a method to preset overrides.

    With ``json_out`` the JSON is rewritten after each method and a rerun with the same settings skips the
    methods there; a method stopped mid-run resumes after its last batch from ``<json_out>.steps/<method>``."""
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    corpus_path = _corpus_file(corpus)
    with worker_pool() as pool:
        unedited = pool.submit(_unedited, model_ref, str(data), n, protocol, start).result()
    settings = {
        "model": model_ref,
        "data": str(data),
        "protocol": protocol,
        "n": n,
        "batch_size": batch_size,
        "corpus": corpus_path or "model samples",
        "overrides": overrides or {},
        "sequential": sequential,
    }
    if start:
        settings["start"] = start
    settings = with_code(settings)
    results = resumed(json_out, settings)
    for m in [m for m, r in results.items() if r.get("assets", {}) != _assets_now(model_ref, m)]:
        log.info("%s: the stored result was made with another network; running it again", m)
        del results[m]
    out = {**settings, "unedited": unedited, "results": results, "machine": machine()}

    def args(m: str) -> tuple:
        steps = f"{json_out}.steps/{m}" if json_out else None
        return model_ref, str(data), n, batch_size, corpus_path, (overrides or {}).get(m, {}), protocol, steps, sequential, start

    out = each_method_alone(out, methods, _run_method, args, json_out)
    if json_out:  # a method in the JSON needs its steps no more (and a run written into docs/ must not leave them)
        for m in out["results"]:
            shutil.rmtree(f"{json_out}.steps/{m}", ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(f"{json_out}.steps").rmdir()  # only when empty
    return out


def bench_stream(
    model_ref: str,
    data: Path,
    n: int,
    batch_size: int,
    editor: str | None = None,
    gates: Path | None = None,
    corpus: Path | None = None,
    work_dir: Path | None = None,
    overrides: dict | None = None,
) -> dict:
    """The stream flow on N CounterFact cases: per step, edit / gate / tracking / orchestration seconds,
    bytes per version against a full checkpoint, rollback time; metrics on the final production model.

    With ``work_dir`` the store, the feed and the stream's work stay there: a rerun with the same arguments
    resumes the stream after its last version, and the steps of every part are reported."""
    import json
    import tempfile

    from evaluation.metrics import counterfact_metrics, retention
    from flows.stream import stream
    from kedit.pipeline.config import StreamConfig
    from kedit.store.tracking import Tracker

    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    reqs = _cases(data, n)
    with tempfile.TemporaryDirectory(prefix="kedit-bench-stream-") as tmp:
        root = Path(work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        feed = root / "feed.jsonl"
        feed.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
        uri = f"sqlite:///{root}/mlruns/mlflow.db"
        _copy_trained(model_ref, editor, uri)
        cfg = StreamConfig(
            feeds=(str(feed),),
            model=model_ref,
            editor=editor,
            batch_size=batch_size,
            gates=str(gates) if gates else None,
            tracking_uri=uri,
            corpus=_corpus_file(corpus),
            overrides=overrides or {},
            work_dir=str(root / "work"),
        )
        t0 = time.perf_counter()
        summary = stream(cfg)
        total = time.perf_counter() - t0
        model, tok = load_model(model_ref)
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        unedited = counterfact_metrics(model, tok, reqs)  # the same requests' scores on the base, for the final ones
        rollback_s = None
        if summary["production"]:
            rollback_s = _time_rollback(model, Tracker(uri), summary["registered_model"], summary["production"], root)
        versions = version_history(uri, summary["registered_model"]) if summary["production"] else []
    steps = _all_steps(root / "work", summary["steps"]) if work_dir else summary["steps"]
    for s in steps:
        inside = sum(v for k, v in s.items() if k.startswith("gate:") or k in ("edit", "tracking", "rollback"))
        s["gates_s"] = sum(v for k, v in s.items() if k.startswith("gate:"))
        s["orchestration_s"] = max(0.0, s.get("wall", inside) - inside)
        if "version_bytes" in s:
            s["version_fraction_of_checkpoint"] = s["version_bytes"] / full_bytes
    accepted_keys = {key for s in steps if s["verdict"] == "accepted" for key in s.get("keys", [])}
    final_reqs = [r for r in reqs if r.key in accepted_keys]
    final = counterfact_metrics(model, tok, reqs) | {"retention_of_accepted": retention(model, tok, final_reqs)}
    walls = sum(s.get("wall", 0.0) for s in steps)
    overhead = sum(s["orchestration_s"] + s.get("tracking", 0.0) for s in steps)
    return {
        "model": model_ref,
        "editor": editor,
        "data": str(data),
        "n": n,
        "batch_size": batch_size,
        "overrides": overrides or {},
        "total_s": total,
        "full_checkpoint_bytes": full_bytes,
        "summary": {k: v for k, v in summary.items() if k not in ("steps", "feeds")},
        "orchestration_plus_tracking_fraction": overhead / walls if walls else float("nan"),
        "max_version_fraction": max((s.get("version_fraction_of_checkpoint", 0.0) for s in steps), default=0.0),
        "max_rollback_s": max((s.get("rollback", 0.0) for s in steps), default=0.0),
        "rollback_of_last_version_s": rollback_s,
        "steps": steps,
        "versions": versions,
        "unedited": unedited,
        "final": final,
        "machine": machine(),
    }


HISTORY_METRICS = ("efficacy", "generalization", "specificity", "specificity_drop", "retention", "retention_scored",
                   "drawdown_base", "drawdown_prev", "drawdown_base_unrestated", "retain_restated",
                   "cap_all_regression_base/kedit_ppl/word_perplexity",
                   "cap_all_regression_base/kedit_mc/acc")  # fmt: skip


def _time_rollback(model, tracker, name: str, production: str, root: Path) -> float:
    """Seconds to roll the last version back (``Undo.restore`` of what its patches touched), leaving ``model`` at
    ``production``. Its patches are applied on its parent, as the stream applied them: applied again on top of
    themselves, a version that installed a module names parameters the install has since replaced (a codebook
    wrapped by a larger one)."""
    from kedit.store.versions import fetch, rebuild

    chain = tracker.chain(name, production)
    rebuild(model, tracker, name, chain[-2].version if len(chain) > 1 else None, None)
    last = fetch(tracker, chain[-1], root / "last-version", None)
    undo = last.patches.apply(model)
    t0 = time.perf_counter()
    undo.restore(model)
    seconds = time.perf_counter() - t0
    last.patches.apply(model)
    return seconds


def version_history(uri: str, name: str | None = None) -> list[dict]:
    """Per version of production's chain, oldest first: its edit count and the gate metrics of the attempt that
    made it (the batch's efficacy, generalization and specificity; retention of earlier edits; drawdown;
    capability against the base), read from the MLflow store."""
    from kedit.store.tracking import T_ATTEMPT_RUN, T_N_EDITS, Tracker

    tracker = Tracker(uri)
    if name is None:
        names = [rm.name for rm in tracker.client.search_registered_models() if not rm.name.endswith("-mend")]
        if len(names) != 1:
            raise KeditError(f"{uri}: name the registered model (found {', '.join(names) or 'none'})")
        name = names[0]
    prod = tracker.production(name)
    rows = []
    for v in tracker.chain(name, prod.version if prod else None):
        metrics = tracker.client.get_run(v.tags[T_ATTEMPT_RUN]).data.metrics if T_ATTEMPT_RUN in v.tags else {}
        rows.append(history_row(v.version, int(v.tags.get(T_N_EDITS, 0)), metrics))
    return rows


def history_row(version: str, n_edits: int, metrics: dict[str, float]) -> dict:
    """A version's row of ``version_history`` from its attempt's metrics. Capability is the whole's regression
    against the base (``cap_all_regression_base``), not a sampled step's checked one; a stream from before the
    sampled gate checked every document on every step, so there the checked regression is the whole's."""
    older = {k.replace("cap_regression_base/", "cap_all_regression_base/"): v for k, v in metrics.items()}
    metrics = older | metrics
    return {"version": version, "n_edits": n_edits} | {k: metrics[k] for k in HISTORY_METRICS if k in metrics}


# the published 2,000-edit AlphaEdit row (arXiv:2410.02355, Table 1, LLaMA3-8B, CounterFact, batches of 100),
# drawn beside a long run's last version
PUBLISHED_ALPHAEDIT_2000 = {"efficacy": 0.9890, "generalization": 0.9422, "specificity": 0.6788}
PUBLISHED_FROM = 1000  # edits a chain must reach for the published row to be drawn beside it


def plot_history(rows: list[dict], out: Path, title: str) -> Path:
    """A picture of ``version_history``: per version over the edits applied, its batch's efficacy,
    generalization and specificity (top; versions of a single retried fact left out), retention of earlier edits
    and knowledge drawdown against the base (middle), and the lm-eval capability regression against the base
    (bottom); the published 2,000-edit AlphaEdit row as hollow markers at 2,000 edits, beside a chain of at least
    ``PUBLISHED_FROM`` edits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True, height_ratios=(3, 2, 2))
    panels = (
        (("efficacy", "generalization", "specificity"), "the version's own batch"),
        (("retention", "drawdown_base", "drawdown_base_unrestated"), "earlier edits held / known facts lost"),
        (("cap_all_regression_base/kedit_ppl/word_perplexity", "cap_all_regression_base/kedit_mc/acc"), "regression vs base"),
    )
    # a fact retried alone is a version of one fact, whose own scores say nothing next to a batch's
    sizes = [r["n_edits"] - (rows[i - 1]["n_edits"] if i else 0) for i, r in enumerate(rows)]
    batches = [r for r, n in zip(rows, sizes) if n > 1 or max(sizes) == 1]
    for i, (ax, (keys, label)) in enumerate(zip(axes, panels)):
        for key in keys:
            kept = [r for r in (batches if i == 0 else rows) if key in r]
            ax.plot([r["n_edits"] for r in kept], [r[key] for r in kept], marker="o", markersize=3, label=key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    # beside a long run only: drawn at 2,000 edits, it would squeeze a 200-edit stream into a tenth of the axis
    if rows and max(r["n_edits"] for r in rows) >= PUBLISHED_FROM:
        for key, colour in zip(("efficacy", "generalization", "specificity"), ("C0", "C1", "C2")):
            axes[0].plot([2000], [PUBLISHED_ALPHAEDIT_2000[key]], marker="o", markersize=9, markerfacecolor="none", color=colour)
        axes[0].plot([], [], marker="o", markerfacecolor="none", color="grey", linestyle="none",
                     label="AlphaEdit paper, LLaMA3-8B, 2,000 edits")  # fmt: skip
    axes[0].set_ylim(-0.02, 1.05)
    axes[2].axhline(0.0, color="grey", linewidth=0.8)
    axes[2].set_xlabel("edits applied to the model")
    for ax in axes:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    axes[0].set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _all_steps(work: Path, this_run: list[dict]) -> list[dict]:
    """Every attempt of the stream in ``work``, also those of earlier parts of a stream that was stopped and resumed."""
    from kedit.pipeline.attempt import STEPS_FILE

    path = work / STEPS_FILE
    if not path.is_file():
        return this_run
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def known_cases(model_ref: str, data: Path, n: int, out: Path, chunk: int = 64) -> dict:
    """The first ``n`` CounterFact records the unedited model already answers (its greedy continuation of the
    prompt, cut to ``target_true``'s number of words, is ``target_true``), written to ``out`` as the input's
    records: facts a model knows well are harder to move and easier to damage, and get their own table."""
    from kedit.core.lm import current_answers

    try:
        raw = json.loads(Path(data).read_text())
    except json.JSONDecodeError as e:
        raise KeditError(f"{data}: line {e.lineno}: bench known reads a CounterFact JSON list with case_id ({e.msg})") from None
    if not isinstance(raw, list) or not all(isinstance(r, dict) and "case_id" in r for r in raw):
        raise KeditError(f"{data}: bench known reads a CounterFact JSON list whose records have a case_id")
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    model, tok = load_model(model_ref)
    reqs = _cases(data, None)
    known, scanned = [], 0
    with tqdm(total=n, desc="records the model already answers", unit="record") as bar:
        for i in range(0, len(reqs), chunk):
            part = reqs[i : i + chunk]
            answers = current_answers(model, tok, [r.text for r in part], [len(r.target_true.split()) for r in part])
            scanned += len(part)
            hits = [r for r, a in zip(part, answers) if a is not None and normalize(a) == normalize(r.target_true)]
            known += hits
            bar.update(min(len(hits), n - bar.n))
            if len(known) >= n:
                break
    ids = {r.id for r in known[:n]}
    records = [rec for rec in raw if f"cf-{rec['case_id']}" in ids]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(records, indent=1))
    return {"model": model_ref, "data": str(data), "n": len(records), "scanned": scanned, "ids": sorted(ids), "out": str(out)}


def bench_targets(
    model_ref: str,
    data: Path,
    n: int,
    batch_size: int,
    method: str | None = None,
    corpus: Path | None = None,
    device: str | None = None,
    overrides: dict | None = None,
) -> dict:
    """Target vectors optimized jointly per batch against one request at a time (the research
    code's loop), each inside the same full sequential edit of N requests on one model.

    Everything but the target phase is shared, so efficacy must match; the model is reverted
    bit for bit between the two runs (checked by fingerprint)."""
    from editing import DEFAULT_EDITOR
    from evaluation.metrics import counterfact_metrics
    from kedit.store.versions import model_fingerprint

    method = method or DEFAULT_EDITOR
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    model, tok, editor, _ = editor_on(model_ref, method, _corpus_file(corpus), overrides, device)
    dev = next(model.parameters()).device
    reqs = _cases(data, n)
    if not callable(getattr(editor, "compute_targets", None)):
        raise KeditError(f"{method!r} has no separate target phase (compute_targets); use a MEMIT-family method")
    editor.templates()
    base = model_fingerprint(None, model)
    joint = editor.compute_targets
    editor.compute_targets(reqs[:1])  # warm-up: kernels, allocator, caches

    def one_at_a_time(requests):
        return torch.cat([joint([r]) for r in requests])  # (n, d)

    batches = [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)]
    runs: dict[str, dict] = {}
    targets: dict[str, list[torch.Tensor]] = {}
    for mode, fn in (("batched", joint), ("per_request", one_at_a_time)):
        clock = [0.0]
        targets[mode] = []

        def timed(requests, fn=fn, clock=clock, out=targets[mode]):
            _sync(dev)
            t0 = time.perf_counter()
            z = fn(requests)
            _sync(dev)
            clock[0] += time.perf_counter() - t0
            out.append(z.detach().float().cpu())
            return z

        # an instance attribute shadows the method: the benchmark's only intervention
        editor.compute_targets = timed
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for b in tqdm(batches, desc=f"{method}, targets {mode.replace('_', ' ')}", unit="batch"):
            editor.edit(b)
        _sync(dev)
        edit_s = time.perf_counter() - t0
        scores = counterfact_metrics(model, tok, reqs)
        runs[mode] = {
            "targets_s": clock[0],
            "edit_s": edit_s,
            "targets_s_per_edit": clock[0] / len(reqs),
            "efficacy": scores["efficacy"],
            "generalization": scores["generalization"],
            "specificity": scores["specificity"],
            "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        }
        for _ in batches:
            editor.revert()
        if model_fingerprint(None, model) != base:
            raise KeditError("reverting the edits did not restore the base weights")
    del editor.compute_targets
    zb, zl = torch.cat(targets["batched"]), torch.cat(targets["per_request"])
    rel = (zb - zl).norm(dim=-1) / zl.norm(dim=-1).clamp(min=1e-12)  # (n,)
    return {
        "model": model_ref,
        "method": method,
        "data": str(data),
        "n": len(reqs),
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype),
        "overrides": overrides or {},
        "batched": runs["batched"],
        "per_request": runs["per_request"],
        "targets_speedup": runs["per_request"]["targets_s"] / runs["batched"]["targets_s"],
        "target_rel_diff_median": float(rel.median()),
        "target_rel_diff_max": float(rel.max()),
        "machine": machine(),
    }


def bench_fill(
    model_ref: str,
    data: Path,
    n: int,
    batch_size: int,
    method: str | None = None,
    corpus: Path | None = None,
    overrides: dict | None = None,
) -> dict:
    """What reading ``target_true`` from the model costs, against the edit it precedes.

    The first ``n`` CounterFact requests lose their ``target_true``; per batch, the stream's reading
    (``current_answers``: one batched greedy generation, cut as the pipeline cuts it) is timed on the current
    model, then the batch is edited and committed. Reported: both times per batch, their ratio, how often the
    answer read equals CounterFact's recorded old value, and efficacy on the final model against each."""
    import dataclasses

    from editing import DEFAULT_EDITOR
    from evaluation.metrics import edit_success, mean
    from kedit.core.facts.schema import normalize
    from kedit.core.lm import current_answers

    method = method or DEFAULT_EDITOR
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    model, tok, editor, _ = editor_on(model_ref, method, _corpus_file(corpus), overrides)
    reqs = _cases(data, n)
    current_answers(model, tok, [reqs[0].text], [1])  # warm-up
    batches = [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)]
    steps, filled = [], []
    for b in tqdm(batches, desc=f"{method}: read target_true, then edit", unit="batch"):
        t0 = time.perf_counter()
        answers = current_answers(model, tok, [r.text for r in b], [len(r.target_new.split()) for r in b])
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        editor.edit(b)
        editor.commit()
        edit_s = time.perf_counter() - t0
        steps.append({"fill_s": fill_s, "edit_s": edit_s, "fill_fraction": fill_s / edit_s})
        filled += [dataclasses.replace(r, target_true=a) for r, a in zip(b, answers)]
    same = [a.target_true is not None and normalize(a.target_true) == normalize(r.target_true) for a, r in zip(filled, reqs)]
    return {
        "model": model_ref,
        "method": method,
        "data": str(data),
        "n": len(reqs),
        "batch_size": batch_size,
        "steps": steps,
        "max_fill_fraction": max(s["fill_fraction"] for s in steps),
        "mean_fill_fraction": sum(s["fill_s"] for s in steps) / sum(s["edit_s"] for s in steps),
        "answer_equals_recorded_old_value": sum(same) / len(same),
        "answers": [{"id": r.id, "recorded": r.target_true, "read": a.target_true} for r, a in zip(reqs, filled)],
        "efficacy_against_recorded": mean(edit_success(model, tok, reqs)),
        "efficacy_against_read": mean(edit_success(model, tok, filled)),
        "machine": machine(),
    }
