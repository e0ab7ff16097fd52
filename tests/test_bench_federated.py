"""`kedit bench federated`: the plan (facts split by relation, shared facts from earlier slots of other
clients) and the three runs on the tiny trained model."""

from __future__ import annotations

import pytest

from kedit.app.bench_federated import bench_federated, plan
from kedit.app.tiny import CORPUS, train_tiny, write_jsonl
from kedit.core.facts import EditRequest

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
    with pytest.raises(ValueError, match="need 3"):
        plan(requests(), clients=2, slots=3, own=1, shared=0, seed=0)


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
    args = (str(ck), data, ["memit"], 2, 2, 1, 1, 0.99, 0.0, 0, corpus, {"memit": MEMIT}, out)
    r = bench_federated(*args)["results"]["memit"]
    alone, fed, central = r["alone"], r["federated"], r["central"]
    assert alone["facts_edited"] == fed["facts_edited"] == 6 and central["facts_edited"] == 4
    assert alone["reused_share_after_slot_0"] == 0 and fed["reused_share_after_slot_0"] == 0.5
    assert fed["wrong_fact_reuses"] == 0 and "refused" not in fed or fed["refused"] == {}
    reused = [s for s in fed["per_slot"] if s["reused"]]
    assert [(s["slot"], s["client"]) for s in reused] == [(1, "client0"), (1, "client1")]
    # (the target phase's time is the benchmark's to measure: on this model a lookup costs what 10 steps do)
    assert fed["target_s_after_slot_0"] > 0 and alone["target_s_after_slot_0"] > 0
    # (that a reused vector makes the edit the client's own would: tests/test_exchange.py; quality: the benchmark)
    assert len(fed["per_client"]) == 2 and set(r["federated_over_alone"]) == {"efficacy", "generalization", "specificity"}
    before = out.read_text()
    assert bench_federated(*args)["results"]["memit"]["alone"] == alone  # resumed, not run again
    assert out.read_text() == before
