#!/usr/bin/env python3
"""A CPU training step in a thread, as a Ray Tune trial runs it, with glibc's malloc arenas as
they come against one arena (MALLOC_ARENA_MAX=1, which raycnn starts every trial's process
with), and the same step in the main thread as the reference.

    python benchmarks/arena.py [--models a,b] [--steps N] [--reps N] [--threads N] [--quick]
                               [--out results/speed]

Why: Tune trains a function trial in a thread of its own, and glibc gives a new thread an arena
of its own, grown in heaps of at most 64 MB; a larger block is mapped afresh and unmapped when
freed whatever mallopt says, so `raycnn.memory.keep_freed_memory` cannot keep it, and the kernel
faults it in, page by page, every step (AlexNet's dense-layer gradients are 151 and 67 MB). With
one arena the thread allocates from the main heap, which mallopt governs, as the main thread does.

Each measurement is a fresh process (glibc reads MALLOC_ARENA_MAX when a process starts) that
builds the trainer's model, optimizer (SGD, momentum 0.9, lr 0.01) and layout with
`trainer.build_training` (which calls keep_freed_memory, as in a trial), warms up, and times
--steps steps on one resident synthetic batch of 64: in a new thread (`thread`), in a new thread
with one arena (`thread, one arena`), or in the main thread (`main`). The cases alternate in an
order reversed every repetition. Printed: images/s, minor page faults per step and the kernel's
share of the process's CPU time, median [min-max]; the ratio is one arena's images/s over the
default's, both in a thread.

Rows go to OUT/arena-cpu.parquet: model, case, images_per_s, faults_per_step, sys_share, rep,
ratio (`thread, one arena` rows), steps, threads, reps, quick, created, load_1min, device_name,
and provenance.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

# throughput.py (beside this file) also puts the checkout on sys.path for the raycnn imports below.
from throughput import BATCH, bare_timer, console, device_slug, note, spread

from raycnn import config, datafiles, memory, results
from raycnn.provenance import provenance

# case -> (runs in a new thread, environment added)
CASES = {"thread": (True, {}), "thread, one arena": (True, memory.TRIAL_ENV), "main": (False, {})}
DEFAULT_MODELS = ("alexnet", "resnet18", "mnist_base")


def step_rate(job: dict) -> dict:
    """In this process: images/s, faults per step and the kernel's CPU share of `job`'s step."""
    cfg = config.TrainConfig(model=job["model"], optimizer="sgd", lr=0.01, momentum=0.9, precision="fp32",
                             device="cpu", num_threads=job["threads"], epochs=1).validate()
    timed = bare_timer(cfg, datafiles.synthetic(config.MODELS[job["model"]].dataset, sizes=(BATCH, BATCH)))
    timed(2)                                   # the heap grows to a step's size, momentum buffers are made
    before = resource.getrusage(resource.RUSAGE_SELF)
    rate = timed(job["steps"])
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dict(images_per_s=rate, faults_per_step=(after.ru_minflt - before.ru_minflt) / job["steps"],
                sys_share=(after.ru_stime - before.ru_stime) / cpu if cpu else float("nan"))


def child(job: dict) -> None:
    """The measurement process: the step where `job` says, its figures as JSON on stdout."""
    out: dict = {}
    if CASES[job["case"]][0]:
        # Built and timed in the thread, as a trial's trainer is built and run in Tune's thread.
        worker = threading.Thread(target=lambda: out.update(step_rate(job)))
        worker.start()
        worker.join()
    else:
        out.update(step_rate(job))
    print(json.dumps(out))


def measure(job: dict) -> dict:
    """`job` in a fresh process started with its case's environment."""
    # glibc's default arenas unless the case sets MALLOC_ARENA_MAX, even where the caller's shell sets it
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | CASES[job["case"]][1]
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"arena.py: the {job['case']} measurement of {job['model']} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    p.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as a CPU trial)")
    p.add_argument("--quick", action="store_true", help="2 steps, 1 repetition: a smoke run")
    p.add_argument("--out", default="results/speed", help="folder for arena-cpu.parquet")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in config.MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(sorted(config.MODELS))})")
    if args.quick:
        args.steps, args.reps = 2, 1
    return args


def arena_table(rows: list[dict]) -> Table:
    """Per model and case: images/s, faults per step, the kernel's share, and the ratio."""
    first = rows[0]
    table = Table("model", "case", "img/s", "faults/step", "kernel share", "one arena / default",
                  title=escape(f"training step on {first['device_name']}, {first['threads']} thread(s), batch "
                               f"{BATCH}; median [min–max] of {first['reps']} reps"))
    for model in dict.fromkeys(r["model"] for r in rows):
        for case in CASES:
            mine = [r for r in rows if r["model"] == model and r["case"] == case]
            table.add_row(model, case, spread([r["images_per_s"] for r in mine]),
                          spread([r["faults_per_step"] for r in mine]), spread([r["sys_share"] for r in mine], "{:.2f}"),
                          spread([r["ratio"] for r in mine], "{:.2f}") if case == "thread, one arena" else "")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    _, name = device_slug(torch.device("cpu"))
    base = dict(steps=args.steps, threads=args.threads, reps=args.reps, quick=args.quick, device_name=name,
                created=time.strftime("%Y-%m-%dT%H:%M:%S"), **provenance())
    path = Path(args.out) / "arena-cpu.parquet"
    rows: list[dict] = []
    for rep in range(args.reps):
        for model in args.models:
            load = os.getloadavg()[0]
            order = list(CASES) if rep % 2 == 0 else list(reversed(CASES))
            got = {case: measure(dict(model=model, case=case, steps=args.steps, threads=args.threads)) for case in order}
            note(f"arena: rep {rep} {model}: " + ", ".join(f"{c} {got[c]['images_per_s']:.0f} img/s" for c in order))
            for case in CASES:
                ratio = got[case]["images_per_s"] / got["thread"]["images_per_s"] if case == "thread, one arena" \
                    else float("nan")
                rows.append(base | got[case] | dict(model=model, case=case, rep=rep, ratio=ratio, load_1min=load))
        results.write_parquet(rows, path)        # a cut-off run keeps its finished repetitions
    console.print(arena_table(rows))
    for model in args.models:
        ratios = [r["ratio"] for r in rows if r["model"] == model and r["case"] == "thread, one arena"]
        note(f"{model}: median one arena / default in a thread {statistics.median(ratios):.2f}")
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
