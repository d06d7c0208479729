#!/usr/bin/env python3
"""How close each network's training comes to this CPU's peak, and what a trial keeps of its step.

    python benchmarks/roofline.py [--models a,b] [--reps N] [--threads N] [--images N]
                                  [--test-images N] [--packing-precision fp32|bf16] [--clock-ghz F]
                                  [--worker-niceness N] [--data-dir DIR] [--quick] [--out results/speed]
    python benchmarks/roofline.py --show results/speed/roofline-cpu.parquet    # a saved run's tables again

For each network (default: mnist_base, cifar_base, resnet18, alexnet) it prints:

- training FLOPs per image: one step (forward, cross-entropy, backward) of a batch of 64 counted
  by torch.utils.flop_counter.FlopCounterMode (matrix products and convolutions; the elementwise
  work it leaves out is a small share of these networks');
- images/s at three levels, each on --threads torch threads, in fp32 and in bf16 (CPU autocast):
  `bare`, the trainer's own model, optimizer, layout and autocast stepping on one resident batch;
  `fit`, `raycnn.trainer.fit` for one epoch; `trial`, the same one-epoch `fit` as a Ray Tune trial
  through `raycnn.tune.run_trials` (one at a time in one reused worker process, as `raycnn run`
  runs a suite). fit and trial give the trainer's own figure: training images over the seconds of
  the training loop (the evaluation after it is not counted);
- the share of the CPU's peak each level reaches, trial/bare, fit/bare and bf16/fp32;
- packing: total training images/s of 2 trials x 1 thread against 1 trial x 2 threads, both
  through run_trials (in --packing-precision), and which wins.

Timing: after a warm-up of each variant, the in-process variants (bare and fit, both precisions)
alternate in an order reversed every repetition, half of the repetitions before the network's
Ray trials and half after, so a drift in the machine's load hits every level alike; the trials of
the two precisions alternate the same way. Medians of the repetitions, with min and max. The
warm-up trials, the first of their precision in a fresh worker process, are shown as `1st trial`:
a one-epoch trial of `raycnn run` pays that start.

The peak: 2 vector FMA units x the fp32 lanes of the widest vector ISA in the CPU flags (avx512f
16, avx2 8, ...; fewer where the CPU runs wide ops on narrower units, NARROW_UNITS) x 2 flop x the
clock x the cores used; the clock is --clock-ghz, else measured (a chain of dependent integer adds
in a small C program built with the system's cc: one add retires a cycle, so adds per second are
the clock the core runs at, boost included), else sysfs cpufreq's maximum, else /proc/cpuinfo's
"cpu MHz" (the printed line says which; in a virtual machine those two are often the base clock,
and a core that boosts above it beats a peak computed from them). A measured sgemm
(torch.mm of two N x N fp32 matrices) stands beside it; where the CPU has bf16 instructions
(BF16_RATES: avx512_bf16, amx_bf16) so do a bf16 peak and a bf16 torch.mm.

Data: the first --images training images (default per network) and --test-images test images of
the real dataset under --data-dir, else synthetic images of its shape. The trials read the same
images from a copy in torchvision's layout in a temporary folder; the short test split only
shortens the untimed evaluation.

Ray starts its worker processes at nice 15, so where other processes want the CPU, a trial gets
far less of it than the benchmark's own process; `--worker-niceness 0` gives the trials the
benchmark's priority (Ray's RAY_worker_niceness), to tell that apart from what Ray costs.

Rows go to OUT/roofline-cpu.parquet, rewritten after each stage: measure (gflop_per_image,
peak_gflop_s, gemm_gflop_s, images_per_s, ratio), model, level (bare, fit, trial, trial_first,
pack_2x1, pack_1x2; ratios: fit/bare, trial/bare, bf16/fp32 LEVEL, 2x1/1x2), precision, value,
rep, pct_peak, images, threads, source, data, quick, reps, cpu, worker_niceness (-1: Ray's
default), created, load_1min, and provenance (git_rev, versions).
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.markup import escape
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

# throughput.py (beside this file) also puts the checkout on sys.path for the raycnn imports below.
from throughput import BATCH, bare_timer, console, dataset_arrays, note, spread

from raycnn import config, datafiles, models, results, suites
from raycnn import tune as raytune
from raycnn.config import TrainConfig
from raycnn.errors import RunError
from raycnn.provenance import provenance
from raycnn.trainer import fit

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MODELS = ("mnist_base", "cifar_base", "resnet18", "alexnet")
# Training images per timed pass: 1.5-5 s of one idle fp32 core each, and enough steps that a
# trial's first step (its memory faulted in afresh, see raycnn.memory.reset_peak) weighs little.
IMAGES = {"resnet18": 768, "alexnet": 768}
DATASET_IMAGES = {"mnist": 2048, "cifar10": 12800}
QUICK = {"images": 128, "test_images": 64, "gemm_n": 256, "reps": 1}
FULL = {"test_images": 1000, "gemm_n": 2048, "reps": 5}

# ---------------------------------------------------------------- the CPU's peak

# The widest vector ISA the CPU flags name -> fp32 lanes of one vector op (the first present wins).
VECTOR_LANES = (("avx512f", 16), ("avx2", 8), ("avx", 8), ("asimd", 4), ("sse2", 4))
# CPUs whose vector units are narrower than their widest ISA, (vendor, family) -> fp32 lanes per
# unit: AMD family 25 (Zen 3, Zen 4) has 256-bit units; Zen 4 runs AVX-512 ops on them in halves.
NARROW_UNITS = {("AuthenticAMD", "25"): 8}
FMA_UNITS = 2        # vector FMA pipes per core: x86 server cores since Haswell and Zen
# Native bf16 instructions -> bf16 flop/cycle/core from the fp32 rate: AVX512_BF16's VDPBF16PS
# does two multiply-adds per fp32 lane, AMX's tile multiply 1024 flop a cycle.
BF16_RATES = (("amx_bf16", lambda fp32: 1024), ("avx512_bf16", lambda fp32: 2 * fp32))
CPUFREQ_MAX = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")     # kHz
CPUINFO = Path("/proc/cpuinfo")


def cpu_facts() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (vendor_id, cpu family, model name, flags,
    cpu MHz); {} where there is none."""
    facts: dict[str, str] = {}
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return facts
    for line in lines:
        key, _, value = line.partition(":")
        if not key.strip() and facts:
            break                      # the blank line after the first processor
        facts.setdefault(key.strip(), value.strip())
    return facts


