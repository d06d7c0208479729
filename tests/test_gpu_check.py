"""benchmarks/gpu_check.sh here, so that a typo cannot waste a GPU session: the size check of
what travels, the preparation of .device/ (slow: it builds the Ray bundle from PyPI), and a dry
run of the device half on the CPU (slow: a real private Ray, every step of the script)."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# The GPU kit (make_ray_bundle.sh, datapack.py and its data), where the environment names one.
KIT = Path(os.environ.get("GPU_KIT", "/nonexistent"))


def gpu_check(*args, timeout=600, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHON=sys.executable, COLUMNS="200", **{k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=timeout)


def test_size_check_counts_device_folder(tmp_path):
    (tmp_path / "blob").write_bytes(b"\0" * 3 * 2**20)
    ok = gpu_check("--check-size", GPU_CHECK_DEVICE_DIR=tmp_path)
    assert ok.returncode == 0, ok.stderr
    mib = float(ok.stdout.split("travels: ")[1].split()[0])
    assert 3 <= mib < 64
    over = gpu_check("--check-size", GPU_CHECK_DEVICE_DIR=tmp_path, GPU_CHECK_LIMIT_MIB=2)
    assert over.returncode == 2 and "over the 2 MiB limit" in over.stderr
    assert len(over.stderr.strip().splitlines()) == 1


def test_prepare_without_a_kit_is_one_line(tmp_path):
    out = gpu_check("--prepare", GPU_CHECK_DEVICE_DIR=tmp_path / "dev", GPU_KIT="")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "GPU_KIT=DIR" in out.stderr


def test_unknown_option_is_one_line():
    out = gpu_check("--prepair")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "gpu_check: unknown option --prepair (--prepare, --check-size, --dry-run or none)"]


@pytest.mark.slow
@pytest.mark.skipif(not KIT.is_dir(), reason="needs GPU_KIT, the GPU kit folder with its data")
def test_prepare_fills_the_device_folder(tmp_path):
    out = gpu_check("--prepare", GPU_CHECK_DEVICE_DIR=tmp_path / "dev", GPU_KIT=KIT, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    dev = tmp_path / "dev"
    sizes = {p.name: p.stat().st_size for p in dev.iterdir() if p.is_file()}
    assert sizes["ray-site.tar.xz"] > 10 * 2**20 and sizes["data.npz"] > 20 * 2**20 and "datapack.py" in sizes
    assert (dev / "pylib" / "rich" / "__init__.py").is_file()
    assert "travels:" in out.stdout


@pytest.mark.slow
def test_dry_run_of_the_device_half(tmp_path):
    """Every step on the CPU with synthetic data, tiny sizes and a few grid trials; the figures
    land in $OUT as they would come back from the GPU machine."""
    out_dir, res = tmp_path / "out", tmp_path / "results"
    run = gpu_check("--dry-run", OUT=out_dir, GPU_CHECK_RESULTS=res, timeout=1900)
    log = run.stdout
    assert run.returncode == 0, log[-4000:] + run.stderr[-2000:]
    speed = out_dir / "results" / "speed"
    throughput = pd.read_parquet(speed / "throughput-cpu.parquet")
    assert {"naive-w0", "raycnn"} <= set(throughput.variant)
    layout = pd.read_parquet(speed / "layout-cpu.parquet")
    assert set(layout.layout) == {"nchw", "channels_last"} and set(layout.model) == {"mnist_base", "cifar_base"}
    packing = pd.read_parquet(speed / "packing-cpu.parquet")
    assert sorted(packing.concurrency.unique()) == [1, 2]
    grid = pd.read_parquet(speed / "grid-cpu.parquet").iloc[0]
    assert grid.outcome == "ok" and grid.trials == grid.ok == 4 and grid.value > 0
    trials = pd.read_parquet(out_dir / "results" / "grid-cpu" / "trials.parquet")
    assert set(trials.status) == {"ok"} and len(trials) == 4
    compiled = pd.read_parquet(speed / "compile" / "throughput-cpu.parquet")
    assert "raycnn-compile" in set(compiled.variant)
    assert "the 8 pretrained trials are left out" in log
    assert (speed / "gpu-check.log").is_file()


def test_skipped_steps_do_not_run(tmp_path):
    run = gpu_check("--dry-run", OUT=tmp_path / "out", GPU_CHECK_RESULTS=tmp_path / "results",
                    GPU_CHECK_SKIP="throughput,layout,packing,grid,compile", timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "== done" in run.stdout and "benchmarks/" not in run.stdout     # no step started
    assert (tmp_path / "out" / "results" / "speed" / "gpu-check.log").is_file()
