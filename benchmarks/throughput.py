#!/usr/bin/env python3
"""Speed of the raycnn trainer and of running it under Ray Tune, on one device.

    python benchmarks/speed.py [--device cpu|cuda] [--reps N] [--quick] [--data-dir DIR]
                               [--out results/speed] [--threads N] [--keep-runs DIR]

Three measurements, printed as rich tables and written to OUT/<device>.parquet (`cpu`, or a slug
of the GPU's name), rewritten atomically after each part so a run cut short keeps what it measured:

1. Training images/s of `mnist_base`, `cifar_base` (RandomCrop(32, padding=10) + flip, as in sec.
   4.2) and `resnet18` (crop padding 4 + flip, as in sec. 5): the raycnn trainer (`build_training` +
   `train_one_epoch`) against the loop a report author writes (a torchvision-style Dataset
   returning PIL-transformed samples, `DataLoader(batch_size=64, shuffle=True)`, fp32,
   `loss.item()` every step). Same images, batch, SGD(lr 0.01, momentum 0.9) and torch threads;
   the two alternate in one process over --reps repetitions after a warm-up pass of each.
2. Ray's overhead per trial: N short cifar_base trials through `raycnn.tune.run` (a private local
   Ray, one trial at a time) against the same `raycnn.trainer.fit` calls run in this process;
   Ray's start-up and shutdown are timed inside each Ray run and also reported apart.
3. The wall time of those N trials at 1, 2, 4 (CUDA: 1, 2, 4, 8 packed on one GPU, gpus_per_trial
   = 1/k) concurrent trials, and the speed-up against one at a time; and the training images/s
   each trial saw there (short trials are dominated by start-up; this is the packing's throughput).

Parquet columns, one row per number: device, device_name, measure (train_images_per_s;
suite_wall_s, trial_images_per_s, ray_startup_s, ray_shutdown_s; ray_overhead_s_per_trial), model,
variant (naive, raycnn, raycnn-fp32 on CUDA; in-process, concurrency k; ray, ray-excl-startup),
value, rep, ratio (train_images_per_s: raycnn/naive of the same repetition; suite_wall_s:
wall(1)/wall(k); trial_images_per_s: k x images/s(k) / images/s(1), the device's throughput
at packing k against one trial alone), images, batch_size, threads, num_workers, precision, trials, concurrency,
gpus_per_trial, data (real | synthetic), quick, reps, created, and provenance: git_rev,
torch_version, torchvision_version, ray_version, python_version.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a checkout that is not installed

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raycnn import data as data_mod
from raycnn import models, results, suites
from raycnn import tune as raytune
from raycnn.trainer import TrainConfig, build_training, fit, load_arrays, resolve_precision, train_one_epoch

console = Console()
log = Console(stderr=True)
T0 = time.perf_counter()


def note(message: str) -> None:
    """A progress line on stderr, with the seconds since start."""
    log.print(f"[{time.perf_counter() - T0:5.0f}s] {message}", markup=False, highlight=False)


BATCH = 64
# Per model: the report's training transforms, as TrainConfig fields.
CASES = {
    "mnist_base": {},
    "cifar_base": {"augment": ("crop", "flip"), "crop_padding": 10},   # sec. 4.2: padding = 10
    "resnet18": {"augment": ("crop", "flip"), "crop_padding": 4},      # sec. 5's training transforms
}
SUITE_TRIAL = "cifar10/base/no-scheduler"    # the short trial of parts 2 and 3


@dataclass(frozen=True)
class Plan:
    """How much to measure: sized so the default finishes in minutes on 2 CPU cores."""
    images: dict[str, int]          # training images per timed pass, per model (multiples of 64)
    reps: int
    trials: int                     # N short trials of parts 2 and 3
    trial_images: int               # training images per short trial (0: the whole split)
    concurrency: tuple[int, ...]
    num_workers: int                # the naive DataLoader's worker processes


def make_plan(device: str, quick: bool, reps: int | None) -> Plan:
    """Sizes for `device` (cpu | cuda), shrunk by `quick` to well under a minute in all."""
    if quick:
        return Plan({"mnist_base": 128, "cifar_base": 256, "resnet18": 64}, reps or 1, 2, 128, (1, 2),
                    0 if device == "cpu" else 2)
    if device == "cpu":
        # num_workers=0: on 2 cores a worker process would only compete with the training thread.
        return Plan({"mnist_base": 1024, "cifar_base": 4096, "resnet18": 384}, reps or 3, 4, 512, (1, 2, 4), 0)
    # num_workers=2: the value of torchvision's CIFAR-10 tutorial, which report notebooks copy.
    # Trials of 12800 images: seconds each on a GPU, so packed trials overlap past their start-up.
    return Plan({"mnist_base": 8192, "cifar_base": 8192, "resnet18": 4096}, reps or 3, 8, 12800,
                (1, 2, 4, 8), 2)


def device_slug(device: torch.device) -> tuple[str, str]:
    """(file stem, readable name): `cpu`, or the GPU's name as a slug, e.g. nvidia-h100-80gb-hbm3."""
    if device.type != "cuda":
        return "cpu", platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer brackets only what it means to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- 1. images/s

