"""End to end through the `raycnn` command, on a real local Ray with synthetic data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from raycnn import cli, results

TINY = """
[suite]
name = "tiny"
cpus_per_trial = 1
gpus_per_trial = 0.25
table = "Tiny table"

[defaults]
model = "cifar_base"
epochs = 2
momentum = 0.9
max_train_samples = 256
eval_batch_size = 2000

[[axes]]
name = "opt"
role = "column"
values = [{ label = "sgd", title = "SGD" }, { label = "adam", title = "Adam", optimizer = "adam", lr = 0.001 }]

[[axes]]
name = "sched"
role = "row"
values = [{ label = "flat", title = "no scheduler" }, { label = "step", title = "scheduler", scheduler = "multistep", milestones = [1] }]

[report]
"tiny/sgd/flat" = 60
"tiny/adam/step" = 40
"""


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "tiny.toml"
    path.write_text(TINY)
    return path


def raycnn(*args, cwd=None):
    """The console script in a subprocess, as a user runs it."""
    env = dict(os.environ, RAY_AIR_NEW_OUTPUT="0", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "raycnn.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_list_counts_the_report():
    out = raycnn("list")
    assert out.returncode == 0 and "59 trials in 3 suite(s)" in out.stdout
    out = raycnn("list", "cifar10")
    assert "cifar10/augment/jitter" in out.stdout and "11 trials in 1 suite(s)" in out.stdout


def test_run_filter_repeats_table_plot_resume(tmp_path, suite_file):
    res = tmp_path / "results"
    out = raycnn("run", suite_file, "--synthetic", "--filter", "tiny/*/flat", "--filter", "tiny/adam/step",
                 "--repeats", "2", "--results-dir", res, "--name", "r1", "--num-cpus", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    run = res / "r1"
    trials, epochs = results.load_run(run)
    assert sorted(zip(trials.name, trials.repeat)) == sorted(
        (n, r) for n in ("tiny/sgd/flat", "tiny/adam/flat", "tiny/adam/step") for r in (0, 1))
    for col in ("name", "suite", "table", "row", "column", "status", "final_test_acc", "best_test_acc",
                "epochs_done", "wall_seconds", "images_per_s", "node", "device", "precision", "seed", "repeat",
                "git_rev", "torch_version", "ray_version", "report_acc", "model", "optimizer", "lr", "milestones"):
        assert col in trials.columns, col
    assert set(trials.status) == {"ok"} and set(trials.epochs_done) == {2} and set(trials.device) == {"cpu"}
    assert sorted(trials[trials.name == "tiny/sgd/flat"].seed) == [0, 1]          # repeat r: seed + r
    assert trials[trials.name == "tiny/sgd/flat"].report_acc.iloc[0] == 0.60
    assert len(epochs) == 6 * 2 and sorted(set(epochs.epoch)) == [1, 2]
    step = epochs[(epochs.name == "tiny/adam/step")].sort_values(["repeat", "epoch"])
    # The rate each epoch trained with (milestone 1, gamma 0.1), per repeat: epochs 1 and 2.
    assert list(step.lr) == pytest.approx([0.001, 0.0001, 0.001, 0.0001])
    assert all(0 <= a <= 1 for a in trials.final_test_acc)

    table = raycnn("table", run, "--format", "markdown")
    assert table.returncode == 0 and "### Tiny table" in table.stdout and "(60)" in table.stdout and "±" in table.stdout
    rich_out = raycnn("table", run)
    assert "Tiny table" in rich_out.stdout and "no scheduler" in rich_out.stdout
    csv = raycnn("table", run, "--format", "csv")
    assert len(pd.read_csv(__import__("io").StringIO(csv.stdout))) == 3
    plot = raycnn("plot", run)
    pngs = list((run / "plots").glob("*.png"))
    assert plot.returncode == 0 and len(pngs) == 1 and pngs[0].stat().st_size > 1000

    # --resume of a finished run trains nothing and leaves the rows as they were.
    before = (run / "trials.parquet").read_bytes(), (run / "epochs.parquet").read_bytes()
    again = raycnn("run", suite_file, "--synthetic", "--filter", "tiny/*/flat", "--filter", "tiny/adam/step",
                   "--repeats", "2", "--results-dir", res, "--name", "r1", "--num-cpus", "2", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    t2, e2 = results.load_run(run)
    pd.testing.assert_frame_equal(t2, trials)
    pd.testing.assert_frame_equal(e2, epochs)

    # The same name without --resume is refused, and the run is untouched.
    refused = raycnn("run", suite_file, "--synthetic", "--results-dir", res, "--name", "r1")
    assert refused.returncode == 2 and "exists" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    pd.testing.assert_frame_equal(results.load_run(run)[0], trials)


def _overlap(run: Path) -> int:
    """Most trials that ran at the same moment, from Tune's per-epoch timestamps."""
    spans = []
    for result in (run / "tune" / "experiment").glob("*/result.json"):
        lines = [json.loads(l) for l in result.read_text().splitlines() if l.strip()]
        end = lines[-1]["timestamp"]
        spans.append((end - lines[-1]["time_total_s"], end))
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = cur = 0
    for _, step in events:
        cur += step
        best = max(best, cur)
    return best


def test_fractional_gpus_pack_four_trials_per_gpu(tmp_path, suite_file):
    # One logical GPU declared to a CPU-only Ray, 0.25 per trial: four trials at once, on the CPU.
    out = raycnn("run", suite_file, "--synthetic", "--epochs", "3", "--results-dir", tmp_path, "--name", "gpu",
                 "--num-cpus", "4", "--num-gpus", "1", "--gpus-per-trial", "0.25")
    assert out.returncode == 0, out.stderr[-3000:]
    trials, _ = results.load_run(tmp_path / "gpu")
    assert len(trials) == 4 and set(trials.gpus_per_trial) == {0.25} and set(trials.device) == {"cpu"}
    assert _overlap(tmp_path / "gpu") == 4


def test_gpus_per_trial_larger_than_any_node(tmp_path, suite_file):
    out = raycnn("run", suite_file, "--synthetic", "--results-dir", tmp_path, "--name", "x", "--num-cpus", "1",
                 "--gpus-per-trial", "2")
    assert out.returncode == 2 and "more than any node has" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2
