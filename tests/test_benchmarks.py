"""The speed benchmarks end to end on the CPU, as a user runs them: benchmarks/throughput.py
--quick, benchmarks/packing.py on a real private Ray, benchmarks/project.py on the run
folders packing leaves, and benchmarks/roofline.py --quick (its three levels, two of them
through a private Ray)."""
import importlib.util
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
PROVENANCE = ("created", "git_rev", "torch_version", "ray_version", "python_version")
THROUGHPUT_COLUMNS = ("device", "device_name", "measure", "model", "variant", "value", "rep", "ratio", "images",
                      "batch_size", "threads", "num_workers", "precision", "data", "quick", "reps", "load_1min",
                      *PROVENANCE)


def script(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """A benchmarks/ script in a subprocess, as a user runs it."""
    env = dict(os.environ, COLUMNS="200", RAY_AIR_NEW_OUTPUT="0")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_throughput_both_loops_at_equal_threads(tmp_path):
    out = script("throughput.py", "--quick", "--models", "mnist_base,cifar_base", "--threads", "2",
                 "--naive-workers", "0,1", "--reps", "2", "--out", tmp_path, "--data-dir", tmp_path / "no-data",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "throughput-cpu.parquet")
    for col in THROUGHPUT_COLUMNS:
        assert col in df.columns, col
    assert set(df.model) == {"mnist_base", "cifar_base"} and set(df.variant) == {"naive-w0", "naive-w1", "raycnn"}
    assert (df.value > 0).all() and df.value.map(math.isfinite).all()
    assert set(df.threads) == {2} and set(df.batch_size) == {64} and set(df.data) == {"synthetic"}
    for (model, rep), g in df.groupby(["model", "rep"]):
        v = g.set_index("variant")
        assert v.loc["naive-w1", "num_workers"] == 1 and len(set(g.images)) == 1     # the same images for all
        best = max(v.loc["naive-w0", "value"], v.loc["naive-w1", "value"])
        assert v.loc["raycnn", "ratio"] == pytest.approx(v.loc["raycnn", "value"] / best)
        assert math.isnan(v.loc["naive-w0", "ratio"])
    assert "raycnn/naive" in out.stdout


def test_throughput_bad_model_is_one_line(tmp_path):
    out = script("throughput.py", "--models", "vgg", cwd=tmp_path)
    assert out.returncode == 2 and "unknown model(s) vgg" in out.stderr
    assert "Traceback" not in out.stderr


# packing.py and search_cost.py start a private Ray per run (two and three of them): minutes on
# two shared cores, so they run in the slow tier.
@pytest.fixture(scope="module")
def packing(tmp_path_factory):
    """packing.py at 1 and 2 trials, tiny and synthetic: (its folder, the process, its rows)."""
    tmp = tmp_path_factory.mktemp("packing")
    out = script("packing.py", "--synthetic", "--trial-images", "128", "--epochs", "1", "--concurrency", "1,2",
                 "--out", tmp / "speed", "--keep-runs", tmp / "runs", cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, out, pd.read_parquet(tmp / "speed" / "packing-cpu.parquet")


@pytest.mark.slow
def test_packing_total_images_per_s(packing):
    _, out, df = packing
    for col in ("label", "concurrency", "gpus_per_trial", "trials", "images", "epochs", *PROVENANCE):
        assert col in df.columns, col
    assert set(df.label) == {"plain"} and set(df.data) == {"synthetic"}
    v = df.set_index(["measure", "concurrency"]).value
    assert sorted(df.concurrency.unique()) == [1, 2] and (df.value > 0).all()
    for k in (1, 2):
        assert v["total_images_per_s", k] == pytest.approx(k * v["trial_images_per_s", k])
    r = df.set_index(["measure", "concurrency"]).ratio
    assert r["total_images_per_s", 2] == pytest.approx(v["total_images_per_s", 2] / v["total_images_per_s", 1])
    assert "img/s in all" in out.stdout


@pytest.mark.slow
def test_projection_from_the_packing_runs(packing):
    tmp, _, _ = packing
    out = script("project.py", tmp / "runs" / "plain-k1", "--speed", tmp / "speed" / "packing-cpu.parquet",
                 "--cpus", "1", "--out", tmp / "projection.parquet", cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Projected wall time" in out.stdout
    df = pd.read_parquet(tmp / "projection.parquet")
    trials = df[df.level == "trial"].set_index("name")
    assert len(trials) == 59                                 # the report's whole grid
    measured = trials.loc["cifar10/base/no-scheduler"]
    assert measured.source == "measured" and measured.epochs == 30
    assert measured.epoch_s > 0 and measured.trial_s >= 30 * measured.epoch_s
    assert trials.loc["cifar10/augment/flip"].source == "model mean"    # another cifar_base trial
    assert trials.loc["mnist/base/sgd/lr0.01"].source == "missing"
    grid = df[df.level == "grid"].iloc[0]
    assert grid.trials == 59 and grid.missing == (trials.source == "missing").sum()
    assert grid.wall_s_measured_packing > 0 and grid.wall_s_best_packing > 0


def benchmark(name: str):
    """benchmarks/NAME.py imported as a module, with its folder on sys.path while it imports
    (the scripts import throughput.py beside them)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_first_fit_schedule():
    project = benchmark("project")
    assert project.simulate([10, 10, 10], [0.5, 0.5, 0.5]) == 20
    assert project.simulate([10, 4, 4, 4], [0.5, 0.5, 0.5, 0.5]) == 12    # the short ones share the other half
    assert project.simulate([], []) == 0


def test_projection_beside_full_runs(tmp_path):
    """--against: each grid trial's projection beside its measured wall time, from runs at the
    report's epochs only (a 1-epoch run is no full run), a later run winning a trial; one line
    and exit 2 for a folder that is no run."""
    project = benchmark("project")
    results = ROOT / "results"
    df = project.durations(project.estimate(project.grid(), project.measured([results / "mnist-all-1ep"])), 0.0)
    assert project.against(df, [results / "mnist-all-1ep"]).empty
    both = project.against(df, [results / "mnist-grid-10ep-a", results / "mnist-grid-10ep-c"])
    wall = {}
    for r in ("mnist-grid-10ep-a", "mnist-grid-10ep-c"):
        wall.update(pd.read_parquet(results / r / "trials.parquet").groupby("name")["wall_seconds"].mean())
    assert len(both) == len(wall) == 35
    assert both.set_index("name")["measured_s"].to_dict() == pytest.approx(wall)
    out = script("project.py", results / "mnist-all-1ep", "--cpus", "2", "--against", results / "mnist-grid-10ep-c",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"│ all\s+│ 16\s+│ [\d.]+\s+│ [\d.]+\s+│ [\d.]+", out.stdout)
    # In all, the measured trials packed first-fit two at a time (--cpus 2, one CPU each) as Tune runs them.
    c = project.against(df, [results / "mnist-grid-10ep-c"])
    assert project._hms(project.simulate(c["measured_s"].tolist(), [0.5] * len(c))) in out.stdout
    # A CPU run records its suite's declared GPU share (0.125 here) too: it is still placed by CPUs.
    cpu_run = project.measured([results / "mnist-grid-10ep-c"])
    assert set(cpu_run["gpus"]) == {0.125} and set(cpu_run["device"]) == {"cpu"}
    placed = project.durations(project.estimate(project.grid(), cpu_run), 0.0).dropna(subset=["trial_s"])
    assert set(project.shares(placed, 1.0, 2)) == {0.5}
    bad = script("project.py", results / "mnist-all-1ep", "--against", tmp_path, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_grid_runs_the_longest_trials_first_at_the_best_packing(tmp_path):
    grid = benchmark("grid")
    pd.DataFrame([dict(measure="total_images_per_s", label=label, concurrency=k, value=v) for label, k, v in
                  (("plain", 1, 100.0), ("plain", 4, 390.0), ("plain", 8, 380.0), ("mps", 8, 420.0))]
                 + [dict(measure="trial_images_per_s", label="plain", concurrency=1, value=999.0)]
                 ).to_parquet(tmp_path / "packing.parquet")
    assert grid.best_packing(str(tmp_path / "packing.parquet")) == ("mps", 8)
    assert grid.best_packing(str(tmp_path / "missing.parquet")) == ("plain", 1)
    args = grid.parse(["--data-dir", str(tmp_path)])
    trials = grid.trials(args, 8)
    assert len(trials) == 51 and not any(t.suite == "pretrained" for t in trials)
    assert {t.config.model for t in trials[:2]} == {"alexnet", "resnet18"}
    assert all(t.gpus_per_trial == 0.5 for t in trials[:2]) and all(t.gpus_per_trial == 1 / 8 for t in trials[2:])
    assert [t.suite for t in trials[2:]] == ["cifar10"] * 9 + ["mnist"] * 40    # 30 epochs before 10
    assert all(t.config.epochs == {"cifar10": 30, "mnist": 10}[t.suite] for t in trials)


@pytest.mark.parametrize("precision, file", [("fp32", "layout-cpu.parquet"), ("bf16", "layout-cpu-bf16.parquet")])
def test_layout_both_formats_alternating(tmp_path, precision, file):
    out = script("layout.py", "--quick", "--models", "mnist_base,cifar_base", "--reps", "2", "--out", tmp_path,
                 "--precision", precision, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p.name for p in tmp_path.glob("layout-*.parquet")] == [file]
    df = pd.read_parquet(tmp_path / file)
    for col in ("device", "model", "precision", "layout", "ms_per_step", "rep", "ratio", "steps", "threads",
                *PROVENANCE):
        assert col in df.columns, col
    assert set(df.precision) == {precision} and f"batch 64, {precision};" in out.stdout
    assert len(df) == 2 * 2 * 2 and (df.ms_per_step > 0).all()
    for _, g in df.groupby(["model", "rep"]):
        v = g.set_index("layout")
        assert v.loc["channels_last", "ratio"] == pytest.approx(v.loc["nchw", "ms_per_step"] / v.loc["channels_last", "ms_per_step"])
    assert "NCHW / channels_last" in out.stdout


@pytest.mark.slow
def test_denormal_flushing_against_not_on_a_decayed_net(tmp_path):
    """benchmarks/denormal.py at one repetition: each measurement a fresh process. The decayed
    state keeps its subnormals through the timed steps where nothing flushes them, and a flushing
    process reads them as zeros: the mode took effect in the process that timed it."""
    out = script("denormal.py", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "denormal-cpu.parquet")
    for col in ("model", "optimizer", "state", "flush", "ms_per_step", "ratio", "subnormal_before",
                "subnormal_after", "threads", "load_1min", *PROVENANCE):
        assert col in df.columns, col
    rows = df.set_index(["state", "flush"])
    assert sorted(rows.index) == [("decayed", False), ("decayed", True), ("fresh", False), ("fresh", True)]
    kept = rows.loc[("decayed", False)]
    assert kept.subnormal_before == pytest.approx(0.6, abs=0.01) and kept.subnormal_after == pytest.approx(0.6, abs=0.01)
    assert rows.loc[("decayed", True)].subnormal_before == 0 == rows.loc[("decayed", True)].subnormal_after
    assert (df[~df.flush].ratio.isna()).all()
    flushed = rows.loc[("decayed", True)]
    assert flushed.ratio == pytest.approx(kept.ms_per_step / flushed.ms_per_step)
    assert "unflushed / flushed" in out.stdout


@pytest.mark.slow
def test_arena_one_against_the_default_in_a_thread(tmp_path):
    """benchmarks/arena.py at one repetition of 4 steps on AlexNet: each case a fresh process. In a
    thread with glibc's default arenas the step faults in its 218 MB of dense-layer gradients every
    step (about 53,000 faults); with one arena far fewer (the heap may still grow in the first
    timed steps, up to about 18,000 faults in one): the environment took effect in the process
    that timed it."""
    out = script("arena.py", "--steps", "4", "--reps", "1", "--models", "alexnet", "--out", tmp_path, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "arena-cpu.parquet")
    for col in ("model", "case", "images_per_s", "faults_per_step", "sys_share", "ratio", "threads", "load_1min",
                *PROVENANCE):
        assert col in df.columns, col
    rows = df.set_index("case")
    assert sorted(rows.index) == ["main", "thread", "thread, one arena"] and (df.images_per_s > 0).all()
    assert rows.loc["thread", "faults_per_step"] > 40_000 > 3 * rows.loc["thread, one arena", "faults_per_step"]
    assert rows.loc["thread, one arena", "ratio"] == pytest.approx(
        rows.loc["thread, one arena", "images_per_s"] / rows.loc["thread", "images_per_s"])
    assert df[df.case != "thread, one arena"].ratio.isna().all() and "one arena / default" in out.stdout


@pytest.mark.slow
def test_search_cost_asha_against_the_full_grid_of_its_samples(tmp_path):
    """benchmarks/search_cost.py at a tiny size: the tiny search suite at 2 epochs (one rung, at
    epoch 1), 3 samples, one seed, on MNIST-format random files. Three raycnn commands, each
    starting its own Ray: a longer limit than the other scripts'."""
    from conftest import search_files
    suite, data = search_files(tmp_path)
    env = dict(os.environ, COLUMNS="200", RAY_AIR_NEW_OUTPUT="0")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_cost.py"), "tiny/sgd", "--suite", str(suite),
                          "--data-dir", str(data), "--samples", "3", "--epochs", "2", "--repeats", "1", "--num-cpus", "2",
                          "--max-concurrent", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "speed")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "speed" / "search-cost.parquet").set_index("path")
    assert list(df.index) == ["asha", "grid"] and (df["samples"] == 3).all() and (df["seeds"] == 1).all()
    assert df.loc["grid", "sample_epochs"] == 3 * 2                       # every sample to its last epoch
    assert df.loc["asha", "sample_epochs"] <= df.loc["grid", "sample_epochs"]
    assert (df["rerun_epochs"] == 2).all() and df["rerun_acc_mean"].between(0, 1).all() and (df["wall_s"] > 0).all()
    asha = pd.read_parquet(tmp_path / "work" / "asha" / "samples.parquet")
    grid = pd.read_parquet(tmp_path / "work" / "grid" / "trials.parquet")
    assert sorted(asha["lr"]) == sorted(grid["lr"])                          # the same samples, trained in full
    assert not grid["evaluate_test"].any() and (grid["val_fraction"] == 0.1).all()   # selected as the search does
    ratio = df.loc["grid", "sample_epochs"] / df.loc["asha", "sample_epochs"]
    assert df["epochs_ratio"].iloc[0] == pytest.approx(ratio) and f"{ratio:.2f}x the epochs" in out.stdout


@pytest.mark.slow    # the bare step, fit and a Ray Tune trial, each in fp32 and bf16: minutes
def test_roofline_levels_ratios_and_packing(tmp_path):
    # The trials at the test's own priority: at Ray's default (nice 15 on top of it) they can wait
    # for minutes behind other work on a loaded machine.
    out = script("roofline.py", "--quick", "--models", "mnist_base", "--reps", "1", "--out", tmp_path,
                 "--data-dir", tmp_path / "no-data", "--worker-niceness", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "roofline-cpu.parquet")
    for col in ("measure", "model", "level", "precision", "value", "rep", "pct_peak", "threads", "source",
                "worker_niceness", *PROVENANCE):
        assert col in df.columns, col
    assert set(df.worker_niceness) == {0} and "trials at nice 0" in out.stdout
    assert set(df.data[df.measure == "images_per_s"]) == {"synthetic"}
    flops = df[df.measure == "gflop_per_image"].set_index("model").value
    # by hand: forward 2 x (26*26*32*9 + 24*24*64*32*9 + 9216*128 + 128*10) = 24 MFLOP, backward about twice that
    assert 0.06 < flops["mnist_base"] < 0.08
    assert "fp32" in set(df[df.measure == "peak_gflop_s"].precision)
    assert (df[df.measure == "gemm_gflop_s"].value > 0).all()
    ips = df[df.measure == "images_per_s"]
    for level in ("bare", "fit", "trial"):
        for precision in ("fp32", "bf16"):
            mine = ips[(ips.level == level) & (ips.precision == precision)]
            assert list(mine.rep) == [0] and (mine.value > 0).all() and mine.pct_peak.map(math.isfinite).all()
    assert set(ips[ips.level == "pack_2x1"].threads) == {2} and len(ips[ips.level == "pack_1x2"]) == 1
    line = next(l for l in out.stdout.splitlines() if l.startswith("ratios mnist_base:"))
    numbers = re.findall(r"(fit/bare|trial/bare|bare|fit|trial) ([^\s;]+)", line)
    assert len(numbers) == 7 and all(math.isfinite(float(v)) and float(v) > 0 for _, v in numbers), line
    assert re.search(r"packing mnist_base fp32: .* (2 trials x 1 thread|1 trial x 2 threads) wins \(\d", out.stdout)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")) or platform.machine() not in ("x86_64", "aarch64"),
                    reason="the clock program needs a C compiler on x86-64 or Arm64")