def dataset_arrays(name: str, n: int, data_dir: str | None) -> tuple[data_mod.Arrays, str]:
    """The first `n` training images of `name`: real when readable under data_dir, else synthetic
    (throughput does not depend on the pixels)."""
    if data_dir:
        try:
            return data_mod.subset(data_mod.read(name, data_dir, download=False), n), "real"
        except data_mod.DataError:
            note(f"{name}: no data under {data_dir}; timing synthetic images")
    return data_mod.synthetic(name, sizes=(n, BATCH)), "synthetic"


class NaiveDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10/MNIST datasets do per sample: a uint8 array becomes a PIL
    image, which goes through the transform; the label becomes a Python int."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: Callable):
        # torchvision keeps CIFAR-10 as (N, H, W, C) and MNIST as (N, H, W): PIL's layouts.
        self.x = np.ascontiguousarray(x.transpose(0, 2, 3, 1) if x.shape[1] == 3 else x[:, 0])
        self.y, self.transform = y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def naive_transform(dataset: str, case: dict):
    """transforms.Compose([RandomCrop, RandomHorizontalFlip,] ToTensor(), Normalize(...))."""
    from torchvision import transforms as T
    mean, std = data_mod.STATS[dataset]
    ops = []
    if "crop" in case.get("augment", ()):
        ops.append(T.RandomCrop(data_mod.SHAPES[dataset][-1], padding=case["crop_padding"]))
    if "flip" in case.get("augment", ()):
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def naive_timer(name: str, arrays: data_mod.Arrays, device: torch.device, workers: int) -> Callable[[], float]:
    """A function that trains one pass the notebook way and returns its images/s."""
    dataset = models.MODELS[name].dataset
    torch.manual_seed(0)
    model = models.build(name).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        NaiveDataset(arrays.train_x, arrays.train_y, naive_transform(dataset, CASES[name])),
        batch_size=BATCH, shuffle=True, num_workers=workers)

    def one_pass() -> float:
        model.train()
        sync(device)
        start, n = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            loss.item()      # notebooks log the running loss: a host sync every step
            n += len(y)
        return n / (time.perf_counter() - start)

    def as_a_notebook() -> float:
        # cuDNN autotuning is a process-wide switch that raycnn's build_training turns on; a notebook
        # leaves it at torch's default, off.
        flag, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        try:
            return one_pass()
        finally:
            torch.backends.cudnn.benchmark = flag
    return as_a_notebook


def raycnn_timer(name: str, arrays: data_mod.Arrays, device: torch.device, threads: int,
                 precision: str) -> Callable[[], float]:
    """A function that trains one pass with the raycnn trainer and returns its images/s."""
    config = TrainConfig(model=name, epochs=1, batch_size=BATCH, optimizer="sgd", lr=0.01, momentum=0.9,
                         precision=precision, device=str(device), num_threads=threads, **CASES[name]).validate()
    run = build_training(config, arrays)

    def one_pass() -> float:
        sync(device)
        start = time.perf_counter()
        train_one_epoch(run)             # ends with the epoch's one sync
        return len(arrays.train_y) / (time.perf_counter() - start)
    return one_pass


