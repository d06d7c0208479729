#!/usr/bin/env python3
"""Project the wall time of the report's whole grid from short measured runs.

    python benchmarks/project.py RUN_DIR [RUN_DIR ...] [--speed FILE ...]
                                 [--gpus 1] [--cpus N] [--against RUN_DIR ...] [--out FILE.parquet]

RUN_DIRs are run folders of `raycnn run` (e.g. one epoch of each suite with --synthetic, whose
data have the real sizes). From their Parquet files each trial's training images/s, evaluation
time and set-up time are read; a trial's epoch on the full training split then takes
`train_size / images_per_s + eval_seconds`, and a trial takes `setup + epochs x epoch` at the
report's epochs (10 for mnist and pretrained, 30 for cifar10; zero-shot: one evaluation;
early stopping is assumed not to fire). Trials of the bundled suites that were not run borrow
the mean of measured trials of the same model; with none, they are left out and counted.

The trials are then scheduled first-fit, in suite order, on `--gpus` GPUs by their GPU share
(runs on the CPU: on `--cpus` CPUs, the run's --num-cpus, by cpus_per_trial), as Tune's FIFO
scheduling does. With `--speed` (Parquet files of benchmarks/packing.py and of the Ray-overhead
benchmark; repeatable, their rows are pooled) Ray's per-trial overhead and
start-up are added, and the light trials (those with the smallest share, the small nets) are
also projected at the packing k that trained the most images/s in all there (k x a trial's
images/s), their epochs scaled by a trial's images/s at their measured packing against at k.
Measured times come from each trial's first epochs, warm-up included, so they err long.
With `--against RUN_DIR ...` (full runs at the report's epochs) the projected trial-hours are
printed beside the measured ones, per model and in all, with their ratio, and in all
the wall time of each set packed first-fit at the trials' shares.
"""
from __future__ import annotations

import argparse
import heapq
import math
import os
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a checkout that is not installed

from rich.console import Console
from rich.table import Table

from raycnn import config
from raycnn import results, suites

console = Console()


def grid() -> pd.DataFrame:
    """Every trial of the bundled suites: name, suite, model, dataset, report epochs, shares."""
    rows = []
    for path in suites.bundled().values():
        for t in suites.load(path).trials:
            rows.append(dict(name=t.name, suite=t.suite, model=t.config.model, dataset=t.config.dataset_name,
                             epochs=t.config.epochs, zero_shot=t.config.finetune == "zero-shot",
                             declared_gpus=t.gpus_per_trial, cpus=t.cpus_per_trial, order=len(rows)))
    return pd.DataFrame(rows)


