"""`kedit bench targets` on the tiny trained model: both target modes inside the same edits."""

from __future__ import annotations

import json
import math

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
    # in the model's precision: the joint and the per-request problems agree to 1e-3 there, bf16 rounding exceeds it
    "targets.precision": "model",
    "layers": [1, 2],
    "solve.mom2_weight": 10.0,
    "statistics.samples": 20,
    "statistics.length": 16,
    "templates.count": 1,
    "targets.steps": 10,
}


ZSRE = [
    ("alice", "german", "french", "the capital of france is", "paris"),
    ("bob", "french", "german", "the capital of germany is", "berlin"),
]


def write_zsre(path, rephrase: str, n: int = 2):
    """zsRE records (MEND's format) about the tiny model's people; ``rephrase`` holds "{}" for the subject."""
    import json

    records = [
        {
            "subject": s,
            "src": f"{s} speaks",
            "rephrase": rephrase.format(s),
            "alt": new,
            "answers": [old],
            "loc": loc,
            "loc_ans": ans,
        }
        for s, new, old, loc, ans in ZSRE[:n]
    ]
    path.write_text(json.dumps(records))
    return path


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


def rome_record(case_id: int, subject: str, prompt: str, new: str, old: str, relation: str) -> dict:
    rewrite = {
        "prompt": prompt,
        "relation_id": relation,
        "subject": subject,
        "target_new": {"str": new},
        "target_true": {"str": old},
    }
    return {"case_id": case_id, "requested_rewrite": rewrite, "paraphrase_prompts": [f"so {prompt.format(subject)}"]}


def test_bench_reedit_runs_the_schedule_and_resumes_from_its_json(setup, tmp_path):
    import json

    from kedit.app.bench_reedit import bench_reedit

    ck, _, corpus = setup
    people = [
        ("alice", "german", "french"),
        ("bob", "french", "german"),
        ("carol", "english", "french"),
        ("dave", "spanish", "german"),
    ]
    records = [rome_record(i, s, "{} speaks", new, old, "P103") for i, (s, new, old) in enumerate(people)]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "reedit.json"
    ftm = {"ft-m": {"layers": [2], "lr": 0.02}}
    r = bench_reedit(
        str(ck), data, ["ft-m"], n=4, n_twice=2, n_thrice=1, batch_size=2, gap=1, corpus=corpus, overrides=ftm, json_out=out
    )
    res = r["results"]["ft-m"]
    assert res["n_edits"] == 4 + 2 + 1 and res["n_reedits"] == 3
    assert res["reedited"]["n_cases"] == 2 and res["once"]["n_cases"] == 2 and res["reedited_thrice"]["n_cases"] == 1
    assert 0 <= res["reedited"]["latest_wins"] <= 1 and not math.isnan(res["reedited"]["superseded_prob"])
    assert res["diagnostics"] == {"first": {}, "reedit": {}}  # FT-M measures nothing about itself
    # the same settings again: the method is read back, not rerun
    again = bench_reedit(
        str(ck), data, ["ft-m"], n=4, n_twice=2, n_thrice=1, batch_size=2, gap=1, corpus=corpus, overrides=ftm, json_out=out
    )
    same = json.dumps(again["results"]) == json.dumps(json.loads(out.read_text())["results"]) == json.dumps(r["results"])
    assert same  # compared as text: a NaN (no superseded value among facts edited once) is not equal to itself


