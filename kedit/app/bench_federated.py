"""FLEKE's protocol measured (``kedit bench federated``): N clients of one base model, T time slots.

The facts are dealt to clients and slots by ``kedit.pipeline.slots.plan`` (by relation, or ZsRE's clusters),
the plan ``kedit federate`` runs through the clients' gated streams. Three runs over the same plan:

- ``alone``: each client edits its own copy with no sharing;
- ``federated``: each client's editor looks its facts up in the MKV store first (the other clients' uploads of
  earlier slots), optimizes only what it does not find, and uploads what it optimized when the slot ends;
- ``central``: one model edits every fact once, slot by slot (each slot's new facts as one batch).

Each client's facts are scored on its final model (on the central model for ``central``). Reported: per slot
and client the facts, the reused ones and the target phase's seconds; the mean quality over clients; the
reused share after the first slot; the target phase's time with and without reuse; and the reused vectors that
came from another fact than the one they were used for (the bench knows which fact each upload row was;
the store does not).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kedit.app.bench import _cases, _corpus_file, editor_on, machine, resumed, save_json, with_code, worker_pool
from kedit.core.facts import EditRequest
from kedit.core.models import KNOWN_MODELS, pull
from kedit.pipeline.slots import by_cluster, by_relation, plan

log = logging.getLogger(__name__)

MODES = ("alone", "federated", "central")


class Clients:
    """N clients' weights on one model in memory: each client's values of the weights the family edits."""

    def __init__(self, model, names: list[str], n: int):
        self.model, self.names = model, names
        base = {k: model.get_parameter(k).detach().clone() for k in names}
        self.state = [{k: v.clone() for k, v in base.items()} for _ in range(n)]
        self.current: int | None = None

    @torch.no_grad()
    def use(self, c: int) -> None:
        if self.current is not None:
            self.state[self.current] = {k: self.model.get_parameter(k).detach().clone() for k in self.names}
        for k in self.names:
            self.model.get_parameter(k).copy_(self.state[c][k])
        self.current = c


def _run(
    mode: str,
    method: str,
    model_ref: str,
    batches: list[list[list[EditRequest]]],
    corpus_path: str | None,
    overrides: dict,
    threshold: float,
    min_share: float,
    refine: bool,
) -> dict:
    from editing import make_editor
    from evaluation.metrics import counterfact_metrics
    from kedit.store.mkv import MKVExchange, MKVStore, compat_for
    from kedit.store.versions import model_fingerprint

    model, tok, first, _ = editor_on(model_ref, method, corpus_path, overrides)
    if not first.shares_targets:
        raise ValueError(f"{method} does not share its targets (its target depends on its own state)")
    n_clients, n_slots = len(batches[0]), len(batches)
    fingerprint = model_fingerprint(None, model)
    names = [first.weight_name("mlp_out", layer) for layer in first.hparams.layers]
    per_slot: list[dict] = []
    facts_of: list[dict[str, EditRequest]] = [{} for _ in range(n_clients)]
    if mode == "central":
        editors = [first]
        seen: set[str] = set()
        for t in tqdm(range(n_slots), desc=f"{method} central: slots", unit="slot"):
            batch = [r for row in batches[t] for r in row if not (r.id in seen or seen.add(r.id))]
            t0 = time.perf_counter()
            first.edit(batch)
            first.commit()
            per_slot.append({"slot": t, "client": "central", "facts": len(batch), "reused": 0})
            per_slot[-1] |= {"target_s": sum(first.diagnostics["target_s"]), "edit_s": time.perf_counter() - t0}
        for c in range(n_clients):
            facts_of[c] = {r.id: r for t in range(n_slots) for r in batches[t][c]}
        scores = [counterfact_metrics(model, tok, list(f.values())) for f in facts_of]
        return _summary(per_slot, scores, [], n_slots)

    editors = [first] + [
        make_editor(method, model, tok, overrides, assets={"corpus": first.corpus}) for _ in range(n_clients - 1)
    ]
    for e in editors:
        e.prepare()
    clients = Clients(model, names, n_clients)
    store = MKVStore(Path(tempfile.mkdtemp(prefix="kedit-mkv-")))
    exchanges = []
    if mode == "federated":
        compat = compat_for(first, fingerprint)
        exchanges = [MKVExchange(store.client(f"client{c}"), compat, threshold, min_share, refine) for c in range(n_clients)]
        for e, x in zip(editors, exchanges):
            e.exchange = x
    uploaded: dict[str, list[str]] = {}  # "client/slot-t" -> fact id of each row: the bench's knowledge only
    wrong = 0
    bar = tqdm(total=n_slots * n_clients, desc=f"{method} {mode}: client slots", unit="batch")
    for t in range(n_slots):
        for c in range(n_clients):
            batch = batches[t][c]
            clients.use(c)
            e = editors[c]
            t0 = time.perf_counter()
            patches = e.edit(batch)
            e.commit()
            if not set(patches.weights.parts) <= set(names):
                raise RuntimeError(f"{method} edited {sorted(set(patches.weights.parts) - set(names))}, outside {names}")
            reused = e.diagnostics.get("target_reused", [0.0] * len(batch))
            if exchanges:
                sources = exchanges[c].sources[-len(batch) :]
                wrong += sum(1 for r, s in zip(batch, sources) if s and uploaded[s.split("#")[0]][int(s.split("#")[1])] != r.id)
                uploaded[f"client{c}/slot-{t}"] = [r.id for r, u in zip(batch, reused) if not u]
            per_slot.append({"slot": t, "client": f"client{c}", "facts": len(batch), "reused": int(sum(reused))})
            per_slot[-1] |= {"target_s": sum(e.diagnostics["target_s"]), "edit_s": time.perf_counter() - t0}
            per_slot[-1]["lookup_s"] = sum(e.diagnostics.get("target_lookup_s", [0.0]))
            steps = e.diagnostics.get("target_steps", [0.0] * len(batch))
            per_slot[-1]["optimized_steps"] = sum(steps)  # with refine, the steps taken from reused vectors too
            per_slot[-1]["reused_steps"] = sum(s for s, u in zip(steps, reused) if u)
            per_slot[-1]["reused_stepped"] = sum(1 for s, u in zip(steps, reused) if u and s > 0)
            facts_of[c] |= {r.id: r for r in batch}
            bar.update(1)
        for x in exchanges:
            x.upload(t)
    bar.close()
    scores = []
    for c in range(n_clients):
        clients.use(c)
        scores.append(counterfact_metrics(model, tok, list(facts_of[c].values())))
    out = _summary(per_slot, scores, [x.refused for x in exchanges], n_slots)
    out["wrong_fact_reuses"] = wrong
    return out


def _summary(per_slot: list[dict], scores: list[dict], refused: list[dict], n_slots: int) -> dict:
    later = [s for s in per_slot if s["slot"] > 0]
    keys = ("efficacy", "generalization", "specificity")
    out = {k: sum(s[k] for s in scores) / len(scores) for k in keys}
    out |= {
        "facts_edited": sum(s["facts"] for s in per_slot),
        "reused_share_after_slot_0": sum(s["reused"] for s in later) / max(1, sum(s["facts"] for s in later)),
        "target_s": sum(s["target_s"] for s in per_slot),
        "target_s_after_slot_0": sum(s["target_s"] for s in later),
        # of which keys and lookups (0 without sharing), and the optimization steps summed over the facts optimized
        "lookup_s_after_slot_0": sum(s.get("lookup_s", 0.0) for s in later),
        "optimized_steps_after_slot_0": sum(s.get("optimized_steps", 0.0) for s in later),
        # refine: the reused vectors that fell short on their reuser, and the steps taken from them
        "reused_stepped_after_slot_0": sum(s.get("reused_stepped", 0) for s in later),
        "reused_steps_after_slot_0": sum(s.get("reused_steps", 0.0) for s in later),
        "edit_s": sum(s["edit_s"] for s in per_slot),
        "per_client": [{k: s[k] for k in keys} for s in scores],
        "per_slot": per_slot,
    }
    if refused:
        reasons = sorted({why for counts in refused for why in counts})
        out["refused"] = {why: sum(counts.get(why, 0) for counts in refused) for why in reasons}
    return out


def bench_federated(
    model_ref: str,
    data: Path,
    methods: list[str],
    clients: int = 8,
    slots: int = 10,
    own: int = 2,
    shared: int = 2,
    threshold: float = 0.99,
    min_share: float = 0.0,
    refine: bool = False,
    seed: int = 0,
    corpus: Path | None = None,
    overrides: dict[str, dict] | None = None,
    json_out: Path | None = None,
    split: str = "relation",
) -> dict:
    """Each method in the three modes on one plan; resumes from ``json_out`` per method and mode."""
    if model_ref in KNOWN_MODELS:
        pull(model_ref)
    reqs = _cases(data, None)
    groups = None
    if split == "cluster":
        from kedit.core.models import load_model

        model, tok = load_model(model_ref)
        groups = by_cluster(reqs, model, tok, clients, seed)
        del model
    batches = plan(reqs, clients, slots, own, shared, seed, groups)
    corpus_path = _corpus_file(corpus)
    settings = {"model": model_ref, "data": str(data), "split": split, "clients": clients, "slots": slots, "own": own}
    settings["shared"] = shared
    settings["refine"] = refine
    settings |= {"threshold": threshold, "min_share": min_share, "seed": seed, "corpus": corpus_path or "model samples"}
    settings["overrides"] = overrides or {}
    settings = with_code(settings)
    out = {**settings, "results": resumed(json_out, settings), "machine": machine()}
    out["group_sizes"] = sorted(len(g) for g in (groups if groups is not None else by_relation(reqs)).values())
    for method in methods:
        done = out["results"].setdefault(method, {})
        for mode in MODES:
            if mode in done:
                continue
            with worker_pool() as pool:
                sets = (overrides or {}).get(method, {})
                args = (mode, method, model_ref, batches, corpus_path, sets, threshold, min_share, refine)
                done[mode] = pool.submit(_run, *args).result()
            save_json(json_out, out)
        alone, fed = done["alone"], done["federated"]
        done["federated_over_alone"] = {k: _ratio(fed[k], alone[k]) for k in ("efficacy", "generalization", "specificity")}
        done["target_time_cut"] = 1 - fed["target_s_after_slot_0"] / alone["target_s_after_slot_0"]
        if alone.get("optimized_steps_after_slot_0"):
            done["optimized_steps_cut"] = 1 - fed["optimized_steps_after_slot_0"] / alone["optimized_steps_after_slot_0"]
        save_json(json_out, out)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(result: dict) -> str:
    rows = []
    for method, modes in result["results"].items():
        for mode in MODES:
            if mode in modes:
                m = modes[mode]
                rows.append(
                    f"{method:10} {mode:9} eff {m['efficacy']:.3f} gen {m['generalization']:.3f} spec {m['specificity']:.3f}"
                    f"  reused {m['reused_share_after_slot_0']:.2f}  target {m['target_s_after_slot_0']:.0f} s (slots 1+)"
                )
        if "target_time_cut" in modes:
            r = modes["federated_over_alone"]
            rows.append(
                f"{method:10} federated / alone: eff {r['efficacy']:.3f} gen {r['generalization']:.3f} "
                f"spec {r['specificity']:.3f}; target phase cut by {modes['target_time_cut']:.0%}"
            )
    return "\n".join(rows)
