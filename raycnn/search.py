"""A search's run folder: its plan (RUN/search.json), its samples' rows, the best config and its
re-run; Ray-free and torch-free, so a search's results read like a run's.

`raycnn search` plans each matched cell once: its space (`raycnn.space`), the sample config
(validation split held out, test split never evaluated), its epochs cap and ASHA's rungs. The
plan is JSON, written before any sample trains, and `--resume` refuses a command line that would
plan anything else. Each cell's samples are one Tune experiment, RUN/tune/search-CELL, one trial
folder per sample. When a cell's search ends its best sample is written into the plan; the best
configs are then re-run with fresh seeds on the whole training set and scored on the test set,
as an ordinary run's plan (RUN/plan.json, RUN/tune/experiment, trials.parquet), so the re-run's
rows are the run's rows and `raycnn table RUN` reads them as it reads any run.

RUN/samples.parquet has one row per sample (config, rung reached, why it stopped, the metric,
seed, provenance), RUN/sample_epochs.parquet one per sample and epoch.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from raycnn import experiment, plan, results, space, storage
from raycnn.config import TrainConfig
from raycnn.errors import ResultsError, RunError
from raycnn.outcome import outcome
from raycnn.storage import Place

SEARCH_FILE = "search.json"
SAMPLES = ("samples.parquet", "sample_epochs.parquet")
STOPS_FILE = "stops.json"          # in a cell's experiment: the samples ASHA stopped, by folder
# --metric: what selects, and which way is better. Never a test metric: the search must not
# select on the test set.
METRICS = {"val_acc": "max", "val_loss": "min"}
# What differs on --resume (a setting, or a key of a cell's plan), as the option that sets it.
OPTION_OF = {"samples": "--samples", "grace": "--grace", "metric": "--metric", "val_fraction": "--val-fraction",
             "repeats": "--repeats", "seed": "--seed", "budget": "--budget", "rungs": "--grace",
             "reduction_factor": "reduction_factor (the space)", "space": "the search space (--space)",
             "searcher": "the searcher (optuna installed, or not)", "inputs": "--data-dir (other data)",
             "cpus": "--cpus-per-trial", "gpus": "--gpus-per-trial",
             "config": "the cell's config (--epochs, --max-train-samples, --precision, --synthetic, ...)"}
FREE = {"data_dir", "checkpoint_every"}      # config fields a resume may change: where, not what

def rungs(grace: int, factor: float, epochs: int) -> list[int]:
    """The epochs at which ASHA may stop a sample: grace * factor**k below the last epoch, the
    milestones of Tune's ASHAScheduler (one bracket)."""
    count = int(math.log(epochs / grace) / math.log(factor) + 1) if epochs >= grace else 0
    return [m for m in (int(grace * factor ** k) for k in range(count)) if m < epochs]


def plan_doc(trials: list, searches: dict, args: dict, searcher: str) -> dict:
    """The search plan (search.json) for `trials` (raycnn.suites.Trial, with resources
    applied), each searched over its suite's space (`searches`: suite name -> raycnn.space.Search);
    `args` the command line's settings, None where not given (then the space's own)."""
    first = searches[trials[0].suite].settings
    settings = {"metric": args["metric"], "seed": args["seed"], "searcher": searcher,
                "repeats": args["repeats"] or first["repeats"]}
    entries = plan.entries(trials, 1)
    return {"settings": settings,
            "cells": [cell_plan(t, e, searches[t.suite], args) for t, e in zip(trials, entries)]}


def cell_plan(trial, entry: dict, search: space.Search, args: dict) -> dict:
    """One cell's part of the plan: its entry (as a run's plan has it), the config its samples
    start from (validation split held out, no test evaluation, the search's seed), its space,
    ASHA's settings and rungs, and its cap of epochs."""
    own = {k: v if args.get(k) is None else args[k] for k, v in search.settings.items()}
    config = TrainConfig.from_dict(entry["config"])
    domains = space.resolve(search, trial.name, config)
    sample = replace(config, val_fraction=own["val_fraction"], evaluate_test=False, seed=args["seed"]).validate()
    budget = args.get("budget") or int(math.ceil(own["budget_runs"] * config.epochs))
    return entry | {"config": json.loads(json.dumps(sample.to_dict())),
                    "space": {k: d.to_json() for k, d in domains.items()},
                    "samples": own["samples"], "grace": min(own["grace"], config.epochs),
                    "reduction_factor": own["reduction_factor"], "budget": budget,
                    "rungs": rungs(min(own["grace"], config.epochs), own["reduction_factor"], config.epochs)}


def path(run_dir: str | Path | Place) -> Place:
    """Where a search keeps its plan."""
    return storage.resolve(run_dir) / SEARCH_FILE


def write(run_dir: str | Path | Place, doc: dict) -> None:
    """Write the search's plan (JSON: reading a run folder never runs code)."""
    path(run_dir).write_text(json.dumps(doc, indent=1) + "\n")