def test_bench_mquake_edits_each_case_alone_and_reverts(setup, tmp_path):
    import json

    from kedit.app.bench_mquake import bench_mquake

    ck, _, corpus = setup
    rw = {
        "prompt": "{} speaks",
        "relation_id": "P1",
        "subject": "alice",
        "target_new": {"str": "german"},
        "target_true": {"str": "french"},
    }
    case = {"case_id": 1, "requested_rewrite": [rw], "questions": ["alice speaks"], "answer": "french", "new_answer": "german"}
    data = tmp_path / "mq.json"
    data.write_text(json.dumps([case, dict(case, case_id=2, questions=["what does alice speak", "alice"])]))
    r = bench_mquake(str(ck), data, ["ft-m"], n=2, corpus=corpus, overrides={"ft-m": {"layers": [2], "lr": 0.02}})
    res = r["results"]["ft-m"]
    assert res["n_questions"] == 3 and r["unedited"]["n_questions"] == 3
    assert res["single_hop_efficacy"] == 1.0 and r["unedited"]["single_hop_efficacy"] == 0.0  # the edit took, each time


def test_bench_fill_times_reading_the_old_value_against_the_edit(setup):
    from kedit.app.bench import bench_fill

    ck, data, corpus = setup
    r = bench_fill(str(ck), data, 3, 2, "ft-m", corpus, {"layers": [2], "lr": 0.02})
    assert [len(s) for s in (r["steps"], r["answers"])] == [2, 3]
    assert all(s["fill_s"] > 0 and s["edit_s"] > 0 for s in r["steps"])
    assert r["max_fill_fraction"] == max(s["fill_s"] / s["edit_s"] for s in r["steps"])
    assert all(a["recorded"] == e["target_true"] for a, e in zip(r["answers"], EDITS))  # the data's old value, kept apart


def test_bench_editors_runs_each_method_on_a_fresh_model(setup, tmp_path):
    import json

    from kedit.app.bench import bench_editors

    ck, data, corpus = setup
    out = tmp_path / "editors.json"
    overrides = {"ft-m": {"layers": [2], "lr": 0.02}, "ft-l": {"layers": [2]}}
    r = bench_editors(str(ck), data, ["ft-m", "ft-l"], 2, 1, corpus, overrides, json_out=out)
    written = json.loads(out.read_text())["results"]  # NaN metrics (no paraphrases here) never compare equal
    assert list(written) == ["ft-m", "ft-l"] and written["ft-m"]["efficacy"] == r["results"]["ft-m"]["efficacy"]
    assert not (tmp_path / "editors.json.steps").exists()  # the finished methods' saved steps are removed
    assert list(r["results"]) == ["ft-m", "ft-l"] and r["unedited"]["efficacy"] == 0.0
    assert r["results"]["ft-m"]["n_edits"] == 2 and r["results"]["ft-m"]["efficacy"] == 1.0
    assert "unrelated_routed" not in r["results"]["ft-m"]  # no memory installed: no router to read


def test_bench_editors_zsre_protocol_scores_token_accuracy_and_locality_against_the_unedited_model(setup, tmp_path):
    from kedit.app.bench import bench_editors

    ck, _, corpus = setup
    data = write_zsre(tmp_path / "zsre.json", "so {} speaks")
    r = bench_editors(str(ck), data, ["grace"], 2, 1, corpus, {"grace": {"layer": 2, "codebook.radius": 1e-3}}, "zsre")
    assert r["protocol"] == "zsre" and r["unedited"]["locality"] == 1.0  # the unedited model agrees with itself
    g = r["results"]["grace"]
    assert g["reliability"] == 1.0 and g["locality"] == 1.0  # an edit answered at its key, nowhere else
    assert g["generated_locality"] == 1.0 and r["unedited"]["generated_locality"] == 1.0
    assert 0.0 <= g["generated_reliability"] <= 1.0 and "generated_generalization" in g
    # alice and bob: every subject is its record's own, so the split scores what the whole scores
    assert g["shared_subject"] == 0.0 and g["generalization_distinct_subject"] == g["generalization"]
    assert g["generated_generalization_distinct_subject"] == g["generated_generalization"]
    assert {"generalization", "latency_ratio", "seconds_per_edit"} <= g.keys() and g["latency_ratio"] > 0
    # the memory's router on the unrelated questions: none answered by it (and no such figure without a memory)
    assert g["unrelated_routed"] == 0.0 and "unrelated_routed" not in r["unedited"]


