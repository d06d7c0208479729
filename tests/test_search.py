"""`raycnn search`: search spaces as data, the validation split and the test set a search never
reads, ASHA's stops at the rungs, the epochs cap, the best config's re-run with fresh seeds, the
search view of `raycnn table`, the live view's rungs, and resume after Ctrl-C."""
from __future__ import annotations

import json
import math
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from conftest import SEARCH_BUDGET, search_files
from raycnn import cli, datafiles, search, space, suites, trainer
from raycnn.config import TrainConfig
from raycnn.errors import ConfigError
from raycnn.live import LiveView
from support import Background, cli_env, raycnn, reported, wait_for

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- without Ray


class Untouchable:
    """Stands for the test images: any read of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")

    def __getitem__(self, key):
        raise AssertionError("the test split was read (index)")


def test_a_search_sample_never_reads_the_test_set():
    data = datafiles.synthetic("mnist", seed=1, sizes=(512, 10))
    arrays = datafiles.Arrays(data.train_x, data.train_y, Untouchable(), Untouchable())
    config = TrainConfig(model="mnist_base", epochs=2, val_fraction=0.25, evaluate_test=False, num_threads=1)
    reports = []
    trainer.fit(config, report=lambda m, _: reports.append(m), arrays=arrays)
    assert [m["epoch"] for m in reports] == [1, 2]
    assert all(math.isnan(m["test_acc"]) and math.isnan(m["test_loss"]) for m in reports)
    assert all(math.isfinite(m["val_acc"]) for m in reports)
    with pytest.raises(AssertionError, match="the test split was read"):     # the check can fail
        trainer.fit(TrainConfig(model="mnist_base", epochs=1, val_fraction=0.25, num_threads=1), arrays=arrays)


def test_no_test_evaluation_needs_a_validation_split():
    with pytest.raises(ConfigError, match="evaluate_test = false needs val_fraction > 0"):
        TrainConfig(evaluate_test=False).validate()


def test_the_validation_split_is_disjoint_from_training():
    n = 1000
    ids = np.arange(n)
    arrays = datafiles.Arrays(ids.reshape(n, 1, 1, 1), ids, ids[:10], ids[:10])
    split = datafiles.hold_out(arrays, 0.1)
    train, val = set(split.train_y.tolist()), set(split.val_y.tolist())
    assert len(val) == 100 and len(train) == 900
    assert not train & val and train | val == set(range(n))          # every image once, in one split
    assert (split.train_x.ravel() == split.train_y).all() and (split.val_x.ravel() == split.val_y).all()
    assert datafiles.without_test(split).test_x is None and datafiles.without_test(split).val_y is split.val_y


def _tiny(tmp_path) -> suites.Suite:
    suite, _ = search_files(tmp_path)
    return suites.load(suite)


def test_a_cells_space_is_its_tables_resolved(tmp_path):
    tiny = _tiny(tmp_path)
    [cell] = tiny.trials
    domains = space.resolve(tiny.search, cell.name, cell.config)
    assert domains["lr"] == space.Domain("loguniform", (0.001, 0.1))         # two decades around 0.01
    assert domains["momentum"] == space.Domain("uniform", (0.0, 0.95))
    cifar = suites.load(suites.resolve("cifar10")[0])
    scheduled = next(t for t in cifar.trials if t.name == "cifar10/base/scheduler")
    plain = next(t for t in cifar.trials if t.name == "cifar10/base/no-scheduler")
    assert "milestones" in space.resolve(cifar.search, scheduled.name, scheduled.config)
    assert "milestones" not in space.resolve(cifar.search, plain.name, plain.config)
    mnist = suites.load(suites.resolve("mnist")[0])
    adam = next(t for t in mnist.trials if t.name == "mnist/dropout/adam/lr0.01")
    assert set(space.resolve(mnist.search, adam.name, adam.config)) == {"lr", "weight_decay"}   # no momentum


def test_choices_travel_as_json_text():
    domains = {"milestones": space.Domain("choice", ([10, 22], [5, 15])), "lr": space.Domain("loguniform", (1e-3, 1e-1))}
    sampled = {"milestones": space.encode([5, 15]), "lr": 0.02}
    assert space.decode(sampled, domains) == {"milestones": [5, 15], "lr": 0.02}
    config = space.apply(TrainConfig(scheduler="multistep"), space.decode(sampled, domains))
    assert config.milestones == (5, 15) and config.lr == 0.02


def test_rungs_are_ashas_milestones():
    assert search.rungs(1, 3, 10) == [1, 3, 9]
    assert search.rungs(1, 3, 30) == [1, 3, 9, 27]
    assert search.rungs(1, 3, 4) == [1, 3]
    assert search.rungs(4, 3, 4) == []                     # grace = epochs: nothing stopped early


def test_a_resume_with_other_options_is_refused(tmp_path):
    tiny = _tiny(tmp_path)
    args = {"metric": "val_acc", "seed": 0, "repeats": None, "samples": None, "grace": None, "val_fraction": None,
            "budget": None}
    doc = search.plan_doc(tiny.trials, {"tiny": tiny.search}, args, "optuna")
    search.check_resume(doc, json.loads(json.dumps(doc)))                    # the same plan: fine
    with pytest.raises(Exception, match="--samples, --seed"):
        search.check_resume(doc, search.plan_doc(tiny.trials, {"tiny": tiny.search}, args | {"samples": 3, "seed": 4},
                                                 "optuna"))


def test_the_samples_are_sent_no_test_split(tmp_path):
    """What the driver ships to a search's samples through the object store has no test images:
    a sample could not read them if it tried."""
    from dataclasses import replace
    from raycnn import tune as raytune
    tiny = _tiny(tmp_path)
    trials = [replace(t, config=replace(t.config, data_dir=str(tmp_path / "data"))) for t in tiny.trials]
    doc = search.plan_doc(trials, {"tiny": tiny.search}, {"metric": "val_acc", "seed": 0, "repeats": None,
                                                          "samples": None, "grace": None, "val_fraction": None,
                                                          "budget": None}, "random")
    objects, digests = raytune._sample_objects(doc)
    [arrays] = objects.values()
    assert arrays.test_x is None and arrays.test_y is None and len(arrays.train_y) == 600
    assert list(digests) == list(objects)                    # the data a resume must find again


def test_the_search_view_names_the_seeds_a_rerun_lacks():
    from raycnn import tables
    cell = {"name": "a", "report_acc": 0.46, "tuned_mean": 0.6, "tuned_std": 0.01, "tuned_n": 3, "tuned_budget": "full",
            "repeats": 3, "best_config": "lr=0.01", "epochs_search": 90, "epochs_rerun": 90}
    view = tables.search_view([cell, cell | {"name": "b", "tuned_n": 2, "epochs_rerun": 60}])
    assert tables.search_header(view)[3] == "tuned (3-seed re-run)"
    assert [c[3] for c in tables.search_cells(view)] == ["60.0 ± 1.0", "60.0 ± 1.0 (2 of 3 seeds)"]
    mixed = tables.search_view([cell, cell | {"name": "b", "repeats": 5, "tuned_n": 5}])
    assert tables.search_header(mixed)[3] == "tuned (re-run)"
    assert [c[3] for c in tables.search_cells(mixed)] == ["60.0 ± 1.0 (3 of 3 seeds)", "60.0 ± 1.0 (5 of 5 seeds)"]


def test_the_published_searches_script_names_real_cells_and_runs():
    """benchmarks/searches.sh (run at full budget by hand, not here): its four cells are cells of
    the bundled grid, each search is named after its cell, and the grid runs it compares with are
    published runs."""
    import re
    entries = re.findall(r'(?m)^  "(search-[^|]+)\|([^|]+)\|([^"]+)"$', (ROOT / "benchmarks" / "searches.sh").read_text())
    cells = {t.name for suite in ("mnist", "cifar10") for t in suites.load(suites.resolve(suite)[0]).trials}
    assert [cell for _, cell, _ in entries] == ["mnist/dropout/adam/lr0.01", "mnist/base/sgd/lr0.001",
                                                "cifar10/augment/jitter", "cifar10/base/scheduler"]
    for name, cell, runs in entries:
        assert cell in cells and name == "search-" + cell.replace("/", "-")
        assert all((ROOT / "results" / run / "trials.parquet").is_file() for run in runs.split()), runs
        assert f"raycnn search '{cell}' --data-dir data --results-dir runs --name {name}" in (ROOT / "README.md").read_text()


def test_the_cli_metrics_are_the_searchs():
    assert set(cli.SEARCH_METRICS) == set(search.METRICS) and not any("test" in m for m in cli.SEARCH_METRICS)


def test_the_live_view_shows_each_samples_rung():
    console = Console(record=True, width=160, force_terminal=False)
    view = LiveView(console)
    view.start([])
    meta = {"name": "tiny/sgd", "repeat": 3, "order": 0, "folder": "abc", "rungs": [1, 3],
            "config": {"epochs": 4, "batch_size": 64}}
    view.update(meta, {"epoch": 1, "val_acc": 0.5, "status": "running"})
    table = view.render()
    assert [c.header for c in table.columns][:4] == ["trial", "status", "epoch", "rung"]
    assert "val acc" in [c.header for c in table.columns]
    console.print(table)
    text = console.export_text()
    assert "tiny/sgd sample 3" in text and "1/2 -> 3" in text and "50.00%" in text
    view.update(meta, {"epoch": 3, "val_acc": 0.6, "status": "running"})
    view.update(meta, {"status": "stopped"})
    console.print(view.render())
    assert "2/2" in console.export_text()


# ---------------------------------------------------------------- a real search (Ray)


@pytest.fixture(scope="module")
def done(searched):
    run, proc = searched
    samples, epochs = search.load_samples(run)
    return run, proc, samples, epochs, search.read(run)


def test_every_sample_is_a_row_with_its_config_rung_and_stop(done):
    run, proc, samples, epochs, doc = done
    for col in ("name", "sample", "lr", "momentum", "searched", "epochs_done", "rung", "stop", "metric",
                "metric_value", "seed", "val_fraction", "evaluate_test", "git_rev", "torch_version", "ray_version",
                "device", "wall_seconds"):
        assert col in samples.columns, col
    assert set(samples["searched"]) == {"lr,momentum"} and set(samples["metric"]) == {"val_acc"}
    assert samples["lr"].between(0.001, 0.1).all() and samples["momentum"].between(0.0, 0.95).all()
    assert samples["lr"].nunique() == len(samples)                           # each sample its own config
    assert (samples["seed"] == 0).all() and (samples["val_fraction"] == 0.1).all()
    assert set(samples["stop"]) <= {"completed", "asha", "budget"}
    per_sample = epochs.groupby("sample")["epoch"].max()
    assert per_sample.to_dict() == samples.set_index("sample")["epochs_done"].to_dict()
    assert "raycnn table" in proc.stderr and "Traceback" not in proc.stderr


def test_the_search_never_read_the_test_set(done):
    run, _, samples, epochs, _ = done
    assert epochs["test_acc"].isna().all() and epochs["test_loss"].isna().all()
    assert epochs["val_acc"].notna().all()
    assert not samples["evaluate_test"].any()


def assert_ashas_rule(samples: pd.DataFrame, epochs: pd.DataFrame, rungs: list[int], factor: float = 3) -> None:
    """Samples that ran one at a time were each compared at a rung with the samples before it:
    ASHA stopped exactly those below the cutoff (the 1 - 1/factor quantile of the earlier ones there)."""
    at = epochs.set_index(["sample", "epoch"])["val_acc"]
    for rung in rungs:
        seen = []
        for s in samples.sort_values("sample").itertuples():
            if s.epochs_done < rung:
                continue                          # never there
            value = at[(s.sample, rung)]
            below = bool(seen) and value < np.nanpercentile(seen, (1 - 1 / factor) * 100)
            assert below == (s.stop == "asha" and s.epochs_done == rung), (rung, s.sample, value, seen)
            seen.append(value)


def test_asha_stops_samples_at_the_rungs(done):
    _, _, samples, epochs, doc = done
    [cell] = doc["cells"]
    assert cell["rungs"] == [1, 3]
    stopped = samples[samples["stop"] == "asha"]
    assert len(stopped) >= 1 and stopped["epochs_done"].isin(cell["rungs"]).all()
    assert (samples[samples["stop"] == "completed"]["epochs_done"] == 4).all()
    assert set(samples["status"]) == {"ok"}          # a sample ASHA or the cap stopped is not still running
    assert_ashas_rule(samples, epochs, cell["rungs"])


def test_the_epochs_cap_holds(done):
    _, _, samples, epochs, doc = done
    assert doc["cells"][0]["budget"] == SEARCH_BUDGET
    assert len(epochs) == samples["epochs_done"].sum() == SEARCH_BUDGET     # reached, never passed
    assert len(samples) < 8                                                 # the cap ended the search


def test_the_best_config_is_rerun_with_fresh_seeds_on_the_test_set(done):
    from raycnn import results
    run, _, samples, _, doc = done
    [cell] = doc["cells"]
    best = samples[samples["sample"] == cell["best"]["sample"]].iloc[0]
    furthest = samples[samples["epochs_done"] == samples["epochs_done"].max()]
    assert best["metric_value"] == furthest["metric_value"].max()         # chosen on validation only
    trials, epochs = results.load_run(run)
    assert sorted(trials["seed"]) == [1, 2] and (trials["name"] == "tiny/sgd").all()     # not the search's seed 0
    assert (trials["lr"] == best["lr"]).all() and (trials["momentum"] == best["momentum"]).all()
    assert (trials["val_fraction"] == 0).all() and trials["evaluate_test"].all() and (trials["status"] == "ok").all()
    assert epochs["test_acc"].notna().all() and (trials["epochs_done"] == 4).all()


def test_table_shows_the_search_view(done, capsys):
    run, _, samples, _, doc = done
    assert cli.main(["table", str(run), "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "| cell | report | grid (ours) | tuned (2-seed re-run) | best config | epochs spent |" in out
    lr = doc["cells"][0]["best"]["values"]["lr"]
    assert "| tiny/sgd | 90 | — |" in out and f"lr={lr:.3g}" in out and f"| {SEARCH_BUDGET} + 8 |" in out
    assert " seeds)" not in out                                  # both seeds ran: the header says them
    assert cli.main(["table", str(run), "--format", "csv"]) == 0
    view = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert view.loc[0, "tuned_n"] == view.loc[0, "repeats"] == 2 and view.loc[0, "samples"] == len(samples)


def test_a_published_search_is_checked_as_its_table_command_renders_it(done, tmp_path, capsys):
    """tests/test_published.py on a search folder published as benchmarks/searches.sh publishes
    one: its section's `raycnn table` command renders the search view, and a wrong number fails."""
    from test_published import _grids, expected_markdown, published_runs
    run = tmp_path / "results" / "search-tiny"
    run.mkdir(parents=True)
    for f in ("search.json", *search.SAMPLES, "trials.parquet", "epochs.parquet"):
        shutil.copy(done[0] / f, run / f)
    command = "raycnn table results/search-tiny --format markdown"
    assert cli.main(["table", str(run), "--format", "markdown"]) == 0
    section = f"    {command}\n\n{capsys.readouterr().out}"
    (tmp_path / "results" / "README.md").write_text(f"# Results\n\n## search-tiny: the tiny cell searched\n\n{section}")
    assert published_runs(tmp_path / "results") == [run]
    [grid] = _grids(expected_markdown(run, section, capsys))
    assert grid in section and "| tiny/sgd | 90 |" in grid
    assert " ± " in grid and grid not in section.replace(" ± ", " +- ")       # another tuned cell: caught


