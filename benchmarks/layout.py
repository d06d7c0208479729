#!/usr/bin/env python3
"""One training step of each report network in torch's default layout (NCHW) against
channels_last, the layout raycnn's trainer uses on every device.

    python benchmarks/layout.py [--device cpu|cuda] [--models a,b] [--steps N] [--reps N]
                                [--threads N] [--precision fp32|bf16] [--quick] [--out results/speed]

A step is what the trainer does per batch: forward, cross-entropy, backward, SGD (momentum 0.9)
on 64 images of the model's input size, in fp32 or (`--precision bf16`) under bf16 autocast as
the trainer runs it. The pixels are random (the time does not depend on them). Both layouts
alternate in one process, in an order reversed every repetition, after a warm-up of each; the
ratio is NCHW's step time over channels_last's (above 1: channels_last is faster), per repetition.

Rows go to OUT/layout-<device>.parquet (layout-<device>-bf16.parquet in bf16): device,
device_name, model, precision, layout (nchw | channels_last), ms_per_step, rep, ratio
(channels_last rows), steps, batch_size, threads, reps, quick, created, load_1min, and provenance
(git_rev, versions).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.markup import escape
from rich.table import Table

# throughput.py (beside this file) also puts the checkout on sys.path for the raycnn imports below.
from throughput import BATCH, console, device_slug, note, open_device, spread, sync

from raycnn import config
from raycnn import models, results
from raycnn.provenance import provenance

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DEFAULT_MODELS = ("mnist_base", "mnist_stride2", "cifar_base", "cifar_batchnorm", "resnet18", "alexnet")
# The file name's tail per precision: fp32 keeps the name its published rows have.
SUFFIX = {"fp32": "", "bf16": "-bf16"}
# Timed steps per repetition on the CPU (ResNet-18 and AlexNet take 0.1-0.25 s a step there).
STEPS = {"resnet18": 6, "alexnet": 3}


def step_timer(name: str, layout: str, device: torch.device, steps: int, precision: str = "fp32"):
    """A function that times `steps` training steps of `name` in `layout`; returns ms per step."""
    spec = config.MODELS[name]
    size = spec.input_size or config.SHAPES[spec.dataset][-1]
    fmt = LAYOUTS[layout]
    torch.manual_seed(0)
    model = models.build(name).to(device).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(BATCH, config.SHAPES[spec.dataset][0], size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (BATCH,), device=device)

    def timed() -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        return (time.perf_counter() - start) / steps * 1000
    return timed


def time_model(name: str, args, device: torch.device, base: dict) -> list[dict]:
    """Rows of `name`: both layouts alternating over args.reps, after a warm-up."""
    steps = 1 if args.quick else args.steps or STEPS.get(name, 40)
    timers = {layout: step_timer(name, layout, device, steps, args.precision) for layout in LAYOUTS}
    load = os.getloadavg()[0]
    for timer in timers.values():
        timer()
    rows = []
    for rep in range(args.reps):
        order = list(timers) if rep % 2 == 0 else list(reversed(timers))
        ms = {layout: timers[layout]() for layout in order}
        for layout in LAYOUTS:
            rows.append(base | dict(model=name, layout=layout, ms_per_step=ms[layout], rep=rep, steps=steps,
                                    ratio=ms["nchw"] / ms[layout] if layout != "nchw" else float("nan"),
                                    load_1min=load))
    return rows


def layout_table(rows: list[dict]) -> Table:
    """Per model: ms per step in each layout and NCHW / channels_last, median [min–max]."""
    first = rows[0]
    table = Table("model", "NCHW ms/step", "channels_last ms/step", "NCHW / channels_last",
                  title=escape(f"Training step time on {first['device_name']}, {first['threads']} torch thread(s), "
                               f"batch {BATCH}, {first['precision']}; median [min–max] of {first['reps']} reps"))
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {layout: [r for r in rows if r["model"] == model and r["layout"] == layout] for layout in LAYOUTS}
        table.add_row(model, spread([r["ms_per_step"] for r in by["nchw"]], "{:.2f}"),
                      spread([r["ms_per_step"] for r in by["channels_last"]], "{:.2f}"),
                      spread([r["ratio"] for r in by["channels_last"]], "{:.2f}"))
    return table


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {', '.join(config.MODELS)}")
    p.add_argument("--steps", type=int, help="timed steps per repetition (default: 40; ResNet-18 6, AlexNet 3)")
    p.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: every core)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32, or bf16 autocast (default fp32)")
    p.add_argument("--quick", action="store_true", help="one step per repetition: a smoke run")
    p.add_argument("--out", default="results/speed", help="folder for layout-<device>.parquet")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(config.MODELS))
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(config.MODELS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = open_device(args.device, "layout")
    if device is None:
        return 2
    torch.set_num_threads(args.threads)
    slug, name = device_slug(device)
    base = dict(device=slug, device_name=name, precision=args.precision, batch_size=BATCH, threads=args.threads,
                reps=args.reps, quick=args.quick, created=time.strftime("%Y-%m-%dT%H:%M:%S"), **provenance())
    path = Path(args.out) / f"layout-{slug}{SUFFIX[args.precision]}.parquet"
    rows: list[dict] = []
    for model in args.models:
        note(f"layout: {model}, load {os.getloadavg()[0]:.1f}")
        rows += time_model(model, args, device, base)
        results.write_parquet(rows, path)
    console.print(layout_table(rows))
    ratios = [r["ratio"] for r in rows if r["layout"] == "channels_last"]
    note(f"median NCHW / channels_last over all models and reps: {statistics.median(ratios):.2f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