def test_bench_keys_measures_distances_at_both_positions(setup, tmp_path):
    import json

    from kedit.app.bench_keys import POSITIONS, bench_keys

    ck, _, _ = setup
    records = [rome_record(i, s, "{} speaks", "german", "french", "P1") for i, s in enumerate(["alice", "bob", "carol"])]
    for r, other in zip(records, ["bob", "carol", "alice"]):
        r["neighborhood_prompts"] = [f"{other} speaks"]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    r = bench_keys(str(ck), data, 3, [1, 2])
    assert list(r["layers"]) == ["1", "2"] and all(set(r["layers"][x]) == set(POSITIONS) for x in r["layers"])
    last = r["layers"]["2"]["prompt_last_token"]
    # each neighbourhood prompt is another fact's edit prompt: its distance is that of some other fact
    assert last["nearest_neighbourhood"] >= last["nearest_other_fact"] - 1e-5 and last["n_facts"] == 3
    assert 0.0 <= last["separable"] <= 1.0 and last["farthest_paraphrase"] > 0


def test_begins_with_reads_what_greedy_decoding_says(setup):
    from evaluation.metrics import begins_with
    from kedit.app.tiny import KNOWN
    from kedit.core.models import load_model

    ck, _, _ = setup
    model, tok = load_model(str(ck), "cpu")[:2]
    prompt, answer = KNOWN[0]
    wrong = next(a for _, a in KNOWN if a != answer)
    assert begins_with(model, tok, [prompt, prompt], [answer, wrong]).tolist() == [True, False]
    assert begins_with(model, tok, [], []).tolist() == []


def test_bench_scope_reports_reach_on_held_out_rephrasings_and_unrelated_prompts(setup, tmp_path):
    from kedit.app.bench_scope import bench_scope

    ck, _, _ = setup
    data = write_zsre(tmp_path / "zsre.json", "Q: {} speaks A:")
    # the rephrasings are frames the editor generates itself: held out, they are left out of its samples
    r = bench_scope(str(ck), data, 2, 0, [1, 2], 1)
    assert set(r["layers"]) == {"1", "2"}
    for m in r["layers"].values():
        assert m["n_rephrasings"] == 2 and m["n_unrelated"] == 2 and m["radius"] > 0
        shares = [m["rephrasings_reached"], m["rephrasings_to_another_fact"], m["unrelated_prompts_touched"]]
        assert all(0.0 <= x <= 1.0 for x in shares) and m["rephrasings_reached"] + m["rephrasings_to_another_fact"] <= 1.0
        assert m["shared_subject"] == 0.0 and m["rephrasings_reached_distinct_subject"] == m["rephrasings_reached"]
        # what crowds a scope: each touched prompt, by the token that lands in a scope and the fact it reaches
        assert len({e["prompt"] for e in m["touched"]}) == round(m["unrelated_prompts_touched"] * m["n_unrelated"])
        assert all(e["subject"] in {z[0] for z in ZSRE[:2]} for e in m["touched"])


def test_bench_scope_scores_siblings_apart(setup, tmp_path):
    """Two records ask about alice (zsRE's reworded siblings), one about bob: reach is split by that, and a
    rephrasing landing in a sibling's scope is counted as such."""
    import json

    from kedit.app.bench_scope import bench_scope

    ck, _, _ = setup
    records = [
        {"subject": s, "src": src, "rephrase": f"Q: {src} A:", "alt": new, "answers": [old], "loc": loc, "loc_ans": ans}
        for (s, new, old, loc, ans), src in zip([ZSRE[0], ZSRE[0], ZSRE[1]], ["alice speaks", "so alice speaks", "bob speaks"])
    ]
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(records))
    m = bench_scope(str(ck), data, 3, 0, [1], 1)["layers"]["1"]
    assert m["shared_subject"] == pytest.approx(2 / 3)
    # one rephrasing per record: the whole is the parts' weighted mean
    whole = (2 * m["rephrasings_reached_shared_subject"] + m["rephrasings_reached_distinct_subject"]) / 3
    assert m["rephrasings_reached"] == pytest.approx(whole)
    assert 0.0 <= m["rephrasings_to_a_sibling"] <= m["rephrasings_to_another_fact"]


