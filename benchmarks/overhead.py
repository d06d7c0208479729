#!/usr/bin/env python3
"""Ray's cost per trial: N short trials through `raycnn.tune.run_trials` (a private local Ray,
one trial at a time, as `raycnn run` runs them) against the same `raycnn.trainer.fit` calls in
this process, in the same run.

    python benchmarks/overhead.py [--trials N] [--images N] [--epochs N] [--out DIR]

Prints where Ray's time goes (per trial, from run_trials' phase timings and the seconds each
trial reported to Tune), the overhead per trial beyond Ray's start-up and shutdown, and its
ratio to the in-process trial; and the size and save time of an epoch checkpoint, for the
trial's model (as Tune stored it) and for every model of the bundled suites.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a checkout that is not installed

from rich.console import Console
from rich.table import Table

from raycnn import models, suites
from raycnn import tune as raytune
from raycnn.experiment import experiment_dir
from raycnn.datafiles import load as load_arrays
from raycnn.trainer import fit

console = Console()
TRIAL = "cifar10/base/no-scheduler"


def short_trial(images: int, epochs: int) -> suites.Trial:
    """cifar10's base net on `images` synthetic training images, one CPU thread."""
    suite = suites.load(suites.bundled()["cifar10"])
    trial = next(t for t in suite.trials if t.name == TRIAL)
    return suites.with_overrides(trial, epochs=epochs, max_train_samples=images, synthetic=True)


def in_process(trial: suites.Trial, n: int) -> dict:
    """Seconds to read the data once and fit the trial n times here (seeds + r, as Ray's repeats)."""
    start = time.perf_counter()
    arrays = load_arrays(trial.config)
    read = time.perf_counter() - start
    epochs = 0.0
    for r in range(n):
        # num_threads=1: what placement gives a trial of cpus_per_trial = 1
        epochs += fit(replace(trial.config, seed=trial.config.seed + r, num_threads=1), arrays=arrays)["train_seconds"]
    return {"wall": time.perf_counter() - start, "read data": read, "epochs": epochs}


class Clock:
    """A live view that only notes when Tune started and when the first trial began running."""

    def __init__(self):
        self.started = self.first_running = None

    def start(self, params: list[dict]) -> None:
        self.started = time.perf_counter()

    def update(self, meta: dict, result: dict) -> None:
        if result.get("status") == "running" and self.first_running is None:
            self.first_running = time.perf_counter()

    def stop(self) -> None:
        pass


def through_ray(trial: suites.Trial, n: int, run_dir: Path) -> tuple[float, dict, list[dict]]:
    """Wall seconds of run_trials, its phase timings (plus the wait for the first trial: Tune's
    set-up and the cold start of its worker process) and each trial's reports to Tune."""
    opts = raytune.RunOptions(run_dir=run_dir, cpus_per_trial=1, max_concurrent=1, repeats=n, max_failures=0,
                              num_cpus=1, num_gpus=0)
    clock = Clock()
    start = time.perf_counter()
    outcome = raytune.run_trials([trial], opts, view=clock)
    wall = time.perf_counter() - start
    opts.timings["first trial start"] = clock.first_running - clock.started
    if outcome != "ok":
        raise SystemExit(f"the Ray run ended {outcome}; see {run_dir}")
    reports = []
    for log in sorted(experiment_dir(run_dir).glob("0*/result.json")):
        reports.append([json.loads(line) for line in log.read_text().splitlines() if line.strip()])
    return wall, opts.timings, reports


def checkpoint_cost(name: str) -> tuple[float, float]:
    """(MB, seconds) of torch.save of a model's weights and SGD-momentum state: what an epoch
    checkpoint holds, written to this machine's temp folder."""
    model = models.build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.pt"
        start = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        os.sync()
        seconds = time.perf_counter() - start
        return path.stat().st_size / 2**20, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--images", type=int, default=512, help="training images per trial")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", help="keep the Ray run folder here (default: a temp folder)")
    args = ap.parse_args()
    trial, n = short_trial(args.images, args.epochs), args.trials

    here = in_process(trial, n)
    with tempfile.TemporaryDirectory(prefix="raycnn-overhead-") as tmp:
        run_dir = Path(args.out or tmp).resolve() / "overhead"
        wall, timings, reports = through_ray(trial, n, run_dir)
        ckpt_mb = [p.stat().st_size / 2**20 for p in experiment_dir(run_dir).glob("0*/checkpoint_*/state.pt")]

    trained = sum(r["time_total_s"] for t in reports for r in t[-1:])     # inside the trial actors
    epochs = sum(r["seconds"] for t in reports for r in t)                # train + eval, as in-process
    startup, shutdown = timings.get("ray start-up", 0.0), timings.get("ray shutdown", 0.0)
    first = timings["first trial start"]
    beyond = (wall - here["wall"] - startup - shutdown) / n
    marginal = (wall - here["wall"] - startup - shutdown - first) / n
    table = Table("where Ray's time goes", "seconds", "per trial", title=f"{n} trials of {TRIAL}, "
                  f"{args.images} images x {args.epochs} epoch(s), one at a time, 1 CPU")
    rows = [("in-process: read data + fit x N", here["wall"]),
            ("  of which train + eval epochs", here["epochs"]),
            ("Ray: run_trials, all of it", wall),
            ("  read data (driver)", timings.get("read data", 0.0)),
            ("  ray start-up (ray.init)", startup),
            ("  tune: Tuner.fit", timings.get("tune", 0.0)),
            ("    first trial start (Tune set-up, worker process: import ray, torch)", first),
            ("    inside the trials (trainable)", trained),
            ("      of which train + eval epochs", epochs),
            ("      of which the rest (build, checkpoints, reports)", trained - epochs),
            ("    the rest (scheduling, results, syncs between trials)", timings.get("tune", 0.0) - trained - first),
            ("  ray shutdown", shutdown),
            ("  write results (Parquet)", timings.get("write results", 0.0))]
    for label, s in rows:
        table.add_row(label, f"{s:.2f}", f"{s / n:.2f}")
    console.print(table)
    console.print(f"Ray overhead per trial beyond ray.init and shutdown: {beyond:.2f} s (the first trial's "
                  f"worker start spread over {n} trials)")
    console.print(f"Ray overhead per trial beyond start-up (ray.init, first worker) and shutdown: {marginal:.2f} s; "
                  f"in-process trial {here['wall'] / n:.2f} s; ratio Ray/in-process per trial "
                  f"{(here['wall'] / n + marginal) / (here['wall'] / n):.2f}")
    console.print(f"checkpoint of the trial's model as Tune stored it: {max(ckpt_mb, default=0):.2f} MB per epoch")

    ck = Table("model", "checkpoint MB", "save s per epoch", title="epoch checkpoint (weights + SGD momentum)")
    names = sorted({t.config.model for p in suites.bundled().values() for t in suites.load(p).trials})
    for name in names:
        mb, s = checkpoint_cost(name)
        ck.add_row(name, f"{mb:.1f}", f"{s:.2f}")
    console.print(ck)


if __name__ == "__main__":
    main()
