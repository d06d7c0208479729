#!/usr/bin/env python3
"""What ASHA saves on one cell: the same samples searched under ASHA and trained in full.

    python benchmarks/search_cost.py CELL [--suite SUITE|FILE] [--samples N] [--repeats N]
                                     [--epochs N] [--max-train-samples N] [--data-dir DIR | --synthetic]
                                     [--num-cpus N] [--max-concurrent N] [--work DIR] [--out results/speed]

Three commands, run as a user runs them, each timed from start to exit (Ray's start included):
1. ASHA: `raycnn search CELL --samples N` with an epochs cap no sample can reach (N x the cell's
   epochs), so only ASHA stops samples; then its re-run of the best config with --repeats seeds.
2. The full grid of the same samples: every configuration the search drew, as one suite of
   trials (`raycnn run`), each trained to the last epoch on the same validation split, never
   scored on the test set; the best by validation accuracy at the last epoch, ASHA's rule.
3. That best config re-run as the search re-runs its own: the seeds after the search's, the
   whole training set, the test set (`raycnn run --repeats`).

It prints, per path, the epochs the samples trained, the wall time (search + re-run) and the
re-run's test accuracy (mean ± std over seeds), then the savings ratio: the grid's epochs over
ASHA's, and the same for wall time. Rows go to OUT/search-cost.parquet (path, cell, samples,
sample_epochs, rerun_epochs, wall_s, best_lr, rerun_acc_mean, rerun_acc_std, seeds, data,
created, provenance), appended to the rows there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a checkout that is not installed

from raycnn import results, search, space, suites
from raycnn.config import TrainConfig
from raycnn.provenance import provenance

RAYCNN = [sys.executable, "-m", "raycnn.cli"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cell", help="one cell of the grid, e.g. mnist/base/sgd/lr0.001")
    p.add_argument("--suite", default="all")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--max-concurrent", type=int)
    p.add_argument("--work", help="folder for the three runs (default: a temporary one)")
    p.add_argument("--out", default="results/speed")
    return p.parse_args(argv)


def run(*args) -> float:
    """One raycnn command to its end; its wall seconds. Exits with its output if it failed."""
    start = time.perf_counter()
    done = subprocess.run([*RAYCNN, *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"search_cost: {' '.join(map(str, args[:2]))} failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - start


def common(args) -> list:
    """The options every command of the comparison shares."""
    out = ["--data-dir", args.data_dir] + (["--synthetic"] if args.synthetic else [])
    out += ["--num-cpus", args.num_cpus] if args.num_cpus else []
    return out + (["--max-concurrent", args.max_concurrent] if args.max_concurrent else [])


def toml_suite(name: str, config: dict, trials: list[tuple[str, dict]]) -> str:
    """A suite file: `config` as its defaults, one trial per (name, fields). JSON's numbers,
    strings, booleans and lists are TOML's."""
    lines = [f'[suite]\nname = "{name}"\ncpus_per_trial = 1\n', "[defaults]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in config.items()]
    for trial, fields in trials:
        lines += ["", "[[trials]]", f'name = "{trial}"'] + [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def rerun_acc(run_dir: Path) -> tuple[float, float, int, int]:
    """Test accuracy of a re-run: mean and std over seeds, seeds, epochs trained."""
    trials, _ = results.load_run(run_dir)
    acc = trials["final_test_acc"]
    return acc.mean(), acc.std(), len(trials), int(trials["epochs_done"].sum())


def asha(args, work: Path) -> dict:
    """The search under ASHA alone (a cap no sample reaches), with its re-run."""
    extra = [f"--{k.replace('_', '-')}" for k in ("epochs", "max_train_samples") if getattr(args, k)]
    values = [getattr(args, k) for k in ("epochs", "max_train_samples") if getattr(args, k)]
    cell = next(t for p in suites.resolve(args.suite) for t in suites.load(p).trials if t.name == args.cell)
    epochs = args.epochs or cell.config.epochs
    wall = run("search", args.cell, "--suite", args.suite, "--samples", args.samples, "--repeats", args.repeats,
               "--budget", args.samples * epochs, *[x for pair in zip(extra, values) for x in pair], *common(args),
               "--results-dir", work, "--name", "asha")
    samples, _ = search.load_samples(work / "asha")
    mean, std, seeds, rerun_epochs = rerun_acc(work / "asha")
    doc = search.read(work / "asha")
    return {"path": "asha", "samples": len(samples), "sample_epochs": int(samples["epochs_done"].sum()),
            "rerun_epochs": rerun_epochs, "wall_s": wall, "best_lr": doc["cells"][0]["best"]["values"].get("lr"),
            "rerun_acc_mean": mean, "rerun_acc_std": std, "seeds": seeds, "doc": doc, "sampled": samples}


def grid(args, work: Path, found: dict) -> dict:
    """The same samples, each trained to its last epoch; the best by validation accuracy re-run."""
    [cell] = found["doc"]["cells"]
    domains = space.from_json(cell["space"])
    sampled = found["sampled"].sort_values("sample")
    plain = lambda v: v.item() if hasattr(v, "item") else v          # numpy scalars from Parquet
    trials = [(f"s{int(r['sample']):03d}", {k: plain(r[k]) for k in domains}) for _, r in sampled.iterrows()]
    (work / "grid.toml").write_text(toml_suite("grid", cell["config"], trials))
    wall = run("run", work / "grid.toml", *common(args), "--results-dir", work, "--name", "grid")
    trials_df, epochs = results.load_run(work / "grid")
    last = epochs.sort_values("epoch").groupby("name").tail(1).set_index("name")
    best = last["val_acc"].idxmax()
    values = dict(next(f for n, f in trials if f"grid/{n}" == best))
    config = space.apply(TrainConfig.from_dict(cell["config"]), values)
    rerun = json.loads(json.dumps(config.to_dict())) | {"val_fraction": 0.0, "evaluate_test": True, "seed": found["doc"]["settings"]["seed"] + 1}
    (work / "rerun.toml").write_text(toml_suite("rerun", rerun, [("best", {})]))
    wall += run("run", work / "rerun.toml", "--repeats", args.repeats, *common(args), "--results-dir", work,
                "--name", "grid-rerun")
    mean, std, seeds, rerun_epochs = rerun_acc(work / "grid-rerun")
    return {"path": "grid", "samples": len(trials), "sample_epochs": int(trials_df["epochs_done"].sum()),
            "rerun_epochs": rerun_epochs, "wall_s": wall, "best_lr": values.get("lr"),
            "rerun_acc_mean": mean, "rerun_acc_std": std, "seeds": seeds}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="search-cost-") as tmp:
        work = Path(args.work or tmp).resolve()
        found = asha(args, work)
        full = grid(args, work, found)
    rows = [{k: v for k, v in r.items() if k not in ("doc", "sampled")} for r in (found, full)]
    print(f"{'path':6} {'samples':>7} {'epochs trained':>14} {'re-run epochs':>13} {'wall s':>8}  re-run test acc")
    for r in rows:
        print(f"{r['path']:6} {r['samples']:7d} {r['sample_epochs']:14d} {r['rerun_epochs']:13d} {r['wall_s']:8.0f}  "
              f"{100 * r['rerun_acc_mean']:.2f} ± {100 * r['rerun_acc_std']:.2f} ({r['seeds']} seeds)")
    epochs_ratio = full["sample_epochs"] / found["sample_epochs"]
    wall_ratio = full["wall_s"] / found["wall_s"]
    print(f"savings ratio: the full grid trains {epochs_ratio:.2f}x the epochs of ASHA's search "
          f"({wall_ratio:.2f}x the wall time, re-runs included)")
    meta = {"cell": args.cell, "data": "synthetic" if args.synthetic else args.data_dir,
            "created": pd.Timestamp.now(tz="UTC").isoformat(), "load_1min": os.getloadavg()[0], **provenance()}
    frame = pd.DataFrame([r | meta | {"epochs_ratio": epochs_ratio, "wall_ratio": wall_ratio} for r in rows])
    out = Path(args.out) / "search-cost.parquet"
    if out.exists():
        frame = pd.concat([pd.read_parquet(out), frame], ignore_index=True)
    results.write_parquet(frame, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