def test_a_benchmark_worker_exits_when_its_parent_is_gone():
    """A worker whose parent was killed does not run on as an orphan beside the next run (a killed
    ``kedit bench`` once left its worker computing for an hour)."""
    import subprocess
    import sys
    import time

    code = "import time; from kedit.app.bench import exit_with_parent; exit_with_parent(-1, 0.05); time.sleep(30)"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], timeout=25)
    assert done.returncode == 1 and time.monotonic() - start < 20  # -1 is never the parent: it exits at once
    alive = "import os, time; from kedit.app.bench import exit_with_parent; exit_with_parent(os.getppid(), 0.05); time.sleep(0.5)"
    assert subprocess.run([sys.executable, "-c", alive], timeout=25).returncode == 0  # its parent lives: it runs on


def test_bench_retention_scores_a_sample_where_the_chain_is_longer(setup, tmp_path):
    import json

    from evaluation.gates.retention import detection_power
    from kedit.app.bench_retention import bench_retention

    ck, _, _ = setup
    facts = [
        {"id": f"f{i}", "subject": f"p{i}", "prompt": "{} speaks", "target_new": "german", "target_true": "french"}
        for i in range(9)
    ]
    data = write_jsonl(tmp_path / "chain.jsonl", facts)
    r = bench_retention(str(ck), data, [2, 8], sample=4, repeat=1, json_out=tmp_path / "r.json")
    short, long = r["rows"]
    assert (short["scored"], short["power"]) == (2, 1.0)  # a chain shorter than the sample is scored whole
    assert long["scored"] == 4 and 0 < long["power"] < 1 and short["false_alarm"] == 0.0
    assert long["false_alarm"] == detection_power(8, 4, 0.1, 0.8) < long["power"]
    assert all(x["full_s"] > 0 and x["sampled_s"] > 0 for x in r["rows"])
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == r["rows"]
    with pytest.raises(ValueError, match="the longest chain needs 10"):
        bench_retention(str(ck), data, [9])


def test_bench_chain_rebuilds_what_it_wrote(setup, tmp_path, monkeypatch):
    from kedit.app.bench_chain import bench_chain

    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under the working directory
    ck, _, _ = setup
    r = bench_chain(str(ck), versions=4, rank=2, layers=(1, 2), json_out=tmp_path / "c.json", keep=1)
    assert r["versions"] == 4 and r["version_kb"] > 0
    assert all(r[k] > 0 for k in ("write_s_per_version", "rebuild_s", "registry_chain_s", "status_s", "squash_s"))
    assert r["versions_after_squash"] == 2 and r["squash_kb"] > r["version_kb"]  # values, not low-rank factors