def read(run_dir: str | Path | Place) -> dict:
    """A search's plan; ResultsError in one line if it is missing or unreadable."""
    try:
        doc = json.loads(path(run_dir).read_text())
        return {"settings": dict(doc["settings"]), "cells": list(doc["cells"]), "inputs": dict(doc.get("inputs", {}))}
    except FileNotFoundError:
        raise ResultsError(f"{run_dir} has no {SEARCH_FILE}: not a search folder raycnn made") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResultsError(f"cannot read {path(run_dir)}: {e}") from None


def is_search(run_dir: str | Path | Place) -> bool:
    """Whether a run folder is a search's (it has a search plan)."""
    return path(run_dir).is_file()


def check_resume(saved: dict, new: dict) -> None:
    """RunError in one line if a resume would search anything else than the saved plan."""
    same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)   # NaN == NaN, as saved
    differ = lambda a, b: {k for k in set(a) | set(b) if k != "best" and not same(a.get(k), b.get(k))}
    changed = differ(saved["settings"], new["settings"]) | differ(saved, new) - {"settings", "cells"}
    if [c["name"] for c in saved["cells"]] != [c["name"] for c in new["cells"]]:
        changed.add("the cells (CELL-GLOB)")
    for old, cur in zip(saved["cells"], new["cells"]):
        strip = lambda cell: cell | {"config": {k: v for k, v in cell["config"].items() if k not in FREE}}
        changed |= differ(strip(old), strip(cur))
    if changed:
        raise RunError(f"--resume with other options than the search started with would change its results: "
                       f"{', '.join(sorted(OPTION_OF.get(k, k) for k in changed))}; resume with the search's own "
                       f"options (its search.json) or start anew")


def experiment_dir(run_dir: str | Path | Place, cell: dict) -> Place:
    """The Tune experiment of one cell's samples."""
    return storage.resolve(run_dir) / "tune" / f"search-{cell['name'].replace('/', '-')}"


def sample_folder(tag: str) -> str:
    """A sample's trial folder from its Tune experiment tag ("3_lr=0.01,..." -> sample-003)."""
    return f"sample-{int(tag.split('_', 1)[0]):03d}"