def time_model(name: str, plan: Plan, device: torch.device, threads: int, data_dir: str | None,
               base: dict) -> list[dict]:
    """Images/s rows of `name`: naive and raycnn alternating over plan.reps, after a warm-up."""
    arrays, source = dataset_arrays(models.MODELS[name].dataset, plan.images[name], data_dir)
    timers = {"naive": naive_timer(name, arrays, device, plan.num_workers),
              "raycnn": raycnn_timer(name, arrays, device, threads, "auto")}
    if device.type == "cuda":    # the trainer's default there is bf16; fp32 separates precision from the rest
        timers["raycnn-fp32"] = raycnn_timer(name, arrays, device, threads, "fp32")
    for timer in timers.values():
        timer()                  # warm-up: allocator, cuDNN autotuning, first-call dispatch
    rows = []
    for rep in range(plan.reps):
        # Who goes first alternates, so a drift in the machine's load hits both variants alike.
        order = list(timers) if rep % 2 == 0 else list(reversed(timers))
        ips = {variant: timers[variant]() for variant in order}
        for variant in timers:
            precision = "fp32" if variant != "raycnn" else _precision(device)
            rows.append(base | dict(
                measure="train_images_per_s", model=name, variant=variant, value=ips[variant], rep=rep,
                ratio=ips[variant] / ips["naive"] if variant != "naive" else float("nan"),
                images=len(arrays.train_y), num_workers=plan.num_workers if variant == "naive" else 0,
                precision=precision, data=source))
    return rows


def _precision(device: torch.device) -> str:
    return resolve_precision("auto", device)


# ---------------------------------------------------------------- 2 and 3. Ray

def suite_trial(plan: Plan) -> suites.Trial:
    """The short trial: cifar10's base net, one epoch on plan.trial_images synthetic images."""
    suite = suites.load(suites.bundled()["cifar10"])
    trial = next(t for t in suite.trials if t.name == SUITE_TRIAL)
    return suites.with_overrides(trial, epochs=1, max_train_samples=plan.trial_images, synthetic=True)


def in_process_wall(trial: suites.Trial, n: int) -> float:
    """Seconds to read the data once and fit the trial n times (seeds + r, as Ray's repeats), here."""
    start = time.perf_counter()
    arrays = load_arrays(trial.config)
    for r in range(n):
        # num_threads=1: what raycnn.tune gives a trial of cpus_per_trial = 1
        fit(replace(trial.config, seed=trial.config.seed + r, num_threads=1), arrays=arrays)
    return time.perf_counter() - start


def ray_options(run_dir: Path, device: torch.device, k: int, n: int, max_k: int) -> raytune.RunOptions:
    """A private local Ray running n repeats of the trial, k at a time (on CUDA: 1/k GPU each)."""
    cuda = device.type == "cuda"
    return raytune.RunOptions(
        run_dir=run_dir, cpus_per_trial=1, max_concurrent=k, repeats=n, max_failures=0, live=False,
        # CPU: declare max_k CPUs so Ray's resources never cap the concurrency; the cores may.
        num_cpus=max(os.cpu_count() or 1, max_k) if cuda else max_k,
        num_gpus=torch.cuda.device_count() if cuda else 0,
        gpus_per_trial=1 / k if cuda else None)


@contextmanager
def timed(owner: object, attr: str, seconds: list[float]):
    """Within the block, every call of owner.attr appends its duration to `seconds`.

    raycnn.tune.run starts and stops Ray inside; wrapping its `connect` and `ray.shutdown`
    times them within the very run they belong to, without an extra Ray start to measure."""
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)
    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def ray_wall(trial: suites.Trial, opts: raytune.RunOptions) -> tuple[float, float, float]:
    """Seconds for raycnn.tune.run of the trial's repeats (data, start-up, trials, shutdown and
    results), and of its Ray start-up and shutdown alone."""
    import ray
    up, down = [], []
    with timed(raytune, "connect", up), timed(ray, "shutdown", down):
        start = time.perf_counter()
        outcome = raytune.run([trial], opts)
        wall = time.perf_counter() - start
    if outcome != "ok":
        raise RuntimeError(f"Ray suite ended {outcome}; see {opts.run_dir}")
    return wall, sum(up), sum(down)


