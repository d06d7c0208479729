"""Ray stays in the Ray modules: importing every other raycnn module leaves `ray` unimported
(the CLI answers bad input before Ray starts, and trainer/models/data/results run without it)."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import raycnn

RAY_MODULES = {"raycnn.tune", "raycnn.trial", "raycnn.cluster", "raycnn.ray_trackers"}


def test_only_the_ray_modules_import_ray():
    modules = sorted(f"raycnn.{m.name}" for m in pkgutil.iter_modules(raycnn.__path__))
    others = [m for m in modules if m not in RAY_MODULES]
    assert {"raycnn.cli", "raycnn.errors", "raycnn.experiment", "raycnn.lock", "raycnn.provenance"} <= set(others)
    code = (f"import sys\nfor m in {others!r}: __import__(m)\n"
            "print('ray' in sys.modules, sorted(k for k in sys.modules if k.startswith('ray.'))[:5])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(raycnn.__path__[0]).parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False []", out.stdout
    # And the check itself sees Ray where it is imported.
    out = subprocess.run([sys.executable, "-c", "import sys, raycnn.cluster; print('ray' in sys.modules)"],
                         capture_output=True, text=True, timeout=300, cwd=Path(raycnn.__path__[0]).parent)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
