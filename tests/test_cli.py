"""End to end through the `raycnn` command, on a real local Ray with synthetic data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from raycnn import cli, results
from raycnn.errors import EXIT

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


def raycnn(*args, cwd=None, env=None):
    """The console script in a subprocess, as a user runs it."""
    env = dict(os.environ, RAY_AIR_NEW_OUTPUT="0", COLUMNS="200", **(env or {}))
    return subprocess.run([sys.executable, "-m", "raycnn.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_list_counts_the_report():
    out = raycnn("list")
    assert out.returncode == 0 and "59 trials in 3 suite(s)" in out.stderr
    assert sum(int(line.split("\t")[1]) for line in out.stdout.splitlines()[1:]) == 59
    out = raycnn("list", "cifar10")
    assert "cifar10/augment/jitter" in out.stdout and "11 trials in 1 suite(s)" in out.stderr


def _names():
    from raycnn import suites
    return [t.name for p in suites.resolve("all") for t in suites.load(p).trials]


def test_list_on_a_pipe_is_one_tab_separated_line_per_trial():
    out = raycnn("list", "all")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[0].split("\t")[:2] == ["trial", "model"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == _names() and len(rows) == 59
    assert {len(r) for r in rows} == {len(rows[0])} == {len(lines[0].split("\t"))}
    assert not any(ch in out.stdout for ch in "…┃│\x1b")
    adam = [r[0] for r in rows if "adam" in "\t".join(r)]                     # `raycnn list | grep adam`
    assert "mnist/base/adam/lr0.01" in adam


@pytest.mark.parametrize("width", [80, 120])
def test_list_on_a_terminal_never_truncates_names(width, capsys, monkeypatch):
    from rich.console import Console
    monkeypatch.setattr(cli, "console", Console(force_terminal=True, width=width, color_system=None))
    assert cli.main(["list", "all"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= width and "…" not in out.split("\n", 3)[3]
    for name in _names():
        assert name in out, name
    assert "report" in out                                                   # the report column stays


def test_table_on_a_pipe_is_tab_separated(tmp_path):
    out = raycnn("table", RESULTS / "mnist-all-1ep")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[0] == "table\trow\tcolumn\ttrial\tn\tours\tstd\treport\tdiff\tstatus\tsource\tbudget"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == 40 and {len(r) for r in rows} == {12}
    [adamw] = [r for r in rows if r[3] == "mnist/base/adamw/lr0.01"]
    assert adamw[5:10] == ["96.54", "—", "11", "+85.54", "ok"] and adamw[10] == "mnist-all-1ep"


RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_table_over_several_runs_and_source():
    runs = [RESULTS / "mnist-all-1ep", RESULTS / "mnist-base-lr0.001-10ep"]
    out = raycnn("table", *runs, "--format", "csv")
    back = pd.read_csv(__import__("io").StringIO(out.stdout)).set_index("name")
    assert out.returncode == 0 and len(back) == 40
    assert back.loc["mnist/base/sgd/lr0.001", "source"] == "mnist-base-lr0.001-10ep"    # 10 epochs beat 1
    assert back.loc["mnist/base/sgd/lr0.01", "source"] == "mnist-all-1ep"
    assert back.loc["mnist/base/sgd/lr0.001", "ours_mean"] == pytest.approx(0.949, abs=5e-4)
    md = raycnn("table", *runs, "--format", "markdown", "--source").stdout
    assert "| Base Model | 94.9 (93, +1.9) [mnist-base-lr0.001-10ep] |" in md
    js = json.loads(raycnn("table", RESULTS / "cifar10-handbuilt-30ep", RESULTS / "cifar10-repeats-30ep",
                           "--format", "json").stdout)
    jitter = next(r for r in js if r["name"] == "cifar10/augment/jitter")
    assert jitter["n"] == 3 and jitter["source"] == "cifar10-repeats-30ep"    # seed 0 rerun counts once


def test_compare_two_runs():
    out = raycnn("compare", RESULTS / "mnist-base-adamw-lr0.01-repeats-1ep", RESULTS / "mnist-base-adamw-lr0.01-10ep")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[0].split("\t")[0] == "trial" and len(lines) == 2
    assert lines[1].split("\t")[0] == "mnist/base/adamw/lr0.01" and "±" in lines[1]
    none = raycnn("compare", RESULTS / "mnist-all-1ep", RESULTS / "cifar10-repeats-30ep")
    assert none.returncode == 2 and "no trial in common" in none.stderr and len(none.stderr.splitlines()) == 1


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
    assert table.returncode == 0 and "### Tiny table" in table.stdout and "(60, " in table.stdout and "±" in table.stdout
    rich_out = raycnn("table", run)
    assert "Tiny table" in rich_out.stdout and "no scheduler" in rich_out.stdout
    csv = raycnn("table", run, "--format", "csv")
    assert len(pd.read_csv(__import__("io").StringIO(csv.stdout))) == 3
    plot = raycnn("plot", run)
    pngs = list((run / "plots").glob("*.png"))
    assert plot.returncode == 0 and len(pngs) == 1 and pngs[0].stat().st_size > 1000

    # --resume of a finished run trains nothing and leaves the rows as they were.
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


def _granted(run: Path) -> list[tuple[dict, list]]:
    """What Ray granted each trial (its resources and GPU ids), as the trial reported it."""
    out = []
    for result in sorted((run / "tune" / "experiment").glob("*/result.json")):
        last = json.loads(result.read_text().splitlines()[-1])
        out.append((last["resources"], last["gpu_ids"]))
    return out


def test_fractional_gpus_pack_four_trials_per_gpu(tmp_path, suite_file):
    # One logical GPU declared to a CPU-only Ray, 0.25 per trial: four trials at once, on the CPU.
    out = raycnn("run", suite_file, "--synthetic", "--epochs", "3", "--results-dir", tmp_path, "--name", "gpu",
                 "--num-cpus", "4", "--num-gpus", "1", "--gpus-per-trial", "0.25")
    assert out.returncode == 0, out.stderr[-3000:]
    trials, _ = results.load_run(tmp_path / "gpu")
    assert len(trials) == 4 and set(trials.gpus_per_trial) == {0.25} and set(trials.device) == {"cpu"}
    # Each trial held a quarter of the one GPU (and a CPU): four fit on it at once.
    assert _granted(tmp_path / "gpu") == [({"CPU": 1.0, "GPU": 0.25}, ["0"])] * 4


def test_gpus_per_trial_larger_than_any_node(tmp_path, suite_file):
    out = raycnn("run", suite_file, "--synthetic", "--results-dir", tmp_path, "--name", "x", "--num-cpus", "1",
                 "--gpus-per-trial", "2")
    assert out.returncode == 2 and "more than any node has" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2


def test_quick_run_of_all_without_imagenet_weights(tmp_path):
    """`raycnn run all --quick` end to end (a few cells of each suite, synthetic data): the budget
    lands in every row and in the tables, and the pretrained cells are skipped, not refused."""
    env = {"TORCH_HOME": str(tmp_path / "no-weights")}                   # no cached ImageNet weights
    out = raycnn("run", "all", "--quick", "--synthetic", "--filter", "mnist/base/sgd/lr0.01",
                 "--filter", "cifar10/base/no-scheduler", "--filter", "pretrained/zero-shot",
                 "--filter", "pretrained/frozen-backbone", "--results-dir", tmp_path, "--name", "q",
                 "--num-cpus", "2", env=env)
    assert out.returncode == EXIT["skipped"], out.stderr[-3000:]
    assert "2 pretrained trial(s) skipped: needs ImageNet weights (--weights FILE)" in out.stderr.splitlines()[0]
    trials, _ = results.load_run(tmp_path / "q")
    ran = trials[trials.suite != "pretrained"]
    assert sorted(ran.name) == ["cifar10/base/no-scheduler", "mnist/base/sgd/lr0.01"]
    assert set(trials.budget) == {"quick"} and set(ran.epochs) == {cli.QUICK["epochs"]}
    assert set(ran.max_train_samples) == {cli.QUICK["max_train_samples"]} and set(ran.status) == {"ok"}
    skipped = trials[trials.suite == "pretrained"]
    assert len(skipped) == 2 and set(skipped.status) == {"skipped: needs ImageNet weights (--weights FILE)"}
    md = raycnn("table", tmp_path / "q", "--format", "markdown").stdout
    assert "— (15) skipped: needs ImageNet weights (--weights FILE) [quick]" in md
    assert md.count("[quick]") == 4 and "### 3.1 MNIST, lr = 0.01" in md
    # Nothing but pretrained trials and no weights: nothing to run, refused in one line.
    none = raycnn("run", "pretrained", "--quick", "--synthetic", "--results-dir", tmp_path, env=env)
    assert none.returncode == 2 and "--weights FILE" in none.stderr and len(none.stderr.splitlines()) == 1