# Four dependent register adds per loop pass: each waits for the last, one a cycle on every x86-64
# and Arm64 core, while the loop's own counter and branch run beside them (an add of a constant
# some cores fold away before it executes). A virtual machine's sysfs and
# cpuinfo report its base clock; a core that boosts runs faster, and the peak must use that.
CLOCK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(__x86_64__)
#define ADD "add %1, %0\n\t"
#elif defined(__aarch64__)
#define ADD "add %0, %0, %1\n\t"
#endif
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    unsigned long x = 0, one = 1;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) __asm__ volatile(ADD ADD ADD ADD : "+r"(x) : "r"(one));
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6e\n", 4.0 * n / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9));
    return x != 4 * (unsigned long)n;
}
"""
CLOCK_ARCHES = ("x86_64", "aarch64", "arm64")


def measured_clock_hz(passes: int = 100_000_000, tries: int = 3) -> float | None:
    """The clock one core runs at, from CLOCK_C (the fastest of `tries` runs: a run the machine
    interrupts only reads slower); None without a C compiler or on another architecture."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or platform.machine() not in CLOCK_ARCHES:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "clock.c", Path(tmp) / "clock"
        src.write_text(CLOCK_C)
        if subprocess.run([cc, "-O1", "-o", str(exe), str(src)], capture_output=True).returncode:
            return None
        runs = [subprocess.run([str(exe), str(passes)], capture_output=True, text=True) for _ in range(tries)]
    rates = [float(r.stdout) for r in runs if r.returncode == 0 and r.stdout.strip()]
    return max(rates) if rates else None


def clock_hz(facts: dict[str, str], ghz: float | None = None) -> tuple[float, str]:
    """(the clock in Hz, where it came from): `ghz` where given, else measured (CLOCK_C), else
    sysfs cpufreq's maximum, else /proc/cpuinfo's MHz."""
    if ghz:
        return ghz * 1e9, "--clock-ghz"
    if hz := measured_clock_hz():
        return hz, "measured: dependent adds"
    try:
        return int(CPUFREQ_MAX.read_text()) * 1e3, "sysfs cpufreq max"
    except (OSError, ValueError):
        pass
    try:
        return float(facts["cpu MHz"]) * 1e6, "/proc/cpuinfo cpu MHz: the current clock, no cpufreq in sysfs"
    except (KeyError, ValueError):
        return math.nan, "no clock found"