def test_roofline_measures_the_clock():
    roofline = benchmark("roofline")
    hz = roofline.measured_clock_hz(passes=20_000_000)
    # One dependent add a cycle: a loop the compiler folded, or adds run side by side, would read
    # tens of GHz; a server core runs at 1-6.
    assert hz is not None and 0.5e9 < hz < 7e9, hz
    assert roofline.clock_hz({}, None)[1] == "measured: dependent adds"
    assert roofline.clock_hz({}, 2.5) == (2.5e9, "--clock-ghz")


def test_roofline_bad_model_is_one_line(tmp_path):
    out = script("roofline.py", "--models", "vgg", cwd=tmp_path)
    assert out.returncode == 2 and "unknown model(s) vgg" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_roofline_data_copy_reads_back_the_same(tmp_path, dataset):
    # the trials of roofline.py read their images from this copy through raycnn's own readers
    roofline = benchmark("roofline")
    from raycnn import datafiles
    arrays = datafiles.synthetic(dataset, seed=2, sizes=(70, 30))
    roofline.WRITERS[dataset](arrays, tmp_path)
    back = datafiles.read(dataset, tmp_path, download=False)
    for split in ("train_x", "train_y", "test_x", "test_y"):
        got, want = getattr(back, split), getattr(arrays, split)
        assert got.shape == want.shape and (got == want).all(), split
