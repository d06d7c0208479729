"""The import rules, checked in fresh interpreters: Ray lives in the Ray modules only, and the
command line's reading path imports neither torch nor Ray, so `raycnn --help`, `list` and
`table` answer at once and results can be read where neither is installed."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import raycnn

RAY_MODULES = {"raycnn.tune", "raycnn.trial", "raycnn.cluster", "raycnn.ray_trackers"}
# What `raycnn list/table/compare/report/plot` and `--help` import: none of them may bring torch.
READING = ["raycnn.cli", "raycnn.config", "raycnn.suites", "raycnn.results", "raycnn.tables", "raycnn.report",
           "raycnn.plots", "raycnn.screen", "raycnn.experiment", "raycnn.plan", "raycnn.outcome", "raycnn.errors",
           "raycnn.files", "raycnn.storage", "raycnn.lock", "raycnn.provenance", "raycnn.datafiles", "raycnn.epoch_progress",
           "raycnn.space", "raycnn.search", "raycnn.search_plots"]


def _imported(modules: list[str], prefix: str) -> list[str]:
    """The modules under `prefix` that importing `modules` in a fresh interpreter brings in."""
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(sorted(k for k in sys.modules if k == {prefix!r} or k.startswith({prefix + '.'!r}))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(raycnn.__path__[0]).parent)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip())


def test_only_the_ray_modules_import_ray():
    modules = sorted(f"raycnn.{m.name}" for m in pkgutil.iter_modules(raycnn.__path__))
    others = [m for m in modules if m not in RAY_MODULES]
    assert set(READING) <= set(others) and {"raycnn.trainer", "raycnn.models", "raycnn.augment"} <= set(others)
    assert _imported(others, "ray") == []
    assert _imported(["raycnn.cluster"], "ray")        # and the check sees Ray where it is imported


def test_optuna_lives_in_the_ray_modules_only():
    modules = sorted(f"raycnn.{m.name}" for m in pkgutil.iter_modules(raycnn.__path__))
    assert _imported([m for m in modules if m not in RAY_MODULES], "optuna") == []


@pytest.mark.parametrize("modules", [READING, ["raycnn.cli"]])
def test_the_reading_path_imports_no_torch(modules):
    assert _imported(modules, "torch") == []
    assert _imported(["raycnn.trainer"], "torch")      # and the check sees torch where it is imported


def test_reading_commands_run_without_torch_or_ray(tmp_path):
    """Not just imported: `table` and `compare` over a published run without pandas either (they
    must answer at once), then `report`, in one process."""
    run = str(Path(raycnn.__path__[0]).parent / "results" / "cifar10-handbuilt-30ep")
    code = ("import contextlib, io, sys\nfrom raycnn import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    codes = [cli.main(['table', {run!r}]), cli.main(['compare', {run!r}, {run!r}])]\n"
            "    light = 'pandas' not in sys.modules\n"
            f"    codes.append(cli.main(['report', {run!r}, '-o', {str(tmp_path / 'p.html')!r}]))\n"
            "print(codes, light, 'torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[0, 0, 0] True False False", out.stdout + out.stderr[-2000:]