def peaks_per_core(facts: dict[str, str], ghz: float | None = None) -> dict[str, tuple[float, str]]:
    """Peak flop/s of one core by precision (fp32 always, bf16 where the CPU has bf16
    instructions), each with how it was found."""
    flags = set((facts.get("flags") or facts.get("Features") or "").split())
    isa, lanes = next(((f, n) for f, n in VECTOR_LANES if f in flags), ("scalar", 1))
    lanes = min(lanes, NARROW_UNITS.get((facts.get("vendor_id", ""), facts.get("cpu family", "")), lanes))
    per_op = 2 if "fma" in flags or isa == "asimd" else 1
    fp32 = FMA_UNITS * lanes * per_op
    hz, where = clock_hz(facts, ghz)
    clock = f"{hz / 1e9:.2f} GHz ({where})"
    out = {"fp32": (fp32 * hz, f"{isa}: {FMA_UNITS} units x {lanes} fp32 lanes x {per_op} flop = "
                               f"{fp32} flop/cycle x {clock}")}
    for flag, rate in BF16_RATES:
        if flag in flags:
            out["bf16"] = (rate(fp32) * hz, f"{flag}: {rate(fp32)} flop/cycle x {clock}")
            break
    return out


def gemm_flop_s(dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Measured flop/s of torch.mm on two n x n matrices of `dtype` (median of reps, after one)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


# ---------------------------------------------------------------- work per image

def input_shape(name: str) -> tuple[int, int, int]:
    """(channels, side, side) of what the network sees (AlexNet's inputs are resized)."""
    spec = config.MODELS[name]
    channels, _, side = config.SHAPES[spec.dataset]
    side = spec.input_size or side
    return channels, side, side


def train_flops(name: str) -> float:
    """Training FLOPs per image: forward, cross-entropy and backward of one batch, as counted by
    FlopCounterMode, over the batch (the SGD update's elementwise work is not counted)."""
    torch.manual_seed(0)
    model = models.build(name).train()
    x, y = torch.randn(BATCH, *input_shape(name)), torch.randint(0, 10, (BATCH,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / BATCH


# ---------------------------------------------------------------- the three levels

def train_config(name: str, precision: str, threads: int, **more) -> TrainConfig:
    """One epoch of SGD with momentum, batch 64, on the CPU: the config of every level."""
    return TrainConfig(model=name, epochs=1, batch_size=BATCH, optimizer="sgd", lr=0.01, momentum=0.9,
                       precision=precision, device="cpu", num_threads=threads, eval_batch_size=1000,
                       **more).validate()


def bare(name: str, precision: str, arrays: datafiles.Arrays, threads: int):
    """A function timing the bare step (throughput.bare_timer) over as many images as a pass has."""
    return bare_timer(train_config(name, precision, threads), arrays)


def fit_timer(name: str, precision: str, arrays: datafiles.Arrays, threads: int):
    """A function running `fit` for one epoch; returns the images/s the trainer reports."""
    cfg = train_config(name, precision, threads)
    return lambda: fit(cfg, arrays=arrays)["history"][0]["images_per_s"]


def in_process(name: str, arrays: datafiles.Arrays, threads: int, reps: range) -> list[dict]:
    """Rows of the bare and fit levels, both precisions alternating over `reps` (after a warm-up
    when reps starts at 0)."""
    timers = {(level, p): make(name, p, arrays, threads)
              for level, make in (("bare", bare), ("fit", fit_timer)) for p in PRECISIONS}
    if reps.start == 0:
        for timer in timers.values():
            timer()
    rows = []
    for rep in reps:
        order = list(timers) if rep % 2 == 0 else list(reversed(timers))
        for level, precision in order:
            rows.append(dict(model=name, level=level, precision=precision, rep=rep,
                             value=timers[(level, precision)]()))
    return rows


def trial(name: str, precision: str, tag: str, order: int, threads: int, data_root: Path,
          images: int) -> suites.Trial:
    """A one-epoch trial of `name` on the first `images` images of the copy in data_root."""
    cfg = train_config(name, precision, threads, data_dir=str(data_root), max_train_samples=images)
    return suites.Trial(name=f"roofline/{name}/{precision}/{tag}", suite="roofline", config=cfg, table="",
                        row="", column="", report_acc=math.nan, order=order, gpus_per_trial=0.0,
                        cpus_per_trial=threads)


class TrialsFailed(RuntimeError):
    """A run_trials call that did not end ok."""


def run_ray(trials: list[suites.Trial], run_dir: Path, cpus_per_trial: int, concurrent: int) -> dict[str, float]:
    """Images/s of each trial's epoch, by trial name, from one run_trials call on a private Ray
    with `concurrent` x `cpus_per_trial` CPUs (the trials start in list order)."""
    opts = raytune.RunOptions(run_dir=run_dir, cpus_per_trial=cpus_per_trial, max_concurrent=concurrent,
                              max_failures=0, num_cpus=cpus_per_trial * concurrent, num_gpus=0)
    outcome = raytune.run_trials(trials, opts)
    if outcome != "ok":
        raise TrialsFailed(f"the Ray trials ended {outcome}")
    _, epochs = results.load_run(run_dir)
    return dict(zip(epochs["name"], epochs["images_per_s"]))


def trial_level(name: str, args, data_root: Path, run_dir: Path) -> list[dict]:
    """Rows of the trial level: a warm-up trial of each precision (kept as trial_first), then the
    repetitions alternating, one trial at a time in one reused worker."""
    tags = [(p, "first") for p in PRECISIONS]
    tags += [(p, f"r{rep}") for rep in range(args.reps) for p in (PRECISIONS if rep % 2 == 0 else PRECISIONS[::-1])]
    trials = [trial(name, p, tag, i, args.threads, data_root, args.images[name]) for i, (p, tag) in enumerate(tags)]
    ips = run_ray(trials, run_dir, args.threads, 1)
    return [dict(model=name, level="trial_first" if tag == "first" else "trial", precision=p,
                 rep=-1 if tag == "first" else int(tag[1:]), value=ips[t.name]) for (p, tag), t in zip(tags, trials)]


# ---------------------------------------------------------------- packing

# level -> (torch threads per trial, trials at once): two cores either way.
PACKINGS = {"pack_2x1": (1, 2), "pack_1x2": (2, 1)}
PACKING_WORDS = {"pack_2x1": "2 trials x 1 thread", "pack_1x2": "1 trial x 2 threads"}


def packing(args, data_root: Path, run_dir: Path) -> list[dict]:
    """Rows of total images/s per round of trials at once, for each packing: one Ray run per
    packing over every network; the first round of each network warms up and is not kept."""
    rows = []
    for level, (threads, k) in PACKINGS.items():
        rounds: list[tuple[str, int, list[suites.Trial]]] = []
        for name in args.models:
            for rep in range(-1, args.reps):
                start = sum(len(r[2]) for r in rounds)
                rounds.append((name, rep, [trial(name, args.packing_precision, f"{level}-{rep + 1}-{i}", start + i,
                                                 threads, data_root, args.images[name]) for i in range(k)]))
        note(f"packing: {PACKING_WORDS[level]}, {sum(len(r[2]) for r in rounds)} trials")
        ips = run_ray([t for r in rounds for t in r[2]], run_dir / level, threads, k)
        rows += [dict(model=name, level=level, precision=args.packing_precision, rep=rep,
                      value=sum(ips[t.name] for t in trials), threads=2)
                 for name, rep, trials in rounds if rep >= 0]
    return rows


# ---------------------------------------------------------------- data for the trials

def write_idx(path: Path, array: np.ndarray) -> None:
    """`array` as an IDX file of unsigned bytes (MNIST's format)."""
    header = struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_mnist(arrays: datafiles.Arrays, root: Path) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", arrays.train_x, arrays.train_y), ("t10k", arrays.test_x, arrays.test_y)):
        write_idx(raw / f"{split}-images-idx3-ubyte", x[:, 0])
        write_idx(raw / f"{split}-labels-idx1-ubyte", y)


def write_cifar10(arrays: datafiles.Arrays, root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    none = (arrays.train_x[:0], arrays.train_y[:0])
    batches = {"data_batch_1": (arrays.train_x, arrays.train_y), **{f"data_batch_{i}": none for i in range(2, 6)},
               "test_batch": (arrays.test_x, arrays.test_y)}
    for file, (x, y) in batches.items():
        with open(folder / file, "wb") as f:
            pickle.dump({b"data": x.reshape(len(x), int(np.prod(x.shape[1:]))), b"labels": y.tolist()}, f, protocol=4)


WRITERS = {"mnist": write_mnist, "cifar10": write_cifar10}


def datasets(args, root: Path) -> dict[str, tuple[datafiles.Arrays, str]]:
    """Per dataset the networks use: (its arrays, real | synthetic), as many training images as
    the most any of them takes and --test-images test images; written under root for the trials."""
    need: dict[str, int] = {}
    for name in args.models:
        dataset = config.MODELS[name].dataset
        need[dataset] = max(need.get(dataset, 0), args.images[name])
    out = {}
    for dataset, n in need.items():
        arrays, source = dataset_arrays(dataset, n, args.data_dir)
        k = args.test_images
        arrays = datafiles.Arrays(arrays.train_x, arrays.train_y, arrays.test_x[:k], arrays.test_y[:k])
        WRITERS[dataset](arrays, root)
        out[dataset] = arrays, source
    return out


# ---------------------------------------------------------------- figures

def median_of(rows: list[dict], model: str, level: str, precision: str) -> float:
    values = [r["value"] for r in rows if r["measure"] == "images_per_s" and
              (r["model"], r["level"], r["precision"]) == (model, level, precision)]
    return statistics.median(values) if values else math.nan


def ratio_rows(rows: list[dict], model: str) -> list[dict]:
    """fit/bare and trial/bare per precision, bf16/fp32 per level, 2x1/1x2: ratios of medians."""
    m = lambda level, p: median_of(rows, model, level, p)
    out = [dict(level=f"{level}/bare", precision=p, value=m(level, p) / m("bare", p))
           for p in PRECISIONS for level in ("fit", "trial")]
    out += [dict(level=f"bf16/fp32 {level}", precision="", value=m(level, "bf16") / m(level, "fp32"))
            for level in ("bare", "fit", "trial", "trial_first")]
    packed = {r["precision"] for r in rows if r["level"] == "pack_2x1" and r["model"] == model}
    out += [dict(level="2x1/1x2", precision=p, value=m("pack_2x1", p) / m("pack_1x2", p)) for p in packed]
    return [dict(measure="ratio", model=model, rep=-1, **r) for r in out]


def ratio(rows: list[dict], model: str, level: str, precision: str = "") -> float:
    return next((r["value"] for r in rows if r["measure"] == "ratio" and
                 (r["model"], r["level"], r["precision"]) == (model, level, precision)), math.nan)


def images_row(base: dict, r: dict, flops: dict[str, float], peak: dict[str, tuple[float, str]]) -> dict:
    """An images/s row with its share of the peak of the cores it ran on."""
    per_core = peak.get(r["precision"], peak["fp32"])[0]
    threads = r.pop("threads", base["threads"])
    return base | r | dict(measure="images_per_s", threads=threads,
                           pct_peak=100 * r["value"] * flops[r["model"]] / (per_core * threads))


# ---------------------------------------------------------------- printing

def peak_lines(rows: list[dict], threads: int) -> list[str]:
    out = []
    for r in (r for r in rows if r["measure"] == "peak_gflop_s"):
        gemm = next(g for g in rows if g["measure"] == "gemm_gflop_s" and g["precision"] == r["precision"])
        out.append(f"{r['precision']} peak {r['value']:.1f} GFLOP/s a core ({r['source']}); "
                   f"torch.mm {gemm['source']} on {threads} thread(s): {gemm['value']:.1f} GFLOP/s, "
                   f"{gemm['pct_peak']:.0f}% of {threads} core(s)' peak")
    return out


def level_table(rows: list[dict], models_: list[str]) -> Table:
    """Per network and precision: images/s at each level, % of peak, fit/bare and trial/bare."""
    first = next(r for r in rows if r["level"] == "bare")
    table = Table("model", "GFLOP/img", "precision", "bare img/s", "fit img/s", "trial img/s", "1st trial img/s",
                  "bare % peak", "trial % peak", "fit/bare", "trial/bare",
                  title=escape(f"Training images/s on {first['cpu']}, {first['threads']} torch thread(s), batch "
                               f"{BATCH}, trials at {niceness(first['worker_niceness'])}; median [min–max] of "
                               f"{first['reps']} reps; bf16/fp32 rows: ratios of medians"))
    for model in models_:
        gflop = next(r["value"] for r in rows if r["measure"] == "gflop_per_image" and r["model"] == model)
        for p in PRECISIONS:
            mine = lambda level: [r for r in rows if r["measure"] == "images_per_s" and
                                  (r["model"], r["level"], r["precision"]) == (model, level, p)]
            table.add_row(model, f"{gflop:.3f}", p, *[spread([r["value"] for r in mine(level)]) for level in
                                                        ("bare", "fit", "trial", "trial_first")],
                          *[spread([r["pct_peak"] for r in mine(level)], "{:.1f}") for level in ("bare", "trial")],
                          f"{ratio(rows, model, 'fit/bare', p):.2f}", f"{ratio(rows, model, 'trial/bare', p):.2f}")
        table.add_row(model, "", "bf16/fp32", *[f"{ratio(rows, model, f'bf16/fp32 {level}'):.2f}x"
                                                for level in ("bare", "fit", "trial", "trial_first")], "", "", "", "")
    return table


def niceness(value: int) -> str:
    return "Ray's worker niceness" if value < 0 else f"nice {value}"


def ratio_line(rows: list[dict], model: str) -> str:
    """One greppable line of a network's ratios."""
    per = "; ".join(f"{p} fit/bare {ratio(rows, model, 'fit/bare', p):.2f} trial/bare "
                    f"{ratio(rows, model, 'trial/bare', p):.2f}" for p in PRECISIONS)
    gain = " ".join(f"{level} {ratio(rows, model, f'bf16/fp32 {level}'):.2f}" for level in ("bare", "fit", "trial"))
    return f"ratios {model}: {per}; bf16/fp32 {gain}"


def packing_line(rows: list[dict], model: str, precision: str) -> str:
    """Which packing wins for a network, in one line."""
    two, one = (median_of(rows, model, level, precision) for level in PACKINGS)
    winner = PACKING_WORDS["pack_2x1" if two >= one else "pack_1x2"]
    return (f"packing {model} {precision}: {PACKING_WORDS['pack_2x1']} {two:.0f} img/s, "
            f"{PACKING_WORDS['pack_1x2']} {one:.0f} img/s: {winner} wins ({max(two, one) / min(two, one):.2f}x)")


# ---------------------------------------------------------------- main

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated, of {', '.join(config.MODELS)} (default: {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--reps", type=int,
                   help=f"timed repetitions per level (default {FULL['reps']}; --quick {QUICK['reps']})")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every level, one trial's CPUs (default 1)")
    p.add_argument("--images", type=int, help="training images per timed pass, every network (default: per network)")
    p.add_argument("--test-images", type=int, help=f"test images each epoch evaluates (default {FULL['test_images']})")
    p.add_argument("--packing-precision", choices=PRECISIONS, default="fp32", help="precision of the packing runs")
    p.add_argument("--clock-ghz", type=float,
                   help="the clock of the peak (default: measured, else sysfs cpufreq max, else /proc/cpuinfo)")
    p.add_argument("--worker-niceness", type=int, help="the nice value of Ray's trial processes (default: Ray's, 15)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--data-dir", default="data", help="real MNIST/CIFAR-10 here if present, else synthetic")
    p.add_argument("--out", default="results/speed", help="folder for roofline-cpu.parquet")
    p.add_argument("--show", metavar="PARQUET", help="print the tables of a saved roofline-cpu.parquet; measure nothing")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(config.MODELS))
    if unknown or not args.models:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(config.MODELS)}")
    sizes = QUICK if args.quick else FULL
    args.reps = sizes["reps"] if args.reps is None else args.reps
    args.test_images = sizes["test_images"] if args.test_images is None else args.test_images
    args.gemm_n = sizes["gemm_n"]
    per_model = lambda m: QUICK["images"] if args.quick else IMAGES.get(m) or DATASET_IMAGES[config.MODELS[m].dataset]
    args.images = {m: per_model(m) if args.images is None else args.images for m in args.models}
    if min(args.reps, args.threads, args.test_images, *args.images.values()) < 1 or (args.clock_ghz or 1) <= 0:
        p.error("--reps, --threads, --images, --test-images and --clock-ghz must be positive")
    return args



def cpu_rows(args, base: dict, peak: dict[str, tuple[float, str]]) -> list[dict]:
    """Rows of the peak a core has and of torch.mm measured on --threads threads, by precision."""
    rows = []
    for p, (flop_s, source) in peak.items():
        gemm = gemm_flop_s(DTYPES[p], args.gemm_n)
        rows += [base | dict(measure="peak_gflop_s", precision=p, value=flop_s / 1e9, threads=1, source=source),
                 base | dict(measure="gemm_gflop_s", precision=p, value=gemm / 1e9, source=f"{args.gemm_n}^3",
                             pct_peak=100 * gemm / (flop_s * args.threads))]
    return rows


def network(name: str, args, arrays: datafiles.Arrays, data_root: Path, run_dir: Path) -> list[dict]:
    """The bare, fit and trial rows of one network: half the in-process repetitions, the trials,
    the other half."""
    arrays = datafiles.subset(arrays, args.images[name])
    half = (args.reps + 1) // 2
    note(f"{name}: {args.images[name]} images x {args.reps} reps, in process, load {os.getloadavg()[0]:.1f}")
    rows = in_process(name, arrays, args.threads, range(0, half))
    note(f"{name}: Ray trials, load {os.getloadavg()[0]:.1f}")
    rows += trial_level(name, args, data_root, run_dir / name)
    note(f"{name}: in process again, load {os.getloadavg()[0]:.1f}")
    return rows + in_process(name, arrays, args.threads, range(half, args.reps))


def measure(args, base: dict, peak: dict[str, tuple[float, str]], path: Path) -> list[dict]:
    """Every row: the CPU's peak, each network's FLOPs and levels, the packings, the ratios;
    the rows so far are written to `path` after each stage."""
    note(f"peak and torch.mm, {args.gemm_n}^3")
    rows = cpu_rows(args, base, peak)
    flops = {name: train_flops(name) for name in args.models}
    rows += [base | dict(measure="gflop_per_image", model=m, value=f / 1e9) for m, f in flops.items()]
    with tempfile.TemporaryDirectory(prefix="raycnn-roofline-") as tmp:
        data = datasets(args, Path(tmp) / "data")
        meta = {m: dict(images=args.images[m], data=data[config.MODELS[m].dataset][1]) for m in args.models}
        for name in args.models:
            raw = network(name, args, data[config.MODELS[name].dataset][0], Path(tmp) / "data", Path(tmp) / "runs")
            rows += [images_row(base | meta[name], r, flops, peak) for r in raw]
            results.write_parquet(rows, path)
        rows += [images_row(base | meta[r["model"]], r, flops, peak)
                 for r in packing(args, Path(tmp) / "data", Path(tmp) / "runs")]
    for name in args.models:
        rows += [base | meta[name] | r for r in ratio_rows(rows, name)]
    results.write_parquet(rows, path)
    return rows


def show(rows: list[dict], args) -> None:
    """The peak lines, the table of levels, a line of ratios and one of packing per network."""
    for line in peak_lines(rows, args.threads):
        console.print(line, markup=False, highlight=False)
    console.print(level_table(rows, args.models))
    for line in [ratio_line(rows, name) for name in args.models] + \
                [packing_line(rows, name, args.packing_precision) for name in args.models]:
        console.print(line, markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.show:
        import pyarrow.parquet as pq
        rows = pq.read_table(args.show).to_pylist()
        saved = rows[0]
        args.models = list(dict.fromkeys(r["model"] for r in rows if r["model"]))
        args.threads, args.packing_precision = saved["threads"], next(
            (r["precision"] for r in rows if r["level"] == "pack_2x1"), args.packing_precision)
        show(rows, args)
        return 0
    torch.set_num_threads(args.threads)
    if args.worker_niceness is not None:      # read by the raylet run_trials starts
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    facts = cpu_facts()
    peak = peaks_per_core(facts, args.clock_ghz)
    base = dict(device="cpu", cpu=facts.get("model name", "") or "cpu", measure="", model="", level="",
                precision="", value=math.nan, rep=0, pct_peak=math.nan, images=0, threads=args.threads,
                source="", data="", quick=args.quick, reps=args.reps, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                worker_niceness=-1 if args.worker_niceness is None else args.worker_niceness,
                load_1min=os.getloadavg()[0], **provenance())
    path = Path(args.out) / "roofline-cpu.parquet"
    try:
        rows = measure(args, base, peak, path)
    except (RunError, TrialsFailed) as e:      # Ray did not start, or a trial failed: the rows so far are in path
        print(f"roofline: {e}", file=sys.stderr)
        return 1
    show(rows, args)
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
