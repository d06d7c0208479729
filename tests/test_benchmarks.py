"""benchmarks/speed.py --quick end to end on the CPU (a real private Ray), and
benchmarks/project.py on the run folders it leaves."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEED_COLUMNS = ("device", "device_name", "measure", "model", "variant", "value", "rep", "ratio", "images",
                 "batch_size", "threads", "num_workers", "precision", "trials", "concurrency", "gpus_per_trial",
                 "data", "quick", "reps", "created", "git_rev", "torch_version", "ray_version")
MODELS = {"mnist_base", "cifar_base", "resnet18"}


def script(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """A benchmarks/ script in a subprocess, as a user runs it."""
    env = dict(os.environ, COLUMNS="200", RAY_AIR_NEW_OUTPUT="0")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """speed.py --quick once: (its folder, the process, its Parquet rows)."""
    tmp = tmp_path_factory.mktemp("speed")
    out = script("speed.py", "--quick", "--device", "cpu", "--out", tmp / "speed", "--keep-runs", tmp / "runs",
                 "--data-dir", tmp / "no-data", cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, out, pd.read_parquet(tmp / "speed" / "cpu.parquet")


def test_images_per_s_both_loops_and_ratio(quick):
    _, out, df = quick
    for col in SPEED_COLUMNS:
        assert col in df.columns, col
    assert set(df.device) == {"cpu"} and df.quick.all()
    ips = df[df.measure == "train_images_per_s"]
    assert set(ips.model) == MODELS and set(ips.variant) == {"naive", "raycnn"}
    assert (ips.value > 0).all() and ips.value.map(math.isfinite).all()
    assert set(ips.batch_size) == {64} and set(ips.threads) == {1}
    for (model, rep), g in ips.groupby(["model", "rep"]):
        naive, mine = g[g.variant == "naive"].iloc[0], g[g.variant == "raycnn"].iloc[0]
        assert naive.images == mine.images, model           # the same images for both loops
        assert mine.ratio == pytest.approx(mine.value / naive.value)
        assert math.isnan(naive.ratio)
    assert "raycnn/naive" in out.stdout


def test_ray_overhead_and_concurrency(quick):
    _, out, df = quick
    walls = df[df.measure == "suite_wall_s"].set_index("variant")
    assert {"in-process", "concurrency 1", "concurrency 2"} <= set(walls.index)
    assert (walls.value > 0).all()
    assert walls.loc["concurrency 2", "ratio"] == pytest.approx(walls.loc["concurrency 1", "value"] /
                                                                walls.loc["concurrency 2", "value"])
    overhead = df[df.measure == "ray_overhead_s_per_trial"].set_index("variant").value
    n = int(walls.loc["concurrency 1", "trials"])
    assert overhead["ray"] == pytest.approx((walls.loc["concurrency 1", "value"] - walls.loc["in-process", "value"]) / n)
    ips = df[df.measure == "trial_images_per_s"].set_index("concurrency")
    assert sorted(ips.index) == [1, 2] and (ips.value > 0).all()
    assert ips.loc[2, "ratio"] == pytest.approx(2 * ips.loc[2, "value"] / ips.loc[1, "value"])
    startup = df[df.measure == "ray_startup_s"]
    assert len(startup) == 2 and (startup.value > 0).all()
    assert overhead["ray-excl-startup"] < overhead["ray"]
    assert "Ray start-up" in out.stdout


def test_projection_from_the_quick_runs(quick):
    tmp, _, _ = quick
    out = script("project.py", tmp / "runs" / "ray-k1", "--speed", tmp / "speed" / "cpu.parquet", "--cpus", "1",
                 "--out", tmp / "projection.parquet", cwd=tmp)
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


def test_first_fit_schedule():
    spec = importlib.util.spec_from_file_location("project", ROOT / "benchmarks" / "project.py")
    project = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(project)
    assert project.simulate([10, 10, 10], [0.5, 0.5, 0.5]) == 20
    assert project.simulate([10, 4, 4, 4], [0.5, 0.5, 0.5, 0.5]) == 12    # the short ones share the other half
    assert project.simulate([], []) == 0