def test_bench_editors_resumes_a_method_stopped_mid_run_with_the_same_result(setup, tmp_path, monkeypatch):
    """AlphaEdit (patches and a key cache in its state), 3 batches: stopped after the 2nd and rerun, it replays the
    saved steps and ends with the uninterrupted run's scores exactly; other settings start afresh."""
    from editing.base import Editor
    from kedit.app.bench import _run_method

    ck, data, corpus = setup
    hp = {"layers": [1, 2], "solve.l2": 1e-6, **{k: v for k, v in MEMIT.items() if k not in ("layers", "solve.mom2_weight")}}
    args = (str(ck), str(data), 3, 1, str(corpus), hp)
    whole = _run_method("alphaedit", *args, steps_dir=str(tmp_path / "whole"))

    edit, calls = Editor.edit, []

    def stopped(self, requests):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run killed in its 3rd batch
        return edit(self, requests)

    monkeypatch.setattr(Editor, "edit", stopped)
    with pytest.raises(KeyboardInterrupt):
        _run_method("alphaedit", *args, steps_dir=str(tmp_path / "parts"))
    monkeypatch.setattr(Editor, "edit", edit)
    assert sorted(p.name for p in (tmp_path / "parts").glob("step-*")) == ["step-00000", "step-00001"]
    resumed_run = _run_method("alphaedit", *args, steps_dir=str(tmp_path / "parts"))
    timing = {"seconds_per_edit", "seconds_per_edit_this_run", "latency_ratio", "statistics_s", "peak_rss_mb", "peak_gpu_mb"}
    assert (whole.pop("edits_resumed"), resumed_run.pop("edits_resumed")) == (0, 2)  # 2 single-fact batches replayed
    assert resumed_run["seconds_per_edit_this_run"] > 0
    scores = sorted(set(whole) - timing)
    assert sorted(set(resumed_run) - timing) == scores and whole["efficacy"] > 0

    def same(a, b):
        return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))

    assert all(same(resumed_run[k], whole[k]) for k in scores), {k: (resumed_run[k], whole[k]) for k in scores}
    assert len(list((tmp_path / "parts").glob("step-*"))) == 3

    def files(run):  # the 3rd batch's patches and the state after it: made on the replayed model and key cache
        d = tmp_path / run / "step-00002"
        return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != "step.json"}

    assert files("parts") == files("whole") and len(files("whole")) >= 3

    _run_method("alphaedit", str(ck), str(data), 2, 1, str(corpus), hp, steps_dir=str(tmp_path / "parts"))
    assert len(list((tmp_path / "parts").glob("step-*"))) == 2  # other settings (n): the old steps cleared


def test_bench_phases_profiles_the_editing_package(setup):
    from kedit.app.bench_phases import bench_phases, table

    ck, data, corpus = setup
    r = bench_phases(str(ck), data, "memit", 3, 2, corpus, MEMIT)
    names = [f["function"] for f in r["functions"]]
    assert all(n.startswith("editing/") for n in names) and any("optimize_targets" in n for n in names)
    assert r["functions"] == sorted(r["functions"], key=lambda f: -f["cumulative_s"])
    assert r["diagnostics"]["target_steps"] >= 1 and "memit" in table(r)


