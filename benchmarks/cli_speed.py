#!/usr/bin/env python3
"""How fast the command line answers: `raycnn --help`, `list`, `list SUITE`, `table` and
`compare` over the published runs, each against a bare `python -c pass` in the same run.

    python benchmarks/cli_speed.py [--reps 7] [--out results/speed]

Every command runs as a user runs it (a fresh interpreter, output to a pipe), the variants
alternate within each repetition, and the medians are printed with the command's time over
the bare interpreter's. The target is at most 0.5 s over it for --help, list and table.
Rows go to OUT/cli.parquet (with provenance and the load average).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ["results/cifar10-handbuilt-30ep", "results/cifar10-repeats-30ep", "results/mnist-all-1ep"]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "raycnn --help": [sys.executable, "-m", "raycnn.cli", "--help"],
    "raycnn list": [sys.executable, "-m", "raycnn.cli", "list"],
    "raycnn list mnist": [sys.executable, "-m", "raycnn.cli", "list", "mnist"],
    "raycnn table (3 published runs)": [sys.executable, "-m", "raycnn.cli", "table", *PUBLISHED],
    "raycnn compare": [sys.executable, "-m", "raycnn.cli", "compare", *PUBLISHED[:2]],
}
TARGET_S = 0.5
TARGETED = ("raycnn --help", "raycnn list", "raycnn table (3 published runs)")


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cli_speed: {' '.join(argv[2:])} failed: {done.stderr.decode()[-500:]}")
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "results" / "speed"))
    args = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for name, argv in COMMANDS.items():          # warm the file cache once
        timed(argv)
    for _ in range(args.reps):
        for name, argv in COMMANDS.items():
            times[name].append(timed(argv))
    bare = statistics.median(times["python -c pass"])
    load = os.getloadavg()
    print(f"median of {args.reps}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'command':34} {'median s':>9} {'over bare s':>12}  target")
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        over = median - bare
        verdict = ("met" if over <= TARGET_S else "MISSED") if name in TARGETED else ""
        print(f"{name:34} {median:9.3f} {over:12.3f}  {verdict}")
        rows.append({"command": name, "median_s": median, "over_bare_s": over, "min_s": min(values),
                     "max_s": max(values), "reps": args.reps, "load_1m": load[0]})
    sys.path.insert(0, str(ROOT))
    from raycnn import results
    from raycnn.provenance import revision
    import platform
    stamp = {"git_rev": revision(), "python_version": platform.python_version(), "cpus": os.cpu_count()}
    results.write_parquet([r | stamp for r in rows], Path(args.out) / "cli.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