def _per_trial(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """One run's measurements, one row per trial name (means over repeats and epochs)."""
    keys = ["name", "repeat"]
    e = epochs.merge(trials[keys + ["max_train_samples", "dataset", "batch_size"]], on=keys)
    full = e["dataset"].map(lambda d: config.SIZES[d][0])
    n = e["max_train_samples"].where(e["max_train_samples"] > 0, full).clip(upper=full)
    n = n - (n % e["batch_size"] == 1)               # train_one_epoch drops a last batch of one
    trained = e["epoch"] >= 1                        # epoch 0: a zero-shot trial's one evaluation
    train_s = (n / e["images_per_s"]).where(trained, 0.0)
    e = e.assign(eval_s=(e["seconds"] - train_s).clip(lower=0.0), ips=e["images_per_s"].where(trained))
    per_epoch = e.groupby("name").agg(images_per_s=("ips", "mean"), eval_s=("eval_s", "mean"))
    # Set-up: what a trial spent outside its epochs (building the model, moving data to the device).
    in_epochs = e.groupby(keys)["seconds"].sum().rename("in_epochs")
    t = trials.join(in_epochs, on=keys)
    t["setup_s"] = (t["wall_seconds"] - t["in_epochs"]).clip(lower=0.0)
    # A GPU run is placed by its GPU share, a CPU run by cpus_per_trial (shares()).
    per_trial = t.groupby("name").agg(setup_s=("setup_s", "mean"), gpus=("gpus_per_trial", "first"),
                                      device=("device", "first"))
    return per_epoch.join(per_trial)


def _later_wins(parts: list):
    """Frames or series indexed by trial name, one per RUN_DIR, joined; for a trial in several,
    the later RUN_DIR wins (as on `raycnn table`'s command line)."""
    df = pd.concat(parts)
    return df[~df.index.duplicated(keep="last")]


def measured(run_dirs: list[str]) -> pd.DataFrame:
    """Per trial name, from all RUN_DIRs (a later folder wins for a trial run twice)."""
    return _later_wins([_per_trial(*results.load_run(d)) for d in run_dirs])


def estimate(grid_df: pd.DataFrame, meas: pd.DataFrame) -> pd.DataFrame:
    """The grid with each trial's measurements: its own, or its model's mean ("model mean")."""
    df = grid_df.join(meas, on="name")
    df["source"] = df["images_per_s"].notna().map({True: "measured", False: "missing"})
    df.loc[df["zero_shot"] & df["eval_s"].notna(), "source"] = "measured"
    means = df[df["source"] == "measured"].groupby("model")[["images_per_s", "eval_s", "setup_s"]].mean()
    borrow = (df["source"] == "missing") & df["model"].isin(means.index) & ~df["zero_shot"]
    for col in means.columns:      # where(), not .loc: with nothing to borrow, .loc casts an empty str column
        df[col] = df[col].where(~borrow, df["model"].map(means[col]))
    df.loc[borrow, "source"] = "model mean"
    return df


def durations(df: pd.DataFrame, overhead: float) -> pd.DataFrame:
    """Epoch on the full split and whole-trial seconds at the report's epochs."""
    train = df["dataset"].map(lambda d: config.SIZES[d][0]) / df["images_per_s"]
    df["epoch_s"] = (train + df["eval_s"]).where(~df["zero_shot"], df["eval_s"])
    df["epochs_s"] = df["epochs"].where(~df["zero_shot"], 1) * df["epoch_s"]
    df["trial_s"] = df["setup_s"] + overhead + df["epochs_s"]
    return df


def shares(df: pd.DataFrame, gpus: float, cpus: int) -> pd.Series:
    """Each trial's fraction of the machine: its GPU share over --gpus, or CPUs over --cpus."""
    # A CPU run records its suite's declared GPU share too (unused there): only the device says
    # whether the trials ran on a GPU.
    if df["device"].fillna("").str.startswith("cuda").any():
        g = df["gpus"].where(df["gpus"].fillna(0) > 0, df["declared_gpus"])
        return (g / gpus).clip(upper=1.0)
    return (df["cpus"] / cpus).clip(upper=1.0)


def simulate(trial_s: list[float], share: list[float]) -> float:
    """Wall seconds of running the trials first-fit in order on a machine of capacity 1."""
    pending, running, now, free = list(zip(trial_s, share)), [], 0.0, 1.0
    while pending or running:
        fits = next((i for i, (_, s) in enumerate(pending) if s <= free + 1e-9), None)
        if fits is not None:                  # start the first pending trial that fits now
            d, s = pending.pop(fits)
            heapq.heappush(running, (now + d, s))
            free -= s
            continue
        now, s = heapq.heappop(running)       # else wait for the next trial to end
        free += s
    return now


def packing_curve(speed: pd.DataFrame) -> dict[int, float]:
    """Training images/s of one trial at each measured concurrency k (benchmarks/packing.py)."""
    rows = speed[speed["measure"] == "trial_images_per_s"]
    return rows.groupby("concurrency")["value"].median().to_dict()


def repack(df: pd.DataFrame, curve: dict[int, float]) -> tuple[pd.DataFrame, int | None]:
    """The light trials moved to the packing k with the most images/s in all (k x per-trial
    images/s); their epochs slowed or sped by the per-trial images/s at their measured packing
    against at k. Set-up and Ray's per-trial overhead do not change."""
    if not curve:
        return df, None
    best = max(curve, key=lambda k: k * curve[k])
    light = df["share"] <= df["share"].min() + 1e-9
    at = (1 / df["share"]).round().astype(int)
    known = light & at.isin(list(curve))
    out = df.copy()
    out.loc[known, "epochs_s"] = df.loc[known, "epochs_s"] * at[known].map(curve) / curve[best]
    out.loc[known, "trial_s"] = df.loc[known, "trial_s"] - df.loc[known, "epochs_s"] + out.loc[known, "epochs_s"]
    out.loc[known, "share"] = 1 / best
    return out, best


def speed_overheads(paths: list[str] | None) -> tuple[pd.DataFrame, float, float]:
    """(speed rows, Ray's overhead per trial without start-up, start-up + shutdown per run);
    no rows and zeros without speed files (or with ones that lack the Ray part)."""
    frames = [pd.DataFrame(columns=["measure", "variant", "value", "concurrency"])]
    for path in paths or []:
        if Path(path).is_file():
            frames.append(pd.read_parquet(path))
        else:
            console.print(f"[yellow]project: no speed file {path}: left out[/]")
    speed = pd.concat(frames, ignore_index=True)
    if "variant" not in speed:
        speed["variant"] = ""

    def median(measure: str, variant: str | None = None) -> float:
        rows = speed[(speed["measure"] == measure) & ((speed["variant"] == variant) if variant else True)]
        return float(rows["value"].median()) if len(rows) else 0.0
    per_trial = max(0.0, median("ray_overhead_s_per_trial", "ray-excl-startup"))   # noise can make it < 0
    return speed, per_trial, median("ray_startup_s") + median("ray_shutdown_s")


def against(df: pd.DataFrame, run_dirs: list[str]) -> pd.DataFrame:
    """The projected trial seconds beside the measured ones: per grid trial, the mean
    wall_seconds over its repeats that ended ok at the report's epochs in RUN_DIRs (a later
    folder wins, as in `raycnn table`). Trials no such run has are left out."""
    budget = df.set_index("name")["epochs"]
    rows = []
    for d in run_dirs:
        trials, _ = results.load_run(d)
        done = trials[(trials["status"] == "ok") & (trials["epochs"] == trials["name"].map(budget))]
        rows.append(done.groupby("name")["wall_seconds"].mean())
    meas = _later_wins(rows).rename("measured_s")
    out = df.join(meas, on="name")
    return out[out["measured_s"].notna() & out["trial_s"].notna()]


def against_table(both: pd.DataFrame) -> Table:
    """Per model and in all: projected and measured trial-hours and their ratio; in all, also
    the wall time of each packed first-fit at the trials' shares (the schedule Tune runs)."""
    table = Table("model", "trials", "projected trial-hours", "measured trial-hours", "measured / projected",
                  "projected wall", "measured trials' wall", title="The projection against full runs at the report's epochs")
    parts = [*both.groupby("model", sort=False), ("all", both)]
    for model, part in parts:
        p, m = part["trial_s"].sum() / 3600, part["measured_s"].sum() / 3600
        walls = ["", ""]
        if model == "all":
            walls = [_hms(simulate(part[col].tolist(), part["share"].tolist())) for col in ("trial_s", "measured_s")]
        table.add_row(str(model), str(len(part)), f"{p:.2f}", f"{m:.2f}", f"{m / p:.2f}", *walls)
    return table


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "—"
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def trial_table(df: pd.DataFrame) -> Table:
    """The per-trial numbers the projection is made of."""
    table = Table("trial", "model", "source", "share", "img/s", "epoch s (full split)", "epochs", "trial s",
                  title="Per-trial epoch times (measured, or the model's mean) and projected trial times")
    for r in df.itertuples():
        fmt = lambda v, f="{:.1f}": "—" if pd.isna(v) else f.format(v)
        table.add_row(r.name, r.model, r.source, fmt(r.share, "{:.3g}"), fmt(r.images_per_s, "{:.0f}"),
                      fmt(r.epoch_s, "{:.2f}"), "1 (eval)" if r.zero_shot else str(r.epochs), fmt(r.trial_s))
    return table


def summary_rows(df: pd.DataFrame, packed: pd.DataFrame, fixed: float) -> list[dict]:
    """Per suite (each as its own run) and for the whole grid as one run: projected wall seconds
    at the measured shares and at the best packing."""
    rows = []
    for suite, part in [*df.groupby("suite", sort=False), ("all (one run)", df)]:
        ok = part[part["trial_s"].notna()]
        keep = packed.loc[ok.index]
        wall = lambda d: simulate(d["trial_s"].tolist(), d["share"].tolist()) + fixed if len(d) else math.nan
        rows.append(dict(level="suite" if suite != "all (one run)" else "grid", suite=suite,
                         trials=len(part), measured=int((part["source"] == "measured").sum()),
                         borrowed=int((part["source"] == "model mean").sum()), missing=int(part["trial_s"].isna().sum()),
                         trial_hours=ok["trial_s"].sum() / 3600,
                         wall_s_measured_packing=wall(ok), wall_s_best_packing=wall(keep)))
    return rows


def summary_table(rows: list[dict], best: int | None) -> Table:
    best_text = f"light trials {best} per device" if best else "no --speed: as measured"
    table = Table("suite", "trials", "measured", "model mean", "left out", "trial-hours", "wall, measured packing",
                  f"wall, best packing ({best_text})", title="Projected wall time at the report's epochs")
    for r in rows:
        table.add_row(r["suite"], str(r["trials"]), str(r["measured"]), str(r["borrowed"]), str(r["missing"]),
                      f"{r['trial_hours']:.2f}", _hms(r["wall_s_measured_packing"]), _hms(r["wall_s_best_packing"]))
    return table


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", help="run folders with trials.parquet and epochs.parquet")
    p.add_argument("--speed", action="append", help="Parquet of benchmarks/packing.py (the packing curve) or of "
                                                     "the Ray-overhead benchmark (repeatable)")
    p.add_argument("--gpus", type=float, default=1.0, help="GPUs to schedule GPU trials on (default 1)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="CPUs to schedule CPU-run trials on: the runs' --num-cpus (default: this machine's)")
    p.add_argument("--against", nargs="+", metavar="RUN_DIR", default=[],
                   help="full runs at the report's epochs: print their measured trial-hours beside the projection")
    p.add_argument("--out", help="write the per-trial and summary rows here (Parquet)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    speed, overhead, fixed = speed_overheads(args.speed)
    try:
        df = durations(estimate(grid(), measured(args.run_dirs)), overhead)
        df["share"] = shares(df, args.gpus, args.cpus)
        both = against(df, args.against) if args.against else None
    except results.ResultsError as e:
        print(f"project: {e}", file=sys.stderr)
        return 2
    packed, best = repack(df, packing_curve(speed))
    console.print(trial_table(df))
    rows = summary_rows(df, packed, fixed)
    console.print(summary_table(rows, best))
    console.print(f"Ray overhead per trial {overhead:.2f} s, start-up + shutdown {fixed:.2f} s per run"
                  + ("" if args.speed else " (no --speed: not included)"))
    if both is not None:
        console.print(against_table(both))
    if args.out:
        trial_rows = df.assign(level="trial", trial_s_best_packing=packed["trial_s"], share_best=packed["share"],
                               best_packing=best or 0)
        results.write_parquet(pd.concat([trial_rows, pd.DataFrame(rows)], ignore_index=True), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
