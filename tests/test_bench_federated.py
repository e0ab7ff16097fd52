"""`kedit bench federated`: the plan (facts split by relation, shared facts from earlier slots of other
clients) and the three runs on the tiny trained model."""

from __future__ import annotations

import pytest

from kedit.app.bench_federated import bench_federated
from kedit.app.tiny import CORPUS, train_tiny, write_jsonl
from kedit.core.facts import EditRequest
from kedit.pipeline.config import StreamError
from kedit.pipeline.slots import plan

SPEAKS = {"prompt": "{} speaks", "neighborhood": [{"prompt": "eve speaks", "answer": "english"}]}
CAPITAL = {"prompt": "the capital of {} is", "neighborhood": [{"prompt": "the capital of italy is", "answer": "rome"}]}
EDITS = [
    {"id": "a", "subject": "carol", "target_new": "german", "target_true": "french", **SPEAKS},
    {"id": "b", "subject": "dave", "target_new": "english", "target_true": "german", **SPEAKS},
    {"id": "c", "subject": "england", "target_new": "london", "target_true": "paris", **CAPITAL},
    {"id": "d", "subject": "asia", "target_new": "madrid", "target_true": "berlin", **CAPITAL},
]
for r in EDITS:
    r["paraphrase_prompts"] = [f"the city {r['prompt'].format(r['subject'])}"]
MEMIT = {"layers": [1, 2], "solve.mom2_weight": 1.0, "statistics.samples": 40, "statistics.length": 16}
MEMIT |= {"templates.count": 2, "templates.length": 3}


def requests():
    return [EditRequest.from_dict(r) for r in EDITS]


def test_the_plan_splits_by_relation_and_shares_only_what_another_client_had_earlier():
    batches = plan(requests(), clients=2, slots=2, own=1, shared=1, seed=0)
    assert [[r.id for r in b] for b in batches[0]] == [["c"], ["a"]]  # one template per client
    assert [[r.id for r in b] for b in batches[1]] == [["d", "a"], ["b", "c"]]  # then the other's slot-0 fact
    with pytest.raises(StreamError, match="need 3"):
        plan(requests(), clients=2, slots=3, own=1, shared=0, seed=0)


def test_spectral_groups_recover_planted_clusters_and_the_plan_deals_them_whole():
    import torch

    from kedit.pipeline.slots import by_relation, spectral_groups

    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3, 16) * 5
    points = torch.cat([centers[i] + 0.1 * torch.randn(20, 16, generator=g) for i in range(3)])  # 3 blobs of 20
    labels = spectral_groups(torch.nn.functional.normalize(points, dim=-1), 3, seed=0)
    assert [len(set(labels[i * 20 : (i + 1) * 20])) for i in range(3)] == [1, 1, 1] and len(set(labels)) == 3
    assert labels == spectral_groups(torch.nn.functional.normalize(points, dim=-1), 3, seed=0)  # deterministic

    reqs = requests()
    groups = {"x": [reqs[0], reqs[2]], "y": [reqs[1], reqs[3]]}  # clusters that cut across the templates
    batches = plan(reqs, clients=2, slots=2, own=1, shared=0, seed=0, groups=groups)
    assert sorted(sorted(r.id for t in batches for r in t[c]) for c in range(2)) == [["a", "c"], ["b", "d"]]
    assert set(by_relation(reqs)) == {"{} speaks", "the capital of {} is"}


def test_by_cluster_partitions_the_facts_with_the_models_embeddings(setup):
    from kedit.core.models import load_model
    from kedit.pipeline.slots import by_cluster

    model, tok = load_model(str(setup[0]), "cpu")
    reqs = requests() * 3  # 12 rows: enough for a neighbour graph
    groups = by_cluster(reqs, model, tok, clients=2, seed=0)
    assert len(groups) == 2 and sum(len(g) for g in groups.values()) == 12 and all(groups.values())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("federated")
    ck = train_tiny(root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    return ck, write_jsonl(root / "edits.jsonl", EDITS), corpus


def test_federated_clients_reuse_the_vectors_of_facts_edited_elsewhere_and_resume(setup, tmp_path):
    ck, data, corpus = setup
    out = tmp_path / "federated.json"
    args = (str(ck), data, ["memit"], 2, 2, 1, 1, 0.99, 0.0, False, 0, corpus, {"memit": MEMIT}, out)
    full = bench_federated(*args)
    assert full["group_sizes"] == [2, 2]  # two relations of two facts each, one per client
    r = full["results"]["memit"]
    alone, fed, central = r["alone"], r["federated"], r["central"]
    assert alone["facts_edited"] == fed["facts_edited"] == 6 and central["facts_edited"] == 4
    assert alone["reused_share_after_slot_0"] == 0 and fed["reused_share_after_slot_0"] == 0.5
    assert fed["wrong_fact_reuses"] == 0 and "refused" not in fed or fed["refused"] == {}
    reused = [s for s in fed["per_slot"] if s["reused"]]
    assert [(s["slot"], s["client"]) for s in reused] == [(1, "client0"), (1, "client1")]
    # (the target phase's time is the benchmark's to measure: on this model a lookup costs what 10 steps do)
    assert fed["target_s_after_slot_0"] > 0 and alone["target_s_after_slot_0"] > 0
    # the keys and lookups are timed apart, inside the phase; alone there are none
    assert 0 < fed["lookup_s_after_slot_0"] < fed["target_s_after_slot_0"] and alone["lookup_s_after_slot_0"] == 0
    assert alone["optimized_steps_after_slot_0"] > 0 and "optimized_steps_cut" in r
    assert fed["reused_steps_after_slot_0"] == fed["reused_stepped_after_slot_0"] == 0  # used as they are
    # (that a reused vector makes the edit the client's own would: tests/test_exchange.py; quality: the benchmark)
    assert len(fed["per_client"]) == 2 and set(r["federated_over_alone"]) == {"efficacy", "generalization", "specificity"}
    before = out.read_text()
    assert bench_federated(*args)["results"]["memit"]["alone"] == alone  # resumed, not run again
    assert out.read_text() == before
