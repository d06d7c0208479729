"""A plain, non-editable install: the wheel carries the bundled suites, and `raycnn list` finds
them from any folder, with nothing of this checkout on the path."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package built as a wheel from a clean copy of the sources, installed --no-deps."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # A copy, so the build's egg-info and build/ folders never land in the checkout.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "results", "data", "build", "*.egg-info",
                                                              "__pycache__", ".pytest_cache", "runs", "my-results"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], check=True,
                   capture_output=True, timeout=300)
    [wheel] = (tmp / "dist").glob("raycnn-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True, capture_output=True,
                   timeout=300)
    return wheel, tmp / "site"


def test_wheel_ships_the_bundled_suites(installed):
    wheel, site = installed
    assert sorted(p.name for p in (site / "raycnn" / "bundled").glob("*.toml")) == \
        ["cifar10.toml", "mnist.toml", "pretrained.toml"]


def test_installed_list_finds_59_trials_from_another_folder(installed, tmp_path):
    _, site = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", "import sys, raycnn.cli; print(raycnn.cli.__file__, file=sys.stderr);"
                          " sys.exit(raycnn.cli.main(['list']))"], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert str(site) in out.stderr and "59 trials in 3 suite(s)" in out.stderr
    # A user's suite file by path still works beside the bundled ones.
    (tmp_path / "mine.toml").write_text('[suite]\nname = "mine"\n[[trials]]\nname = "a"\nmodel = "mnist_base"\n')
    mine = subprocess.run([sys.executable, "-m", "raycnn.cli", "list", "mine.toml"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert mine.returncode == 0 and mine.stdout.splitlines()[1].startswith("mine/a\t"), mine.stderr
