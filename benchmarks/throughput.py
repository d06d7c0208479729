#!/usr/bin/env python3
"""Training images/s of the raycnn trainer against the loop a report author writes, on one device.

    python benchmarks/throughput.py [--device cpu|cuda] [--threads N] [--naive-workers 0,2]
                                    [--compile] [--reps N] [--quick] [--data-dir DIR] [--out results/speed]

Cases (`--models`): `mnist_base`, `cifar_base` (RandomCrop(32, padding=10) + flip, as in sec.
4.2), `resnet18` (crop padding 4 + flip, as in sec. 5), and `cifar_flip` (cifar_base with the
flip alone, sec. 4.2's flip cell; not in the default set). The raycnn trainer
(`build_training` + `train_one_epoch`) runs against the naive loop: a torchvision-style Dataset
returning PIL-transformed samples, `DataLoader(batch_size=64, shuffle=True)`, fp32, `loss.item()`
every step. Same images, batch, SGD(lr 0.01, momentum 0.9).

Equal resources: both loops get the same torch threads (default: every core of the machine, what
a user gives a run), and the naive loop runs once per `--naive-workers` value (DataLoader worker
processes, persistent); the ratio is raycnn against the best naive variant of the same
repetition. All variants alternate in one process, in an order reversed every repetition, after a
warm-up pass of each, so a drift in the machine's load hits all alike. On CUDA the trainer also
runs in fp32 (its default there is bf16 or fp16); `--compile` adds the trainer with torch.compile.

Rows go to OUT/throughput-<device>.parquet (`cpu`, or a slug of the GPU's name), rewritten after each
model, one per number: device, device_name, measure (train_images_per_s), model, variant (naive-wK,
raycnn, raycnn-fp32, raycnn-compile), value, rep, ratio (raycnn variants: value / the best naive
of that rep), images, batch_size, threads, num_workers, precision, data (real | synthetic), quick,
reps, created, load_1min (the machine's load average as the model started), and provenance:
git_rev, torch_version, torchvision_version, ray_version, python_version.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a checkout that is not installed

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raycnn import config, datafiles
from raycnn import models, results
from raycnn.provenance import provenance
from raycnn.config import TrainConfig
from raycnn.errors import DataError
from raycnn.trainer import build_training, resolve_precision, train_one_epoch

# A log file gets the tables whole (rich would cut them to 80 columns off a terminal).
console = Console() if sys.stdout.isatty() else Console(width=200)
log = Console(stderr=True)
T0 = time.perf_counter()


def note(message: str) -> None:
    """A progress line on stderr, with the seconds since start."""
    log.print(f"[{time.perf_counter() - T0:5.0f}s] {message}", markup=False, highlight=False)


BATCH = 64
# The timed cases: a model with the report's training transforms, as TrainConfig fields.
CASES = {
    "mnist_base": {"model": "mnist_base"},
    "cifar_base": {"model": "cifar_base", "augment": ("crop", "flip"), "crop_padding": 10},   # sec. 4.2
    "cifar_flip": {"model": "cifar_base", "augment": ("flip",)},                              # sec. 4.2's flip cell
    "resnet18": {"model": "resnet18", "augment": ("crop", "flip"), "crop_padding": 4},        # sec. 5
}
DEFAULT_CASES = ("mnist_base", "cifar_base", "resnet18")
# Training images per timed pass (multiples of 64), per device kind; --quick shrinks them.
IMAGES = {
    "cpu": {"mnist_base": 2048, "cifar_base": 20480, "cifar_flip": 20480, "resnet18": 384},
    "cuda": {"mnist_base": 16384, "cifar_base": 16384, "cifar_flip": 16384, "resnet18": 4096},
    "quick": {"mnist_base": 128, "cifar_base": 256, "cifar_flip": 256, "resnet18": 64},
}
# The naive DataLoader's worker counts: none and one per core on the CPU (see --threads); on CUDA
# 2 (torchvision's CIFAR-10 tutorial, which report notebooks copy) and 8.
NAIVE_WORKERS = {"cpu": None, "cuda": (2, 8), "quick": (0,)}


def device_slug(device: torch.device) -> tuple[str, str]:
    """(file stem, readable name): `cpu`, or the GPU's name as a slug, e.g. nvidia-h100-80gb-hbm3."""
    if device.type != "cuda":
        return "cpu", platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name