def stops(exp: Place) -> dict:
    """The samples ASHA stopped before their last epoch, by folder: the epoch it stopped them at."""
    try:
        return json.loads((exp / STOPS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def record_stop(exp: Place, folder: str, epoch: int) -> None:
    """Note that ASHA stopped the sample in `folder` at `epoch` (the driver's own file, read by
    `sample_rows`: Tune keeps no such record)."""
    (exp / STOPS_FILE).write_text(json.dumps(stops(exp) | {folder: epoch}) + "\n", durable=False)


# ---------------------------------------------------------------- rows

# Why a sample ended, first match wins: (test on the row, reason).
STOP_REASONS = (
    (lambda r, c: r["status"] == "error", "error"),
    (lambda r, c: r["status"] == "diverged", "diverged"),
    (lambda r, c: r["finished"], "completed"),
    (lambda r, c: r["stopped_at"] is not None, "asha"),
    (lambda r, c: c["spent"] >= c["budget"], "budget"),
)


def sample_rows(run_dir: str | Path | Place, cell: dict) -> tuple[list[dict], list[dict]]:
    """One cell's sample rows and epoch rows, from its experiment folder (one listing of it)."""
    exp = experiment_dir(run_dir, cell)
    there = exp.tree()
    domains = space.from_json(cell["space"])
    states, stopped = experiment.tune_states(exp, there), stops(exp)
    found = []
    for name in sorted({rel.split("/")[0] for rel in there if rel.startswith("sample-") and "/" in rel}):
        try:
            sampled = space.decode(json.loads((exp / name / "params.json").read_text()), domains)
        except (OSError, ValueError, KeyError):
            continue              # not started (yet)
        reports = experiment._reports(exp / name / "result.json")
        found.append((name, sampled, reports, f"{name}/error.txt" in there))
    spent = sum(r[-1]["epoch"] for _, _, r, _ in found if r)
    rows, epoch_rows = [], []
    for number, (folder, sampled, reports, errored) in enumerate(found, 1):
        row = _sample_row(cell, number, folder, sampled, reports, states.get(folder), stopped, errored)
        row["stop"] = next((why for test, why in STOP_REASONS if test(row, {**cell, "spent": spent})), "running")
        if row["stop"] in ("asha", "budget") and row["status"] == "running":
            row["status"] = "ok"     # Tune ended it between two epochs: the trainer's last word was "running"
        rows.append(row)
        epoch_rows += [{"name": cell["name"], "sample": number} | {k: r.get(k) for k in experiment.EPOCH_FIELDS}
                       for r in reports]
    return rows, epoch_rows


def _sample_row(cell: dict, number: int, folder: str, sampled: dict, reports: list[dict], state: str | None,
                stopped: dict, errored: bool) -> dict:
    last = reports[-1] if reports else {}
    metric = cell["metric"]
    verdict = last.get("summary") or outcome([])
    failed = errored and state in (None, "ERROR")
    status = "error" if failed else verdict["status"]
    epochs = last.get("epoch", 0)
    values = [r.get(metric, math.nan) for r in reports]
    return {k: cell[k] for k in experiment.TRIAL_FIELDS if k != "repeat"} | cell["config"] | sampled | {
        "sample": number, "folder": folder, "searched": ",".join(sampled), "status": status,
        "finished": bool(last.get("finished")), "epochs_done": epochs,
        "rung": sum(epochs >= m for m in cell["rungs"]), "stopped_at": stopped.get(folder),
        "metric": metric, "metric_value": values[-1] if values else math.nan,
        "wall_seconds": last.get("time_total_s", math.nan), "node": last.get("node", ""),
        "device": last.get("device", ""), "precision": last.get("precision", ""),
        "images_per_s": verdict.get("images_per_s", math.nan),
        **{k: last.get(k, "") for k in experiment.PROVENANCE}}


def best(rows: list[dict], mode: str) -> dict | None:
    """The sample whose config is re-run: among those that trained furthest, the best metric at
    its last epoch (a sample ASHA stopped early is not compared with one trained to the end)."""
    sign = 1 if mode == "max" else -1
    scored = [r for r in rows if isinstance(r["metric_value"], float) and math.isfinite(r["metric_value"])]
    return max(scored, key=lambda r: (r["epochs_done"], sign * r["metric_value"]), default=None)


def write_samples(run_dir: str | Path | Place) -> tuple[list[dict], list[dict]]:
    """(Re)write samples.parquet and sample_epochs.parquet from the plan and Tune's folders."""
    doc = read(run_dir)
    rows, epoch_rows = [], []
    for cell in doc["cells"]:
        r, e = sample_rows(run_dir, cell | {"metric": doc["settings"]["metric"]})
        rows += r
        epoch_rows += e
    if rows:
        results.write_run(run_dir, rows, epoch_rows, files=SAMPLES)
    return rows, epoch_rows


def rerun_trials(doc: dict, trials: dict) -> list:
    """The cells' re-run: each searched cell (raycnn.suites.Trial, by name) with its best
    sample's values, on the whole training set, scored on the test set, with fresh seeds (the
    samples train with the base seed; the re-run's repeats take the next ones)."""
    out = []
    for cell in doc["cells"]:
        if not cell.get("best"):
            continue
        t = trials[cell["name"]]
        config = space.apply(t.config, cell["best"]["values"])
        out.append(replace(t, config=replace(config, val_fraction=0.0, evaluate_test=True,
                                             seed=doc["settings"]["seed"] + 1).validate()))
    return out


def load_samples(run_dir: str | Path | Place):
    """(samples, sample epochs) of a search folder, as DataFrames."""
    return results.load_run(run_dir, files=SAMPLES)


def config_text(values: dict) -> str:
    """A best config as one short line: "lr=0.0123 momentum=0.91 milestones=[15, 25]"."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def summary(run_dir: str | Path | Place) -> list[dict]:
    """One row per searched cell: where it sits in the report, the report's number, the
    samples and epochs the search spent, the best config, and the re-run's mean, std and
    count over seeds (NaN where the re-run has not finished) beside the seeds it plans.
    Without pandas, as `raycnn table` reads runs."""
    from raycnn import tables
    doc, run_dir = read(run_dir), storage.resolve(run_dir)
    samples = results.read_rows(run_dir, files=SAMPLES)[0] if (run_dir / SAMPLES[0]).is_file() else []
    rerun = results.read_rows(run_dir)[0] if (run_dir / results.TRIALS_FILE).is_file() else []
    folded = {c["name"]: c for c in tables.fold_repeats(rerun)} if rerun else {}
    rows = []
    for cell in doc["cells"]:
        mine = [s for s in samples if s["name"] == cell["name"]]
        ran = [r for r in rerun if r["name"] == cell["name"]]
        tuned, best_ = folded.get(cell["name"], {}), cell.get("best") or {}
        rows.append({k: cell[k] for k in ("name", "suite", "table", "row", "column", "order", "report_acc")} | {
            "source": run_dir.name, "samples": len(mine),
            "epochs_search": sum(s["epochs_done"] or 0 for s in mine),
            "epochs_rerun": sum(r.get("epochs_done") or 0 for r in ran),
            "best_config": config_text(best_.get("values", {})), "metric": doc["settings"]["metric"],
            "repeats": doc["settings"]["repeats"],
            "best_metric": best_.get("metric_value", math.nan),
            "tuned_mean": tuned.get("ours_mean", math.nan), "tuned_std": tuned.get("ours_std", math.nan),
            "tuned_n": tuned.get("n", 0), "tuned_status": tuned.get("status", ""),
            "tuned_budget": tuned.get("budget", "")})
    return rows
