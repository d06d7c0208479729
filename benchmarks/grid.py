#!/usr/bin/env python3
"""Wall time of the report's weight-free grid (40 MNIST + 11 CIFAR-10 trials) at the report's
epochs on one machine, longest trials first, through Ray Tune.

    python benchmarks/grid.py [--device cpu|cuda] [--packing FILE | --per-device K] [--data-dir DIR]
                              [--run-dir DIR] [--out results/speed] [--filter GLOB ...]
                              [--synthetic] [--epochs N] [--max-train-samples N] [--num-cpus N]
    python benchmarks/grid.py --best-packing FILE      # prints "LABEL K": the best of packing.py's runs

The 8 trials of the pretrained suite need ImageNet weights, which an offline machine cannot
download: they are left out, with one line saying so. The order is the heaviest nets first (their
suite's GPU share, e.g. AlexNet and ResNet-18 at 0.5), then the most optimizer steps (epochs x
training images), so the long trials do not start last. Light trials (the smallest declared GPU
share) run K per GPU, K from --per-device or the packing with the most images/s in all in
--packing (benchmarks/packing.py's Parquet); heavier ones keep their suite's share. On the CPU
each trial takes its suite's cpus_per_trial and --num-cpus caps the concurrency.

The run folder (default results/grid-<device>) gets trials.parquet and epochs.parquet, rewritten as
trials finish, so a run cut short keeps every finished trial. OUT/grid-<device>.parquet gets one
row: grid_wall_s (Ray start-up and shutdown included), trials, ok (finished), per_device, label,
outcome (ok | errors | interrupted), epochs (0: the report's), max_train_samples, data,
created, and provenance. The exit status is `raycnn run`'s: 0 ok, 3 failed trials, 130 interrupted.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a checkout that is not installed

from raycnn import config
from raycnn import results, suites
from raycnn import tune as raytune
from raycnn.provenance import provenance
from raycnn.errors import EXIT
from throughput import device_slug, note, open_device

SUITES = ("mnist", "cifar10")
SKIPPED = {"pretrained": "needs ImageNet weights, which an offline machine cannot download"}


def best_packing(path: str | None) -> tuple[str, int]:
    """(label, k) of packing.py's run with the most images/s in all; ("plain", 1) without one."""
    if not path or not Path(path).is_file():
        return "plain", 1
    df = pd.read_parquet(path)
    total = df[df["measure"] == "total_images_per_s"]
    if total.empty:
        return "plain", 1
    best = total.loc[total["value"].idxmax()]
    return str(best["label"]), int(best["concurrency"])


def steps(t: suites.Trial) -> int:
    """Optimizer steps of the trial at its epochs (the order's second key)."""
    n = t.config.max_train_samples or config.SIZES[t.config.dataset_name][0]
    return t.config.epochs * -(-n // t.config.batch_size)


def trials(args, per_device: int) -> list[suites.Trial]:
    """The grid's trials with the overrides and shares, longest first."""
    out = []
    for name in SUITES:
        out += suites.load(suites.bundled()[name]).trials
    if args.filter:
        out = [t for t in out if any(fnmatch.fnmatch(t.name, f) for f in args.filter)]
    overrides = {k: v for k, v in (("epochs", args.epochs), ("max_train_samples", args.max_train_samples)) if v}
    overrides |= dict(synthetic=args.synthetic, data_dir=str(Path(args.data_dir).resolve()))
    out = [suites.with_overrides(t, **overrides) for t in out]
    light = min((t.gpus_per_trial for t in out), default=0.0)
    out = [replace(t, gpus_per_trial=1 / per_device) if t.gpus_per_trial <= light else t for t in out]
    return sorted(out, key=lambda t: (-t.gpus_per_trial, -steps(t), t.order))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--packing", help="benchmarks/packing.py's Parquet: light trials at its best k")
    p.add_argument("--per-device", type=int, help="light trials per GPU (overrides --packing)")
    p.add_argument("--best-packing", metavar="FILE", help="print the best packing of FILE as 'LABEL K' and exit")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--run-dir", help="the run folder (default results/grid-<device>)")
    p.add_argument("--out", default="results/speed", help="folder for grid-<device>.parquet")
    p.add_argument("--filter", action="append", help="only trials whose name matches (repeatable)")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--epochs", type=int, default=0, help="override the report's epochs (0: keep them)")
    p.add_argument("--max-train-samples", type=int, default=0)
    p.add_argument("--num-cpus", type=int, help="CPUs to declare to Ray (default: all)")
    p.add_argument("--max-failures", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.best_packing:
        print(*best_packing(args.best_packing))
        return 0
    device = open_device(args.device, "grid")
    if device is None:
        return 2
    slug, name = device_slug(device)
    label, k = best_packing(args.packing)
    k = args.per_device or k
    todo = trials(args, k)
    for suite, why in SKIPPED.items():
        print(f"grid: the {len(suites.load(suites.bundled()[suite]).trials)} {suite} trials are left out: {why}")
    run_dir = Path(args.run_dir or f"results/grid-{slug}").resolve()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    opts = raytune.RunOptions(run_dir=run_dir, max_failures=args.max_failures, num_cpus=args.num_cpus,
                              num_gpus=gpus)
    note(f"grid: {len(todo)} trials on {name}, light ones {k} per GPU ({label}), into {run_dir}; first: "
         f"{todo[0].name if todo else '-'}")
    start = time.perf_counter()
    outcome = raytune.run_trials(todo, opts)
    wall = time.perf_counter() - start
    trial_rows, _ = results.load_run(run_dir) if (run_dir / "trials.parquet").is_file() else (pd.DataFrame(), None)
    ok = int((trial_rows["status"] == "ok").sum()) if len(trial_rows) else 0
    row = dict(device=slug, device_name=name, measure="grid_wall_s", value=wall, trials=len(todo), ok=ok,
               per_device=k, label=label, outcome=outcome, epochs=args.epochs,
               max_train_samples=args.max_train_samples, data="synthetic" if args.synthetic else "real",
               run_dir=str(run_dir), created=time.strftime("%Y-%m-%dT%H:%M:%S"), **provenance())
    results.write_parquet([row], Path(args.out) / f"grid-{slug}.parquet")
    note(f"grid: {outcome}, {ok} of {len(todo)} trials ok in {wall:.0f} s")
    return EXIT[outcome]


if __name__ == "__main__":
    sys.exit(main())