def test_bench_editors_without_sequential_edits_each_batch_alone_and_reverts(setup, tmp_path):
    import torch

    from editing import make_editor
    from kedit.app.bench import PROTOCOLS, _cases, _independent, bench_editors
    from kedit.core.models import load_model

    ck, data, corpus = setup
    r = bench_editors(str(ck), data, ["ft-m"], 3, 1, corpus, {"ft-m": {"layers": [2], "lr": 0.02}}, sequential=False)
    assert r["sequential"] is False and r["results"]["ft-m"]["n_edits"] == 3 and "retention" not in r["results"]["ft-m"]
    model, tok = load_model(str(ck), "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = make_editor("ft-m", model, tok, {"layers": [2], "lr": 0.02})
    read, scores_of = PROTOCOLS["counterfact"]
    out = _independent(model, tok, editor, _cases(data, 3), 1, read, scores_of)
    assert out["efficacy"] == r["results"]["ft-m"]["efficacy"]  # the same protocol in and out of a worker
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # every batch reverted
    # --start: a slice after the first records (tune on one slice, report on another)
    later = _cases(data, 2, 1)
    assert [c.id for c in later] == [c.id for c in _cases(data, 3)[1:]]
    r2 = bench_editors(str(ck), data, ["ft-m"], 2, 1, corpus, {"ft-m": {"layers": [2], "lr": 0.02}}, sequential=False, start=1)
    assert r2["start"] == 1 and r2["results"]["ft-m"]["n_edits"] == 2
    assert r2["results"]["ft-m"]["efficacy"] == _independent(model, tok, editor, later, 1, read, scores_of)["efficacy"]


def test_a_benchmark_refuses_records_a_trained_network_learned_from(setup):
    from kedit.app.bench import _cases, require_not_trained_on

    ck, data, corpus = setup

    class Trained:
        name = "mend"

        def trained_on(self):
            return frozenset({"b"})

    with pytest.raises(KeditError, match="trained on 1 of the scored records"):
        require_not_trained_on(Trained(), _cases(data, 3))
    require_not_trained_on(Trained(), _cases(data, 1))  # "a" alone: fine


def test_a_stored_result_made_with_another_network_is_run_again(setup, tmp_path):
    """A rerun resumes the methods its JSON holds, unless a method's result names other editor assets (a
    network) than the editor would use now: then that result is stale and the method runs again."""
    from kedit.app.bench import bench_editors

    ck, data, corpus = setup
    out = tmp_path / "r.json"
    over = {"ft-m": {"layers": [2], "lr": 0.02}}
    first = bench_editors(str(ck), data, ["ft-m"], 1, 1, corpus, over, json_out=out)
    assert first["results"]["ft-m"]["assets"] == {}  # ft-m trains nothing
    stored = json.loads(out.read_text())
    stored["results"]["ft-m"]["efficacy"] = 123.0  # planted: kept only if the result is reused
    out.write_text(json.dumps(stored))
    assert bench_editors(str(ck), data, ["ft-m"], 1, 1, corpus, over, json_out=out)["results"]["ft-m"]["efficacy"] == 123.0
    stored["results"]["ft-m"]["assets"] = {"network": "kedit-tiny-mend", "network_version": "1"}
    out.write_text(json.dumps(stored))
    again = bench_editors(str(ck), data, ["ft-m"], 1, 1, corpus, over, json_out=out)["results"]["ft-m"]
    assert again["efficacy"] == first["results"]["ft-m"]["efficacy"] != 123.0 and again["assets"] == {}


def test_bench_known_keeps_the_first_records_the_unedited_model_answers(setup, tmp_path):
    from kedit.app.bench import known_cases

    ck, _, _ = setup

    def record(case_id, subject, prompt, true, new):
        rewrite = {"prompt": prompt, "subject": subject, "target_true": {"str": true}, "target_new": {"str": new}}
        return {"case_id": case_id, "requested_rewrite": rewrite, "paraphrase_prompts": [], "neighborhood_prompts": []}

    records = [
        record(7, "alice", "{} speaks", "german", "english"),  # the model says french: not known
        record(8, "alice", "{} speaks", "french", "german"),
        record(9, "the river", "{} flows through", "london", "paris"),
        record(10, "bob", "{} speaks", "german", "french"),
    ]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    r = known_cases(str(ck), data, 2, tmp_path / "known.json")
    kept = json.loads((tmp_path / "known.json").read_text())
    assert [k["case_id"] for k in kept] == [8, 9] and r["ids"] == ["cf-8", "cf-9"] and r["n"] == 2
    with pytest.raises(KeditError, match="case_id"):
        known_cases(str(ck), write_jsonl(tmp_path / "feed.jsonl", EDITS), 2, tmp_path / "x.json")


def test_bench_stream_resumes_in_its_work_dir_and_reports_every_part_and_the_history(setup, tmp_path, monkeypatch):
    """The stream bench through the real flow (tiny model, FT-M): steps are appended as they end, so a rerun in the
    same work dir (a stopped long run resumed) reports the first part's steps too; per version, the gate metrics."""
    from click.testing import CliRunner
    from prefect.testing.utilities import prefect_test_harness

    from kedit.app.bench import bench_stream
    from kedit.app.cli import cli
    from kedit.app.tiny import write_gates

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    ck, data, corpus = setup
    gates = write_gates(tmp_path / "gates.yaml", edits={"efficacy_min": 0.0}, drawdown={"base_max": 1.0, "step_max": 1.0})
    run = dict(model_ref=str(ck), data=data, n=3, batch_size=2, editor="ft-m", gates=gates, corpus=corpus,
               work_dir=tmp_path / "w", overrides={"layers": [2], "lr": 0.02})  # fmt: skip
    with prefect_test_harness(server_startup_timeout=120):
        first = bench_stream(**run)
        assert [s["attempt"] for s in first["steps"]][:2] == ["batch-000", "batch-001"]
        versions = first["versions"]
        assert [v["n_edits"] for v in versions] == sorted(v["n_edits"] for v in versions) and versions[-1]["n_edits"] == 3
        assert all(
            0.0 <= v["efficacy"] <= 1.0 and {"drawdown_base", "drawdown_base_unrestated", "retain_restated"} <= v.keys()
            for v in versions
        )
        assert first["unedited"].keys() >= {"efficacy", "specificity"} and first["final"]["n_requests"] == 3
        again = bench_stream(**run)  # everything is in production already: no attempt, the first part's steps kept
    assert again["summary"]["skipped"] == 3 and again["steps"] == first["steps"]
    uri = f"sqlite:///{tmp_path / 'w'}/mlruns/mlflow.db"
    args = ["bench", "history", "--tracking-uri", uri, "--json", str(tmp_path / "h.json"), "--plot", str(tmp_path / "h.png")]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "h.json").read_text())["versions"] == versions
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.output.splitlines()[-1].startswith(f"| v{versions[-1]['version']} | 3 | ")
    assert "| drawdown_base | drawdown_base_unrestated |" in out.output.splitlines()[1]  # after "written: ..."
    # --min-facts leaves out the versions of fewer facts (a fact retried alone)
    out = CliRunner().invoke(cli, ["bench", "history", "--tracking-uri", uri, "--min-facts", "2"])
    tabled = [line.split(" | ")[1] for line in out.output.splitlines()[2:]]
    sizes = [b["n_edits"] - a["n_edits"] for a, b in zip([{"n_edits": 0}, *versions], versions)]
    assert tabled == [str(v["n_edits"]) for v, k in zip(versions, sizes) if k >= 2] and len(tabled) < len(versions)