def trial_images_per_s(run_dir: Path) -> float:
    """Mean training images/s of a run's trials, as each measured it while sharing the device:
    throughput at that packing, free of the per-trial start-up that dominates short trials."""
    _, epochs = results.load_run(run_dir)
    return float(epochs["images_per_s"].mean())


def time_suites(plan: Plan, device: torch.device, runs_dir: Path, base: dict,
                save: Callable[[list[dict]], None]) -> list[dict]:
    """Rows of parts 2 and 3; `save` gets the rows so far after each measurement."""
    trial, n, max_k = suite_trial(plan), plan.trials, max(plan.concurrency)
    common = base | dict(model=trial.config.model, trials=n, images=plan.trial_images or
                         data_mod.SIZES["cifar10"][0], rep=0, precision=_precision(device))
    note(f"in-process: {n} trials")
    inproc = in_process_wall(trial, n)
    rows = [common | dict(measure="suite_wall_s", variant="in-process", value=inproc, concurrency=1)]
    walls, ips = {}, {}
    # k = 1 first (part 2 needs it), then the most packed, whose answer matters most on a GPU.
    for k in plan.concurrency[:1] + tuple(sorted(plan.concurrency[1:], reverse=True)):
        note(f"Ray: {n} trials, {k} at a time")
        opts = ray_options(runs_dir / f"ray-k{k}", device, k, n, max_k)
        walls[k], up, down = ray_wall(trial, opts)
        ips[k] = trial_images_per_s(opts.run_dir)
        at_k = common | dict(variant=f"concurrency {k}", concurrency=k, gpus_per_trial=opts.gpus_per_trial or 0.0)
        rows += [at_k | dict(measure="suite_wall_s", value=walls[k], ratio=walls[plan.concurrency[0]] / walls[k]),
                 at_k | dict(measure="trial_images_per_s", value=ips[k], ratio=k * ips[k] / ips[plan.concurrency[0]]),
                 at_k | dict(measure="ray_startup_s", value=up),
                 at_k | dict(measure="ray_shutdown_s", value=down)]
        if k == 1:
            per_trial = (walls[1] - inproc) / n
            rows += [common | dict(measure="ray_overhead_s_per_trial", variant="ray", value=per_trial),
                     common | dict(measure="ray_overhead_s_per_trial", variant="ray-excl-startup",
                                   value=per_trial - (up + down) / n)]
        save(rows)
    return rows


# ---------------------------------------------------------------- tables

def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """median [min–max] of the repetitions."""
    values = sorted(values)
    mid = fmt.format(statistics.median(values))
    return mid if len(values) == 1 else f"{mid} [{fmt.format(values[0])}–{fmt.format(values[-1])}]"


