"""A run's result rows, rebuilt from its plan and hand-made Tune folders (no Ray run): the
lineage that went on after restarts, Tune's statuses, torn lines, skipped trials."""
from __future__ import annotations

import json

from raycnn import experiment, plan


def test_results_keep_the_lineage_that_went_on(tmp_path):
    """collect() on hand-made Tune folders: re-reported epochs, restarts and Tune's statuses."""
    exp = experiment.experiment_dir(tmp_path).local
    entries = []

    def trial(name: str, epochs: list[tuple[int, bool]], error: str = "", finished_at: int = 3) -> None:
        entry = {"name": name, "suite": "s", "table": "t", "row": "r", "column": "c", "order": len(entries),
                 "report_acc": 0.5, "repeat": 0, "gpus": 0.0, "cpus": 1, "config": {"epochs": 3}}
        entries.append(entry)
        path = exp / experiment.trial_folder(entry)
        path.mkdir(parents=True)
        (path / "params.json").write_text(json.dumps({"trial": entry}))
        lines = [json.dumps({"epoch": e, "test_acc": 0.1 * e, "resumed": resumed, "status": "ok" if e == finished_at else "running",
                             "finished": e == finished_at, "images_per_s": 1.0, "git_rev": "g",
                             "summary": {"status": "ok" if e == finished_at else "running", "final_test_acc": 0.1 * e}})
                 for e, resumed in epochs]
        (path / "result.json").write_text("\n".join(lines) + "\n")
        if error:
            (path / "error.txt").write_text(f"Failure # 1 (occurred at now)\n{error}\n")

    trial("killed", [(1, False), (2, False), (2, True), (3, True)], error="The actor is dead. Worker exit type: X")
    trial("over", [(1, False), (2, False), (1, False)], error="boom")       # started over, then stopped
    trial("failed", [(1, False)], error="ValueError: bad")
    trial("cut", [(1, False), (2, True)])
    plan.write(tmp_path, plan.Plan(entries + [{**entries[0], "name": "pre", "order": 9, "skipped": "needs weights"}]))
    with open(exp / "003-cut-r0" / "result.json", "a") as f:
        f.write('{"epoch": 3, "te')                       # the driver died mid-line
    state = {"trial_data": [[json.dumps({"relative_logdir": n, "status": s}), "{}"]
                            for n, s in (("000-killed-r0", "TERMINATED"), ("001-over-r0", "PAUSED"),
                                         ("002-failed-r0", "ERROR"), ("003-cut-r0", "RUNNING"))]}
    (exp / "experiment_state-2026.json").write_text(json.dumps(state))

    rows, epochs = experiment.collect(tmp_path)
    by = {r["name"]: r for r in rows}
    ep = lambda n: [(e["epoch"], e["resumed"]) for e in epochs if e["name"] == n]
    assert ep("killed") == [(1, False), (2, True), (3, True)]
    assert by["killed"]["status"] == "ok" and by["killed"]["error"] == "" and by["killed"]["failures"] == 1
    assert by["killed"]["warning"] == "restarted after 1 failure(s), the last: The actor is dead."
    assert ep("over") == [(1, False)]                     # the earlier run's epoch 2 is not this lineage's
    assert by["over"]["status"] == "running"              # failed, restarted, interrupted: resumable
    assert by["failed"]["status"] == "error" and by["failed"]["error"] == "ValueError: bad"
    assert ep("cut") == [(1, False), (2, True)] and by["cut"]["status"] == "running"   # a torn last line
    assert by["killed"]["git_rev"] == "g" and by["killed"]["final_test_acc"] == 0.1 * 3     # from its last report
    assert by["pre"]["status"] == "skipped: needs weights"                            # planted by the plan
    assert [r["name"] for r in rows] == ["killed", "over", "failed", "cut", "pre"]