def test_the_history_tables_the_whole_capability_regression_not_a_samples():
    from kedit.app.bench import history_row

    ppl, mc = "kedit_ppl/word_perplexity", "kedit_mc/acc"
    sampled = {f"cap_regression_base/{mc}": 0.5, f"cap_all_regression_base/{mc}": 0.1, "efficacy": 1.0}
    assert history_row("3", 20, sampled) == {"version": "3", "n_edits": 20, "efficacy": 1.0, f"cap_all_regression_base/{mc}": 0.1}
    # a stream from before the sampled gate: every check was of the whole
    older = history_row("2", 10, {f"cap_regression_base/{ppl}": 0.2, f"cap_regression_prev/{ppl}": 0.1})
    assert older == {"version": "2", "n_edits": 10, f"cap_all_regression_base/{ppl}": 0.2}


def test_bench_stream_times_the_rollback_of_a_version_that_wrapped_a_codebook(setup, tmp_path, monkeypatch):
    """The last version changes a row of a codebook and wraps that codebook in a larger one (GRACE, capacity 1,
    a radius that takes every key in: the second fact splits the first's entry and does not fit): its rollback is
    timed from its parent, and the final model is production (applied again on itself, the version named a
    parameter the wrap had replaced, and the 200-fact BalancEdit stream bench failed there)."""
    from prefect.testing.utilities import prefect_test_harness

    from kedit.app.bench import bench_stream
    from kedit.app.tiny import write_gates
    from kedit.store.tracking import Tracker
    from kedit.store.versions import fetch

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    ck, data, corpus = setup
    gates = write_gates(tmp_path / "gates.yaml", edits={"efficacy_min": 0.0}, retention={"min": 0.0},
                        drawdown={"base_max": 1.0, "step_max": 1.0})  # fmt: skip
    overrides = {"layer": 2, "codebook.radius": 1e3, "codebook.capacity": 1, "value.steps": 5}
    with prefect_test_harness(server_startup_timeout=120):
        r = bench_stream(str(ck), data, 2, 1, "grace", gates, corpus, work_dir=tmp_path / "w", overrides=overrides)
    assert r["summary"]["accepted"] == 2 and r["rollback_of_last_version_s"] >= 0.0
    tracker = Tracker(f"sqlite:///{tmp_path / 'w'}/mlruns/mlflow.db")
    chain = tracker.chain(r["summary"]["registered_model"], r["summary"]["production"])
    last = fetch(tracker, chain[-1], tmp_path / "last", None)
    assert sorted(p.kind for p in last.patches) == ["module-patch", "weight-delta"]  # a row changed, then a wrap
    assert r["final"]["n_requests"] == 2


