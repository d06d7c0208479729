#!/usr/bin/env python3
"""Total training images/s of one device at 1, 2, 4, 8 trials packed on it, through Ray Tune.

    python benchmarks/packing.py [--device cpu|cuda] [--concurrency 1,2,4,8] [--data-dir DIR]
                                 [--trial-images N] [--epochs N] [--label plain|mps] [--synthetic]
                                 [--out results/speed] [--keep-runs DIR]

For each k a private local Ray runs k repeats of the short trial `cifar10/base/no-scheduler`
(one cpus_per_trial each; on CUDA gpus_per_trial = 1/k, so all k share one GPU; on the CPU k
CPUs are declared) on the first --trial-images real training images. Each trial reports its
training images/s per epoch while sharing the device; the figure of a packing is
k x the mean images/s of the trials' last epoch (the first one carries warm-up), against k = 1.
The wall time of each run (Ray start-up included) is recorded too.

`--label mps` tags the rows of a run made with CUDA MPS on (started outside, before Ray);
benchmarks/gpu_check.sh does that where `nvidia-cuda-mps-control` exists.

Rows go to OUT/packing-<device>.parquet, rewritten after each k, and appended to the rows of
the other --label already there: device, device_name, measure (trial_images_per_s: a trial's
mean images/s; total_images_per_s: k x that; suite_wall_s), label, concurrency, gpus_per_trial,
value, ratio (total and trial figures: against k = 1 of the same label), trials, images, epochs,
model, data, created, load_1min, and provenance (git_rev, versions).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a checkout that is not installed

from rich.console import Console
from rich.table import Table

from raycnn import results, suites
from raycnn import tune as raytune
from raycnn.provenance import provenance
from throughput import device_slug, note, open_device

console = Console()
TRIAL = "cifar10/base/no-scheduler"
IMAGES = {"cpu": 2048, "cuda": 12800}


def trial(args) -> suites.Trial:
    """The short trial: cifar10's base net on args.trial_images images, args.epochs epochs."""
    suite = suites.load(suites.bundled()["cifar10"])
    t = next(t for t in suite.trials if t.name == TRIAL)
    return suites.with_overrides(t, epochs=args.epochs, max_train_samples=args.trial_images,
                                 synthetic=args.synthetic, data_dir=str(Path(args.data_dir).resolve()))


def options(run_dir: Path, device: torch.device, k: int, max_k: int) -> raytune.RunOptions:
    """A private local Ray running k repeats at once: on CUDA 1/k GPU each, on the CPU k CPUs."""
    cuda = device.type == "cuda"
    return raytune.RunOptions(
        run_dir=run_dir, cpus_per_trial=1, max_concurrent=k, repeats=k, max_failures=0,
        num_cpus=max(os.cpu_count() or 1, max_k) if cuda else max_k,
        num_gpus=torch.cuda.device_count() if cuda else 0, gpus_per_trial=1 / k if cuda else None)


def measure(t: suites.Trial, opts: raytune.RunOptions) -> tuple[float, float]:
    """(wall seconds of the run, mean images/s of its trials' last epoch)."""
    start = time.perf_counter()
    outcome = raytune.run_trials([t], opts)
    wall = time.perf_counter() - start
    if outcome != "ok":
        raise RuntimeError(f"packing run ended {outcome}; see {opts.run_dir}")
    _, epochs = results.load_run(opts.run_dir)
    last = epochs[epochs["epoch"] == epochs.groupby("repeat")["epoch"].transform("max")]
    return wall, float(last["images_per_s"].mean())


def table(rows: list[dict]) -> Table:
    out = Table("label", "trials per device", "GPU per trial", "img/s per trial", "img/s in all", "vs 1", "wall s",
                title=f"Packing: {TRIAL}, k trials at once on one device")
    value = {(r["label"], r["concurrency"], r["measure"]): r for r in rows}
    for (label, k, m), r in value.items():
        if m == "total_images_per_s":
            out.add_row(label, str(k), f"{r['gpus_per_trial']:.3g}" if r["gpus_per_trial"] else "-",
                        f"{value[(label, k, 'trial_images_per_s')]['value']:.0f}", f"{r['value']:.0f}",
                        f"{r['ratio']:.2f}x", f"{value[(label, k, 'suite_wall_s')]['value']:.1f}")
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--concurrency", default="", help="comma-separated k (default: CPU 1,2; CUDA 1,2,4,8)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--synthetic", action="store_true", help="synthetic images of CIFAR-10's shape")
    p.add_argument("--trial-images", type=int, help="training images per trial (default: CPU 2048, CUDA 12800)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial; the last one is measured (default 2)")
    p.add_argument("--label", default="plain", help="tag of this run's rows, e.g. mps (default plain)")
    p.add_argument("--out", default="results/speed", help="folder for packing-<device>.parquet")
    p.add_argument("--keep-runs", help="keep the Ray run folders here (default: a temporary folder)")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(k) for k in (args.concurrency or ("1,2,4,8" if args.device == "cuda" else "1,2")).split(",")]
    except ValueError:
        p.error(f"--concurrency takes comma-separated integers, got {args.concurrency!r}")
    if min(args.concurrency) < 1 or args.epochs < 1:
        p.error("--concurrency and --epochs must be positive")
    args.trial_images = args.trial_images or IMAGES[args.device]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = open_device(args.device, "packing")
    if device is None:
        return 2
    slug, name = device_slug(device)
    path = Path(args.out) / f"packing-{slug}.parquet"
    earlier = pd.read_parquet(path) if path.is_file() else pd.DataFrame({"label": []})
    earlier = earlier[earlier["label"] != args.label].to_dict("records")
    t = trial(args)
    runs = Path(args.keep_runs or tempfile.mkdtemp(prefix="raycnn-packing-")).resolve()
    base = dict(device=slug, device_name=name, label=args.label, model=t.config.model, images=args.trial_images,
                epochs=args.epochs, data="synthetic" if args.synthetic else "real",
                created=time.strftime("%Y-%m-%dT%H:%M:%S"), **provenance())
    rows, per_trial = [], {}
    try:
        for k in args.concurrency:
            note(f"packing: {k} trial(s) at once, load {os.getloadavg()[0]:.1f}")
            opts = options(runs / f"{args.label}-k{k}", device, k, max(args.concurrency))
            wall, per_trial[k] = measure(t, opts)
            one = per_trial[args.concurrency[0]]
            at_k = base | dict(concurrency=k, trials=k, gpus_per_trial=opts.gpus_per_trial or 0.0,
                               load_1min=os.getloadavg()[0])
            rows += [at_k | dict(measure="trial_images_per_s", value=per_trial[k], ratio=per_trial[k] / one),
                     at_k | dict(measure="total_images_per_s", value=k * per_trial[k], ratio=k * per_trial[k] / one),
                     at_k | dict(measure="suite_wall_s", value=wall, ratio=float("nan"))]
            results.write_parquet(earlier + rows, path)
    finally:
        if not args.keep_runs:
            shutil.rmtree(runs, ignore_errors=True)
    console.print(table(rows))
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
