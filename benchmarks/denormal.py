#!/usr/bin/env python3
"""A CPU training step with subnormal floats flushed to zero, as raycnn's trainer runs it
(`trainer.flush_subnormals`), against the same step without, on a freshly initialised net and on
one whose weights have decayed into subnormals, as a collapsed trial's do.

    python benchmarks/denormal.py [--model NAME] [--optimizer sgd|adam|adamw] [--lr LR]
                                  [--weight-decay WD] [--subnormal SHARE] [--checkpoint STATE]
                                  [--steps N] [--reps N] [--threads N] [--quick] [--out results/speed]

The decayed state is the fresh net after one step, put in the state a collapsed trial of
`mnist/dropout/adam/lr0.01` reached (a search sample's checkpoint after three epochs: `decay`):
dead convolutions, and SHARE (default 0.6) of the dense layer's weights and of their optimizer
moments at that checkpoint's subnormal sizes. The optimizer's defaults are that sample's (Adam,
lr 0.0125, weight decay 1.4e-4). `--checkpoint RUN/.../state.pt` measures a real checkpoint's
model and optimizer instead (read with raycnn's safe loader).

Each measurement runs in a fresh process that sets the mode before anything else, as a trial
does, so that torch's worker threads inherit it (a thread's FTZ/DAZ flags are its own). Both
modes alternate, in an order reversed every repetition; the timed steps start from the same
state every time. The ratio is the unflushed step time over the flushed one (above 1: flushing
is faster). Each row records the subnormal share of the largest weight before and after the
timed steps, so a reader sees the state did not drift out of the case it measures.

Rows go to OUT/denormal-cpu.parquet (denormal-cpu-checkpoint.parquet with --checkpoint): model,
optimizer, lr, weight_decay, state (fresh | decayed | checkpoint), flush, ms_per_step, rep, ratio
(flushed rows), subnormal_before, subnormal_after, steps, batch_size, threads, reps, quick,
created, load_1min, device_name, and provenance.
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.markup import escape
from rich.table import Table

# throughput.py (beside this file) also puts the checkout on sys.path for the raycnn imports below.
from throughput import BATCH, console, device_slug, note, spread

from raycnn import checkpoint, config, models, results, trainer
from raycnn.provenance import provenance

MODES = {"unflushed": False, "flushed": True}
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def subnormal_share(t: torch.Tensor) -> float:
    """Share of the entries of `t` that are subnormal (0 < |x| < 1.2e-38)."""
    a = t.detach().abs()
    return ((a > 0) & (a < SMALLEST_NORMAL)).float().mean().item()


def largest(model: torch.nn.Module) -> torch.nn.Parameter:
    """The parameter with the most entries: the dense layer of the MNIST nets."""
    return max(model.parameters(), key=torch.Tensor.numel)


# A collapsed trial's dense layer, as one search sample of mnist/dropout/adam/lr0.01 held it in its
# checkpoint after 2,532 steps: dead convolutions (their features all zeros), and on 61% of the
# dense weights the weight a subnormal of about 2e-40, its Adam moment one of about 3e-44 and its
# second moment about 1e-10. Adam's step then moves such a weight by about its own size, so it
# stays subnormal step after step.
COLLAPSED = dict(step=2532, weight=4e-40, exp_avg=5e-44, exp_avg_sq=1e-10)


def decay(model: torch.nn.Module, optimizer: torch.optim.Optimizer, share: float) -> None:
    """Put the net in a collapsed trial's state (COLLAPSED): every convolution's bias far below
    its inputs' reach, so its ReLU is dead and no gradient reaches the net below the head, and
    `share` of the largest weight's entries and of its optimizer moments set to the subnormals
    (random sign, uniform up to COLLAPSED's size) a collapsed trial's dense layer holds."""
    weight = largest(model)
    state = optimizer.state[weight]
    g = torch.Generator().manual_seed(0)
    hit = torch.rand(weight.shape, generator=g) < share
    sign = torch.sign(torch.randn(weight.shape, generator=g))

    def plant(t: torch.Tensor, size: float) -> None:
        value = torch.rand(t.shape, generator=g) * size * sign
        t[hit] = value[hit]

    with torch.no_grad():
        for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.bias.fill_(-1e3)
        plant(weight, COLLAPSED["weight"])
        for key in ("exp_avg", "momentum_buffer"):
            if key in state:
                plant(state[key], COLLAPSED["exp_avg"])
        if "exp_avg_sq" in state:
            state["exp_avg_sq"][hit] = COLLAPSED["exp_avg_sq"]
            state["step"].fill_(COLLAPSED["step"])


def build(job: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer of `job` in its state, after the step that creates the moments."""
    cfg = config.TrainConfig(model=job["model"], optimizer=job["optimizer"], lr=job["lr"],
                             weight_decay=job["weight_decay"], momentum=0.9)
    torch.manual_seed(0)
    model = models.build(job["model"]).to(memory_format=torch.channels_last)
    optimizer = trainer.OPTIMIZERS[job["optimizer"]]([{"params": list(model.parameters())}], cfg)
    if job["state"] == "checkpoint":
        state = checkpoint.read(job["checkpoint"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return model, optimizer
    x, y = batch(job["model"])
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    if job["state"] == "decayed":
        decay(model, optimizer, job["share"])
    return model, optimizer


def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = config.MODELS[name]
    channels, size = config.SHAPES[spec.dataset][0], spec.input_size or config.SHAPES[spec.dataset][-1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, channels, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (BATCH,), generator=g)


def measure(job: dict) -> dict:
    """In a fresh process: ms per step of `job` from its state, after a warm-up from the same state."""
    if job["flush"]:
        trainer.flush_subnormals()        # first, as the trainer does, before torch starts threads
    torch.set_num_threads(job["threads"])
    model, optimizer = build(job)
    start_model, start_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    x, y = batch(job["model"])

    def steps(n: int) -> float:
        model.load_state_dict(start_model)
        optimizer.load_state_dict(copy.deepcopy(start_opt))
        begin = time.perf_counter()
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return (time.perf_counter() - begin) / n * 1000

    steps(1)
    ms = steps(job["steps"])
    key = max(start_model, key=lambda k: start_model[k].numel())
    return dict(ms_per_step=ms, subnormal_before=subnormal_share(start_model[key]),
                subnormal_after=subnormal_share(model.state_dict()[key]))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist_dropout", choices=sorted(config.MODELS))
    p.add_argument("--optimizer", default="adam", choices=sorted(trainer.OPTIMIZERS))
    p.add_argument("--lr", type=float, default=0.0125, help="default: the collapsed sample's, 0.0125")
    p.add_argument("--weight-decay", type=float, default=1.4e-4, help="default: the collapsed sample's, 1.4e-4")
    p.add_argument("--subnormal", type=float, default=0.6, help="share of the decayed weight made subnormal")
    p.add_argument("--checkpoint", help="a raycnn state.pt to measure instead of the planted decayed state")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (default 10)")
    p.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as a CPU trial)")
    p.add_argument("--quick", action="store_true", help="2 steps, 1 repetition: a smoke run")
    p.add_argument("--out", default="results/speed", help="folder for denormal-cpu[-checkpoint].parquet")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.reps = 2, 1
    if not 0 < args.subnormal <= 1:
        p.error("--subnormal must be in (0, 1]")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    return args


def denormal_table(rows: list[dict]) -> Table:
    """Per state: ms per step in each mode and unflushed / flushed, median [min–max]."""
    first = rows[0]
    table = Table("state", "subnormal share", "unflushed ms/step", "flushed ms/step", "unflushed / flushed",
                  title=escape(f"{first['model']}, {first['optimizer']} lr {first['lr']:g}, training step on "
                               f"{first['device_name']}, {first['threads']} thread(s), batch {BATCH}; "
                               f"median [min–max] of {first['reps']} reps"))
    for state in dict.fromkeys(r["state"] for r in rows):
        by = {mode: [r for r in rows if r["state"] == state and r["flush"] == flush] for mode, flush in MODES.items()}
        table.add_row(state, f"{by['unflushed'][0]['subnormal_before']:.2f}",
                      spread([r["ms_per_step"] for r in by["unflushed"]], "{:.1f}"),
                      spread([r["ms_per_step"] for r in by["flushed"]], "{:.1f}"),
                      spread([r["ratio"] for r in by["flushed"]], "{:.2f}"))
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    _, name = device_slug(torch.device("cpu"))
    base = dict(model=args.model, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                steps=args.steps, batch_size=BATCH, threads=args.threads, reps=args.reps, quick=args.quick,
                device_name=name, created=time.strftime("%Y-%m-%dT%H:%M:%S"), **provenance())
    states = ["fresh", "checkpoint" if args.checkpoint else "decayed"]
    path = Path(args.out) / f"denormal-cpu{'-checkpoint' if args.checkpoint else ''}.parquet"
    rows: list[dict] = []
    # One process per measurement: a thread keeps the FTZ/DAZ flags it started with.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for rep in range(args.reps):
            for state in states:
                load = os.getloadavg()[0]
                order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))
                job = dict(model=args.model, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                           share=args.subnormal, checkpoint=args.checkpoint, state=state, steps=args.steps,
                           threads=args.threads)
                got = {mode: pool.submit(measure, job | dict(flush=MODES[mode])).result() for mode in order}
                note(f"denormal: rep {rep} {state}: " + ", ".join(f"{m} {got[m]['ms_per_step']:.1f} ms" for m in order))
                for mode in MODES:
                    ratio = got["unflushed"]["ms_per_step"] / got[mode]["ms_per_step"] if mode == "flushed" else float("nan")
                    rows.append(base | got[mode] | dict(state=state, flush=MODES[mode], rep=rep, ratio=ratio,
                                                        load_1min=load))
    results.write_parquet(rows, path)
    console.print(denormal_table(rows))
    for state in states:
        ratios = [r["ratio"] for r in rows if r["state"] == state and r["flush"]]
        note(f"{state}: median unflushed / flushed {statistics.median(ratios):.2f}")
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
