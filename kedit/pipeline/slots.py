"""A federation's time slots over one data file (FLEKE's protocol, run by ``flows/federate.py``).

The file's facts are split into clients by relation (kedit's facts carry no relation id; the prompt template
stands for it) or, with ``split="cluster"`` (FLEKE's ZsRE split, whose questions share no templates), into
clusters of their questions' embeddings by spectral clustering. The groups are dealt to clients, largest
first, each to the client with the fewest facts so far, so that every client's facts are of its own relations
(or cluster). In slot t each client receives ``own`` new facts of its own and, from slot 1 on, ``shared``
facts that another client received in an earlier slot (knowledge that reaches several organisations: the same
fact, the same statement). Each client's slot is written as a feed of its own, which that client's stream
applies; the stream shares its target vectors through the MKV store (``kedit.pipeline.federation``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from kedit.core.facts import EditRequest, load_facts
from kedit.store.tracking import T_VERDICT, Tracker

from .config import FederationConfig, StreamError

log = logging.getLogger(__name__)

# what a slot's row counts: the facts dealt, how the client's stream settled them (its summary's counts), and the
# vectors its accepted attempts reused from the store and offered to it
SETTLED = ("accepted", "did_not_hold", "quarantined", "held_back", "skipped")
COUNTS = ("facts", *SETTLED, "reused", "offered")


def by_relation(reqs: list[EditRequest]) -> dict[str, list[EditRequest]]:
    """The facts grouped by prompt template (CounterFact's stand-in for a relation)."""
    groups: dict[str, list[EditRequest]] = {}
    for r in reqs:
        groups.setdefault(r.prompt, []).append(r)
    return groups


def embed(model, tokenizer, texts: list[str], batch: int = 64) -> torch.Tensor:
    """(n, d) unit-normed sentence embeddings: the mean of the model's last hidden states over each text's tokens.
    (FLEKE clusters ZsRE with a sentence encoder; none is reachable here, so the base model stands in.)"""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], return_tensors="pt", padding=True).to(next(model.parameters()).device)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()  # (b, T, d)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (b, T, 1)
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu())
    return torch.cat(out)


def spectral_groups(embeddings: torch.Tensor, k: int, seed: int) -> list[int]:
    """A cluster label per row: spectral clustering on a nearest-neighbour graph of the embeddings."""
    from sklearn.cluster import SpectralClustering

    n_neighbors = min(10, len(embeddings) - 1)
    sc = SpectralClustering(
        k, affinity="nearest_neighbors", n_neighbors=n_neighbors, random_state=seed, assign_labels="cluster_qr"
    )
    return [int(x) for x in sc.fit_predict(embeddings.numpy())]


def by_cluster(reqs: list[EditRequest], model, tokenizer, clients: int, seed: int) -> dict[str, list[EditRequest]]:
    """The facts in ``clients`` clusters of their questions' embeddings (FLEKE's ZsRE split)."""
    labels = spectral_groups(embed(model, tokenizer, [r.text for r in reqs]), clients, seed)
    groups: dict[str, list[EditRequest]] = {}
    for r, label in zip(reqs, labels):
        groups.setdefault(f"cluster-{label}", []).append(r)
    return groups


def plan(
    reqs: list[EditRequest],
    clients: int,
    slots: int,
    own: int,
    shared: int,
    seed: int,
    groups: dict[str, list[EditRequest]] | None = None,
) -> list[list[list[EditRequest]]]:
    """``batches[t][c]``: the facts client c receives in slot t (see the module's docstring); ``groups`` (default:
    by relation) are dealt to clients whole."""
    groups = groups if groups is not None else by_relation(reqs)
    mine: list[list[EditRequest]] = [[] for _ in range(clients)]
    for template in sorted(groups, key=lambda k: (-len(groups[k]), k)):
        min(mine, key=len).extend(groups[template])
    short = [c for c in range(clients) if len(mine[c]) < own * slots]
    if short:
        have, need = len(mine[short[0]]), own * slots
        raise StreamError(
            f"{len(reqs)} facts in {clients} clients leave client {short[0]} {have}; {own} x {slots} slots need {need}"
        )
    batches: list[list[list[EditRequest]]] = []
    seen: list[set[str]] = [set() for _ in range(clients)]
    for t in range(slots):
        row = []
        for c in range(clients):
            batch = mine[c][t * own : (t + 1) * own]
            if t and shared:
                pool = [r for s in batches for o, b in enumerate(s) if o != c for r in b if r.id not in seen[c]]
                pool = list({r.id: r for r in pool}.values())
                g = torch.Generator().manual_seed(seed * 1_000_003 + t * 1_000 + c)
                batch += [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:shared]]
            seen[c] |= {r.id for r in batch}
            row.append(batch)
        batches.append(row)
    return batches