@pytest.mark.slow
def test_resume_after_ctrl_c_loses_no_sample(tmp_path):
    suite, data = search_files(tmp_path)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    args = ("search", "tiny/*", "--suite", suite, "--data-dir", data, "--samples", "4", "--budget", "100",
            "--results-dir", tmp_path / "runs", "--name", "s", "--num-cpus", "2", "--max-concurrent", "1")
    try:
        first = Background(*args, env=cli_env(ray_tmp), logs=tmp_path / "first")
        try:
            def two_reported():       # the driver's own copy: the run folder's is synced now and then
                return len([t for t, lines in reported(ray_tmp).items() if t.startswith("sample-") and lines]) >= 2
            wait_for("two samples reporting", two_reported, timeout=900, proc=first)
            first.proc.send_signal(signal.SIGINT)
            rc, _, err = first.wait(timeout=300)
        finally:
            first.stop()
        assert rc == 130 and "resume with: raycnn search" in err, err[-2000:]
        before = pd.read_parquet(tmp_path / "runs" / "s" / "samples.parquet")
        assert len(before) >= 2
        again = raycnn(*args, "--resume", env=cli_env(ray_tmp), timeout=1500)
        assert again.returncode == 0, again.stderr[-3000:]
        after, epochs = search.load_samples(tmp_path / "runs" / "s")
        assert len(after) == 4 and set(after["stop"]) <= {"completed", "asha"}
        kept = after.set_index("folder").loc[before["folder"]]
        assert (kept["lr"].to_numpy() == before["lr"].to_numpy()).all()        # the same samples, not new ones
        assert (kept["epochs_done"].to_numpy() >= before["epochs_done"].to_numpy()).all()
        assert epochs.groupby("sample")["epoch"].apply(lambda e: sorted(e) == list(range(1, len(e) + 1))).all()
        # ASHA's record of the rungs came back with the search: the samples after the interruption
        # were compared with those before it.
        assert_ashas_rule(after, epochs, search.read(tmp_path / "runs" / "s")["cells"][0]["rungs"])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_reading_a_search_needs_neither_torch_nor_ray(done, tmp_path):
    import subprocess
    import sys
    run = str(done[0])
    code = ("import contextlib, io, sys\nfrom raycnn import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    codes = [cli.main(['table', {run!r}]), cli.main(['report', {run!r}, '-o', {str(tmp_path / 'p.html')!r}])]\n"
            "print(codes, 'torch' in sys.modules, 'ray' in sys.modules, 'optuna' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[0, 0] False False False", out.stdout + out.stderr[-2000:]