def test_a_result_or_step_made_with_other_code_is_run_again_not_resumed(tmp_path, monkeypatch):
    """A benchmark resumed after the editors changed once replayed an old run's saved steps as the new code's
    result: the code's fingerprint is part of what a resume must match."""
    from kedit.app import bench

    settings = bench.with_code({"n": 1})
    assert len(settings["code"]) == 64 and settings["code"] == bench.code_fingerprint()
    (tmp_path / "r.json").write_text(json.dumps({**settings, "results": {"memit": {"efficacy": 1.0}}}))
    assert bench.resumed(tmp_path / "r.json", settings) == {"memit": {"efficacy": 1.0}}
    monkeypatch.setattr(bench, "code_fingerprint", lambda: "0" * 64)
    assert bench.resumed(tmp_path / "r.json", bench.with_code({"n": 1})) == {}


def test_history_plot_draws_the_published_row_only_beside_a_long_chain(tmp_path, monkeypatch):
    import matplotlib.figure

    from kedit.app.bench import PUBLISHED_FROM, plot_history

    labels = []
    save = matplotlib.figure.Figure.savefig

    def seen(fig, *args, **kwargs):  # the legend entries of the top panel, as drawn
        labels.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", seen)
    row = {"efficacy": 1.0, "generalization": 0.8, "specificity": 0.7}
    for last in (200, PUBLISHED_FROM):
        plot_history([{"n_edits": last // 2} | row, {"n_edits": last} | row], tmp_path / f"{last}.png", "t")
    short, long = labels
    assert not any("AlphaEdit" in t for t in short) and any("AlphaEdit" in t for t in long)


def test_bench_capability_times_the_gate_whole_and_sampled_with_each_samples_power(setup, tmp_path):
    import json

    import yaml

    from evaluation.gates.capability import detection_power
    from kedit.app.bench_capability import bench_capability, table

    ck, _, _ = setup
    cap = {"gate": "capability", "tasks": ["kedit_mc", "kedit_ppl"], "limit": 8, "sample": None, "full_every": 10}
    cap |= {"detect": 0.5, "max_regression": {"kedit_mc/acc": 0.1, "kedit_ppl/word_perplexity": 0.05}}
    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump({"gates": [cap], "bisect": True}))
    r = bench_capability(str(ck), gates, [2, 4], repeat=1, json_out=tmp_path / "c.json")
    assert [row["sample"] for row in r["rows"]] == [2, 4] and r["full_s"] > 0
    for row in r["rows"]:
        assert row["seconds"] > 0 and set(row["metrics"]) == {"kedit_mc/acc"}  # no exact power for a perplexity
        for m in row["metrics"].values():
            assert m["documents"] == 8 and m["power"] == detection_power(m["right"], 8, row["sample"], 0.5, 0.1)
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == r["rows"]
    assert "| all (8) |" in table(r) and set(r["full"]) == {"kedit_mc/acc"} and r["full"]["kedit_mc/acc"]["documents"] == 8
    with pytest.raises(ValueError, match="no capability gate"):
        gates.write_text(yaml.safe_dump({"gates": [{"gate": "retention", "min": 0.8}], "bisect": True}))
        bench_capability(str(ck), gates, [2])
