"""`kedit bench targets` on the tiny trained model: both target modes inside the same edits."""

from __future__ import annotations

import pytest

from kedit.app.bench import bench_targets
from kedit.app.tiny import CORPUS, train_tiny, write_jsonl
from kedit.core.errors import KeditError

EDITS = [
    {"id": "a", "subject": "alice", "prompt": "{} speaks", "target_new": "german", "target_true": "french"},
    {"id": "b", "subject": "bob", "prompt": "{} speaks", "target_new": "french", "target_true": "german"},
    {"id": "c", "subject": "carol", "prompt": "the ceo is {} and she speaks", "target_new": "german", "target_true": "french"},
]
MEMIT = {
    "layers": [1, 2],
    "solve.mom2_weight": 10.0,
    "statistics.samples": 20,
    "statistics.length": 16,
    "templates.count": 1,
    "targets.steps": 10,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ck = train_tiny(root / "model")
    data = write_jsonl(root / "edits.jsonl", EDITS)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    return ck, data, corpus


def test_batched_and_per_request_targets_give_the_same_edits(setup):
    ck, data, corpus = setup
    r = bench_targets(str(ck), data, 3, 3, "memit", corpus, "cpu", MEMIT)
    assert r["n"] == 3 and r["batch_size"] == 3
    for mode in ("batched", "per_request"):
        assert r[mode]["targets_s"] > 0 and r[mode]["edit_s"] >= r[mode]["targets_s"]
    # the same optimization problem, solved jointly or request by request
    assert r["target_rel_diff_max"] < 1e-3
    assert r["batched"]["efficacy"] == r["per_request"]["efficacy"]


def test_a_method_without_a_target_phase_is_refused(setup):
    ck, data, corpus = setup
    with pytest.raises(KeditError, match="no separate target phase"):
        bench_targets(str(ck), data, 2, 2, "ft-m", corpus, "cpu", {"layers": [2]})