def slot_feeds(cfg: FederationConfig) -> list[list[str]]:
    """Deal the data file's facts to the clients and slots and write each client's slot as a feed (kedit's own
    format) at ``<work_dir>/federation/slot-T/CLIENT.jsonl``; returns ``feeds[t][c]``. The same file and settings
    write the same feeds, byte for byte, so a federation run again finds what its clients' streams already applied."""
    data = cfg.stream.feeds[0]
    reqs = load_facts(data, cfg.stream.fmt, limits=cfg.stream.limits).accepted
    batches = plan(reqs, cfg.clients, cfg.slots, cfg.own, cfg.shared, cfg.seed, _groups(cfg, reqs))
    log.info("%s: %d facts dealt to %d clients over %d slots (%s split)", data, len(reqs), cfg.clients, cfg.slots, cfg.split)
    return _write_feeds(cfg, batches)


def _groups(cfg: FederationConfig, reqs: list[EditRequest]) -> dict[str, list[EditRequest]] | None:
    """The groups dealt to clients whole: None (by relation, the plan's default) or the embeddings' clusters."""
    if cfg.split != "cluster":
        return None
    from kedit.core.models import load_model

    model, tok = load_model(cfg.stream.model, cfg.stream.device)
    return by_cluster(reqs, model, tok, cfg.clients, cfg.seed)  # the model goes with this frame, before any client loads


def _write_feeds(cfg: FederationConfig, batches: list[list[list[EditRequest]]]) -> list[list[str]]:
    root = Path(cfg.stream.work_dir) / "federation"
    feeds = []
    for t, row in enumerate(batches):
        (root / f"slot-{t}").mkdir(parents=True, exist_ok=True)
        paths = []
        for c, batch in enumerate(row):
            path = root / f"slot-{t}" / f"{cfg.client_name(c)}.jsonl"
            path.write_text("".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in batch), encoding="utf-8")
            paths.append(str(path))
        feeds.append(paths)
    return feeds


def slot_row(cfg: FederationConfig, t: int, c: int, summary: dict) -> dict:
    """One client's slot as the federation reports it: the facts dealt to it, what its stream settled, and what
    its accepted attempts took from the store and offered to it (read from the stream's attempt runs; a fact
    retried alone after its batch is counted again). A slot a rerun finds done reports its facts as skipped."""
    tracker = Tracker(cfg.stream.tracking_uri)
    registered = summary["registered_model"]
    parent = f"tags.`mlflow.parentRunId` = '{summary['run_id']}' and tags.`{T_VERDICT}` = 'accepted'"
    attempts = tracker.runs(registered, "attempt", extra=parent)
    row = {"slot": t, "client": cfg.client_name(c), "registered_model": registered, "production": summary["production"]}
    row["facts"] = summary["records"]
    row |= {k: summary[k] for k in SETTLED}
    for what in ("reused", "offered"):
        row[what] = int(sum(run.data.metrics.get(f"mkv_{what}", 0.0) for run in attempts))
    return row


def federation_summary(rows: list[dict]) -> dict:
    """The slots' rows and their totals: the facts the clients' streams accepted, and the vectors reused from the
    store against the facts dealt after the first slot (FLEKE's reuse rate; the first slot has nothing to find)."""
    totals = {k: sum(r[k] for r in rows) for k in COUNTS}
    later = [r for r in rows if r["slot"] > 0]
    dealt_later = sum(r["facts"] for r in later)
    totals["reused_share_after_slot_0"] = sum(r["reused"] for r in later) / dealt_later if dealt_later else 0.0
    production = {r["registered_model"]: r["production"] for r in rows}  # the last row of a client is its latest
    return {"slots": rows, "totals": totals, "production": production}


def slots_table(result: dict) -> str:
    """The federation's slots as text: one line per client and slot, then the totals."""
    form = "{:>4}  {:<12} {:>10}" + " {:>12}" * len(COUNTS)
    lines = [form.format("slot", "client", "production", *(k.replace("_", " ") for k in COUNTS))]
    for r in result["slots"]:
        lines.append(form.format(r["slot"], r["client"], r["production"] or "-", *(r[k] for k in COUNTS)))
    t = result["totals"]
    lines.append(
        f"accepted {t['accepted']}; vectors reused {t['reused']} ({t['reused_share_after_slot_0']:.0%} of the facts after slot 0)"
    )
    return "\n".join(lines)
