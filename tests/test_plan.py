"""A run's plan: what a resume may and may not change, and result.json lines torn by a crash."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from raycnn import experiment, plan, suites
from raycnn.errors import RunError


def _trials(**changes):
    trials = suites.load(suites.resolve("cifar10")[0]).trials[:3]
    return [replace(t, config=replace(t.config, **changes)) for t in trials]


def _plan(trials=None, repeats=1, inputs=None, **changes):
    return plan.Plan(plan.entries(trials or _trials(**changes), repeats), inputs or {"cifar10": "abc"})


@pytest.mark.parametrize("new,named", [
    (dict(epochs=3), "--epochs"),
    (dict(precision="bf16"), "--precision"),
    (dict(seed=5), "--seed"),
    (dict(num_threads=2), "--cpus-per-trial"),
    (dict(max_train_samples=5000, budget="quick"), "--max-train-samples"),
    (dict(lr=0.5), "lr (the suite file)"),
    (dict(repeats=2), "--repeats"),
    (dict(trials=_trials()[:2]), "the trials (suite or --filter)"),
    (dict(inputs={"cifar10": "other"}), "--data-dir (other cifar10 data)"),
])
def test_a_resume_that_would_change_results_is_refused(tmp_path, new, named):
    saved = _plan()
    plan.write(tmp_path, saved)
    assert plan.differences(plan.read(tmp_path), saved) == []
    changed = _plan(**new)
    assert named in plan.differences(saved, changed)
    with pytest.raises(RunError, match="--resume with other options"):
        plan.check_resume(plan.read(tmp_path), changed)


def test_where_things_are_may_change():
    saved = _plan()
    assert plan.differences(saved, _plan(data_dir="/elsewhere", checkpoint_every=5)) == []


def test_a_weights_file_is_known_by_its_content_not_its_path():
    """A run folder that travels finds its --weights file elsewhere: the same bytes may resume,
    other bytes or none may not."""
    saved = _plan(weights="/cluster/w.pt", inputs={"cifar10": "abc", "weights": "w1"})
    assert plan.differences(saved, _plan(weights="/laptop/w.pt", inputs={"cifar10": "abc", "weights": "w1"})) == []
    assert plan.differences(saved, _plan(weights="/laptop/w.pt", inputs={"cifar10": "abc", "weights": "w2"})) == \
        ["--weights (another file)"]
    assert plan.differences(saved, _plan(inputs={"cifar10": "abc"})) == ["--weights"]


def test_a_torn_result_line_is_cut_so_the_next_report_survives(tmp_path):
    folder = experiment.experiment_dir(tmp_path).local / "000-t-r0"
    folder.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "test_acc": e / 10}) for e in (1, 2, 3)]
    torn = "\n".join(lines[:2]) + "\n" + lines[2][:len(lines[2]) // 2]      # a crash halfway through epoch 3's line
    (folder / "result.json").write_text(torn)
    assert experiment.repair(tmp_path) == ["000-t-r0"]
    with open(folder / "result.json", "a") as f:                          # the resumed trial reports again
        f.write(json.dumps({"epoch": 3, "test_acc": 0.3}) + "\n" + json.dumps({"epoch": 4, "test_acc": 0.4}) + "\n")
    assert [r["epoch"] for r in experiment._reports(folder / "result.json")] == [1, 2, 3, 4]
    assert experiment.repair(tmp_path) == []
    # Without the cut, the next line would have been glued to the torn one and both lost.
    (folder / "result.json").write_text(torn + json.dumps({"epoch": 3}) + "\n")
    assert [r["epoch"] for r in experiment._reports(folder / "result.json")] == [1, 2]


def test_a_gap_is_said_in_the_row():
    reports = [{"epoch": 1, "finished": False}, {"epoch": 3, "finished": True,
                                                 "summary": {"status": "ok", "final_test_acc": 0.5}}]
    entry = {k: "x" for k in experiment.TRIAL_FIELDS} | {"config": {}, "gpus": 0, "cpus": 1}
    row = experiment._trial_row(entry, reports, [])
    assert "no report of epoch(s) 2" in row["warning"]