def open_device(name: str, script: str) -> torch.device | None:
    """`--device` as a torch.device, or None after one line on stderr where CUDA is asked for
    and torch sees no GPU (the caller exits with 2)."""
    if name == "cuda" and not torch.cuda.is_available():
        print(f"{script}: --device cuda but torch sees no GPU", file=sys.stderr)
        return None
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer brackets only what it means to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- images/s

def dataset_arrays(name: str, n: int, data_dir: str | None) -> tuple[datafiles.Arrays, str]:
    """The first `n` training images of `name`: real when readable under data_dir, else synthetic
    (throughput does not depend on the pixels)."""
    if data_dir:
        try:
            return datafiles.subset(datafiles.read(name, data_dir, download=False), n), "real"
        except DataError:
            note(f"{name}: no data under {data_dir}; timing synthetic images")
    return datafiles.synthetic(name, sizes=(n, BATCH)), "synthetic"


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
    mean, std = config.STATS[dataset]
    ops = []
    if "crop" in case.get("augment", ()):
        ops.append(T.RandomCrop(config.SHAPES[dataset][-1], padding=case["crop_padding"]))
    if "flip" in case.get("augment", ()):
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def naive_timer(name: str, arrays: datafiles.Arrays, device: torch.device, workers: int) -> Callable[[], float]:
    """A function that trains one pass the notebook way and returns its images/s. With workers,
    they persist across passes: the naive loop at its best, not paying a fork per epoch."""
    case = CASES[name]
    dataset = config.MODELS[case["model"]].dataset
    torch.manual_seed(0)
    model = models.build(case["model"]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        NaiveDataset(arrays.train_x, arrays.train_y, naive_transform(dataset, case)),
        batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0)

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