def throughput_table(rows: list[dict]) -> Table:
    """Per model: images/s of each variant and raycnn/naive, median [min–max] over repetitions."""
    rows = [r for r in rows if r["measure"] == "train_images_per_s"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    first = rows[0]
    table = Table("model", "images", "data", *[f"{v} img/s" for v in variants],
                  *[f"{v}/naive" for v in variants if v != "naive"],
                  title=escape(f"Training images/s on {first['device_name']} ({first['threads']} torch thread(s), "
                               f"naive DataLoader num_workers={first['num_workers']}), median [min–max] of "
                               f"{first['reps']} reps, batch {BATCH}"))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        by = {v: [r for r in mine if r["variant"] == v] for v in variants}
        table.add_row(model, str(mine[0]["images"]), mine[0]["data"], *[spread([r["value"] for r in by[v]]) for v in variants],
                      *[spread([r["ratio"] for r in by[v]], "{:.2f}") for v in variants if v != "naive"])
    return table


def ray_table(rows: list[dict]) -> Table:
    """Per concurrency: the suite's wall time, speed-up, and Ray's start-up and shutdown in it;
    then the in-process wall time and Ray's overhead per trial."""
    value = {(r["measure"], r["variant"]): r["value"] for r in rows}
    first = rows[0]
    table = Table("run", "GPU per trial", "wall s", "speed-up vs 1", "img/s per trial", "img/s in all, vs 1",
                  "Ray start-up s", "Ray shutdown s",
                  title=escape(f"Ray Tune: {first['trials']} trials of {SUITE_TRIAL}, 1 epoch on "
                               f"{first['images']} synthetic images each"),
                  caption=escape(f"in-process (the same fit calls, one after another): "
                                 f"{value[('suite_wall_s', 'in-process')]:.2f} s; Ray's overhead per trial: "
                                 f"{value[('ray_overhead_s_per_trial', 'ray')]:.2f} s, of which not start-up "
                                 f"or shutdown: {value[('ray_overhead_s_per_trial', 'ray-excl-startup')]:.2f} s"))
    for r in sorted(rows, key=lambda r: r["concurrency"]):
        if r["measure"] == "suite_wall_s" and r["variant"] != "in-process":
            v = r["variant"]
            ips = next(x for x in rows if x["measure"] == "trial_images_per_s" and x["variant"] == v)
            table.add_row(f"{r['concurrency']} at a time", f"{r['gpus_per_trial']:.3g}" if r["gpus_per_trial"] else "-",
                          f"{r['value']:.2f}", f"{r['ratio']:.2f}x", f"{ips['value']:.0f}", f"{ips['ratio']:.2f}x",
                          f"{value[('ray_startup_s', v)]:.2f}", f"{value[('ray_shutdown_s', v)]:.2f}")
    return table


# ---------------------------------------------------------------- main

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reps", type=int, help="timed repetitions per model (default: 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the whole script in well under a minute")
    p.add_argument("--data-dir", default="data", help="real MNIST/CIFAR-10 here if present, else synthetic")
    p.add_argument("--out", default="results/speed", help="folder for <device>.parquet")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both loops (default 1)")
    p.add_argument("--keep-runs", help="keep the Ray run folders here (default: a temporary folder)")
    p.add_argument("--skip-ray", action="store_true", help="only part 1 (images/s)")
    return p.parse_args(argv)


def base_row(args, device: torch.device, plan: Plan) -> dict:
    """The columns every row shares (and the ones only some rows fill, so all rows have all)."""
    slug, name = device_slug(device)
    return dict(device=slug, device_name=name, measure="", model="", variant="", value=float("nan"), rep=0,
                ratio=float("nan"), images=0, batch_size=BATCH, threads=args.threads, num_workers=0,
                precision="", trials=0, concurrency=0, gpus_per_trial=0.0, data="synthetic",
                quick=args.quick, reps=plan.reps, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                **raytune.provenance())


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        note("speed: --device cuda but torch sees no GPU")
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    plan = make_plan(args.device, args.quick, args.reps)
    base = base_row(args, device, plan)
    path = Path(args.out) / f"{base['device']}.parquet"
    rows: list[dict] = []
    for name in CASES:
        note(f"images/s: {name}, {plan.images[name]} images x {plan.reps} reps")
        rows += time_model(name, plan, device, args.threads, args.data_dir, base)
        results.write_parquet(rows, path)
    if device.type == "cuda":
        torch.cuda.empty_cache()     # hand part 1's cached blocks back before the trials need the GPU
    console.print(throughput_table(rows))
    if not args.skip_ray:
        runs = Path(args.keep_runs or tempfile.mkdtemp(prefix="raycnn-speed-")).resolve()
        done = list(rows)
        ray_rows = time_suites(plan, device, runs, base, lambda new: results.write_parquet(done + new, path))
        rows += ray_rows
        if not args.keep_runs:
            shutil.rmtree(runs, ignore_errors=True)
        console.print(ray_table(ray_rows))
    results.write_parquet(rows, path)
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