def bare_timer(cfg: TrainConfig, arrays: datafiles.Arrays) -> Callable[..., float]:
    """A function timing `steps` bare training steps (default: as many as a pass over `arrays`
    has); returns images/s. The model, optimizer, layout and autocast are the trainer's
    (build_training); the batch stays put: no gather, no input pipeline, no running sums."""
    training = build_training(cfg, arrays)
    x = training.pipeline(training.data.train_x[:BATCH]).contiguous(memory_format=training.layout)
    y = training.data.train_y[:BATCH]
    model, optimizer = training.model.train(), training.optimizer

    def timed(steps: int = max(1, len(arrays.train_y) // BATCH)) -> float:
        if cfg.num_threads:      # 0 leaves torch's threads as they are, as the trainer does
            torch.set_num_threads(cfg.num_threads)
        start = time.perf_counter()
        for _ in range(steps):
            with training.autocast():
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps * BATCH / (time.perf_counter() - start)
    return timed


def raycnn_timer(name: str, arrays: datafiles.Arrays, device: torch.device, threads: int,
                 precision: str, compile: bool = False) -> Callable[[], float]:
    """A function that trains one pass with the raycnn trainer and returns its images/s."""
    config = TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=0.01, momentum=0.9,
                         precision=precision, device=str(device), num_threads=threads, compile=compile,
                         **CASES[name]).validate()
    training = build_training(config, arrays)

    def one_pass() -> float:
        sync(device)
        start = time.perf_counter()
        train_one_epoch(training)        # ends with the epoch's one sync
        return len(arrays.train_y) / (time.perf_counter() - start)
    return one_pass


def time_model(name: str, args, device: torch.device, data_dir: str | None, base: dict) -> list[dict]:
    """Images/s rows of `name`: every variant alternating over args.reps, after a warm-up."""
    arrays, source = dataset_arrays(config.MODELS[CASES[name]["model"]].dataset, args.images[name], data_dir)
    timers = {f"naive-w{w}": naive_timer(name, arrays, device, w) for w in args.naive_workers}
    timers["raycnn"] = raycnn_timer(name, arrays, device, args.threads, "auto")
    if device.type == "cuda":    # the trainer's default there is bf16 or fp16; fp32 separates precision from the rest
        timers["raycnn-fp32"] = raycnn_timer(name, arrays, device, args.threads, "fp32")
    if args.compile:
        timers["raycnn-compile"] = raycnn_timer(name, arrays, device, args.threads, "auto", compile=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for timer in timers.values():
        timer()                  # warm-up: allocator, cuDNN autotuning, compilation, first-call dispatch
    rows = []
    for rep in range(args.reps):
        order = list(timers) if rep % 2 == 0 else list(reversed(timers))
        ips = {variant: timers[variant]() for variant in order}
        best_naive = max(v for k, v in ips.items() if k.startswith("naive"))
        for variant in timers:
            naive = variant.startswith("naive")
            precision = "fp32" if naive or variant == "raycnn-fp32" else resolve_precision("auto", device)
            rows.append(base | dict(
                measure="train_images_per_s", model=name, variant=variant, value=ips[variant], rep=rep,
                ratio=float("nan") if naive else ips[variant] / best_naive, images=len(arrays.train_y),
                num_workers=int(variant[len("naive-w"):]) if naive else 0, precision=precision, data=source,
                load_1min=load))
    return rows


# ---------------------------------------------------------------- table

def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """median [min–max] of the repetitions."""
    values = sorted(values)
    mid = fmt.format(statistics.median(values))
    return mid if len(values) == 1 else f"{mid} [{fmt.format(values[0])}–{fmt.format(values[-1])}]"


def throughput_table(rows: list[dict]) -> Table:
    """Per model: images/s of each variant and raycnn/best naive, median [min–max] over repetitions."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    first = rows[0]
    table = Table("model", "images", "data", *[f"{v} img/s" for v in variants],
                  *[f"{v}/naive" for v in variants if not v.startswith("naive")],
                  title=escape(f"Training images/s on {first['device_name']}, {first['threads']} torch thread(s) for "
                               f"both loops, naive-wK: DataLoader num_workers=K; ratio against the best naive of "
                               f"each rep; median [min–max] of {first['reps']} reps, batch {BATCH}"))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        by = {v: [r for r in mine if r["variant"] == v] for v in variants}
        table.add_row(model, str(mine[0]["images"]), mine[0]["data"], *[spread([r["value"] for r in by[v]]) for v in variants],
                      *[spread([r["ratio"] for r in by[v]], "{:.2f}") for v in variants if not v.startswith("naive")])
    return table


# ---------------------------------------------------------------- main

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", default=",".join(DEFAULT_CASES),
                   help=f"comma-separated cases, of {', '.join(CASES)} (default: {', '.join(DEFAULT_CASES)})")
    p.add_argument("--reps", type=int, help="timed repetitions per model (default: 5 on the CPU, 3 on CUDA; --quick 1)")
    p.add_argument("--images", type=int, help="training images per timed pass, every model (default: per model)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the whole script in well under a minute")
    p.add_argument("--data-dir", default="data", help="real MNIST/CIFAR-10 here if present, else synthetic")
    p.add_argument("--out", default="results/speed", help="folder for throughput-<device>.parquet")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch CPU threads for both loops (default: every core)")
    p.add_argument("--naive-workers", help="comma-separated DataLoader worker counts of the naive loop "
                                           "(default: CPU 0 and --threads; CUDA 2 and 8)")
    p.add_argument("--compile", action="store_true", help="also time the trainer with torch.compile")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(CASES))
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    kind = "quick" if args.quick else args.device
    args.images = {m: args.images or IMAGES[kind][m] for m in CASES}
    args.reps = args.reps or (1 if args.quick else 5 if args.device == "cpu" else 3)
    workers = args.naive_workers.split(",") if args.naive_workers else NAIVE_WORKERS[kind] or (0, args.threads)
    try:
        args.naive_workers = sorted({int(w) for w in workers})
    except ValueError:
        p.error(f"--naive-workers takes comma-separated integers, got {args.naive_workers!r}")
    return args


def base_row(args, device: torch.device) -> dict:
    """The columns every row shares."""
    slug, name = device_slug(device)
    return dict(device=slug, device_name=name, measure="", model="", variant="", value=float("nan"), rep=0,
                ratio=float("nan"), images=0, batch_size=BATCH, threads=args.threads, num_workers=0,
                precision="", data="synthetic", quick=args.quick, reps=args.reps,
                created=time.strftime("%Y-%m-%dT%H:%M:%S"), load_1min=float("nan"), **provenance())


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = open_device(args.device, "throughput")
    if device is None:
        return 2
    torch.set_num_threads(args.threads)
    base = base_row(args, device)
    path = Path(args.out) / f"throughput-{base['device']}.parquet"
    rows: list[dict] = []
    for name in args.models:
        note(f"images/s: {name}, {args.images[name]} images x {args.reps} reps, load {os.getloadavg()[0]:.1f}")
        rows += time_model(name, args, device, args.data_dir, base)
        results.write_parquet(rows, path)
    console.print(throughput_table(rows))
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
