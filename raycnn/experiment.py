"""A run's result rows, from its plan and Tune's experiment folder; Ray-free and torch-free.

Each trial reports every epoch (`raycnn.trainer.fit`): the epoch's metrics, and under
"summary" what the trial amounts to so far; Tune appends each report to the trial's
result.json before the epoch is acknowledged, so the rows survive driver crashes and resumes.
A trial's row is its plan entry (name, place in the report, config, resources) with its last
report's summary and provenance; an epoch row is one report. A restarted trial reports again
from the epoch after its checkpoint, so a report of epoch k supersedes the earlier reports of
epoch k and later (no duplicates after restarts). Trials the plan skipped get a row saying why.

`write_results` is the one writer of trials.parquet and epochs.parquet. The run folder may be
on object storage (`raycnn.storage`): its Tune folder is listed once and only the files read
that are there.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

from raycnn import plan as run_plan
from raycnn import results, storage
from raycnn.outcome import outcome
from raycnn.storage import Place


def experiment_dir(run_dir: str | Path | Place) -> Place:
    """Tune's experiment folder (checkpoints, result.json files) inside a run folder."""
    return storage.resolve(run_dir) / "tune" / "experiment"


def trial_folder(meta: dict) -> str:
    """The folder name of a trial (its plan entry: order, name, repeat) in the experiment."""
    return f"{meta['order']:03d}-{meta['name'].replace('/', '-')}-r{meta['repeat']}"


def summary(error: str, limit: int = 200) -> str:
    """The first sentence of an error line, at most `limit` characters (Ray's run on)."""
    first = re.split(r"(?<=\.)\s", error.strip(), maxsplit=1)[0]
    return first if len(first) <= limit else first[:limit - 3] + "..."


# What every trial row says about the trial, from its plan entry.
TRIAL_FIELDS = ("name", "suite", "table", "row", "column", "order", "report_acc", "repeat")
# Where and with what the trial trained, from its reports (stamped by the worker that trained).
PROVENANCE = ("git_rev", "torch_version", "torchvision_version", "ray_version", "python_version")
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "lr", "lr_backbone",
                "seconds", "images_per_s", "peak_mem_mb", "node", "device", "precision", "status", "resumed", "warning")


def collect(run_dir: str | Path | Place) -> tuple[list[dict], list[dict]]:
    """Trial rows and epoch rows of a run folder: its plan's trials, as far as they got."""
    exp = experiment_dir(run_dir)
    there = exp.tree()
    states = tune_states(exp, there)
    trial_rows, epoch_rows = [], []
    for meta in run_plan.read(run_dir).entries:
        if meta.get("skipped"):
            trial_rows.append(_skipped_row(meta))
            continue
        name = trial_folder(meta)
        if f"{name}/params.json" not in there:
            continue          # not started (yet): the run is unfinished
        reports = _reports(exp / name / "result.json") if f"{name}/result.json" in there else []
        errors = (exp / name / "error.txt").read_text().strip().splitlines() if f"{name}/error.txt" in there else []
        trial_rows.append(_trial_row(meta, reports, errors, states.get(name)))
        epoch_rows += [_epoch_row(meta, r) for r in reports]
    return trial_rows, epoch_rows


def tune_states(exp: Place, there: dict) -> dict[str, str]:
    """Tune's status of each trial (PENDING, RUNNING, PAUSED, TERMINATED, ERROR) by trial folder,
    from its newest experiment state (`there`: exp.tree()); {} where there is none yet."""
    files = sorted((i.mtime, rel) for rel, i in there.items()
                   if "/" not in rel and fnmatch.fnmatch(rel, "experiment_state-*.json"))
    try:
        data = json.loads((exp / files[-1][1]).read_text())["trial_data"] if files else []
        states = [json.loads(t[0]) for t in data]
        return {t["relative_logdir"]: t["status"] for t in states}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}


def _reports(path: Place) -> list[dict]:
    """The epoch reports of one trial, in order. A restarted trial reports again from the epoch
    after its checkpoint (or from 1 when it starts over): a report of epoch k supersedes every
    earlier report of epoch k and later, so the rows are those of the run that went on. A line
    cut off by a crash is skipped (`repair` makes sure no later line is glued to it)."""
    by_epoch: dict[int, dict] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    for line in text.splitlines():
        try:
            result = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            continue
        if "epoch" in result:
            by_epoch = {k: v for k, v in by_epoch.items() if k < result["epoch"]}
            by_epoch[result["epoch"]] = result
    return [by_epoch[k] for k in sorted(by_epoch)]


def repair(run_dir: str | Path | Place, exp: Place | None = None) -> list[str]:
    """Cut the torn last line off every result.json of the run (a crash mid-write leaves one;
    Tune would append the next report to it and both would be lost); `exp`: another experiment
    folder of the run (a search's cell) than its plan's. Returns the trial folders
    whose line was cut: that epoch's row is a gap unless the trial trains it again."""
    exp, cut = exp or experiment_dir(run_dir), []
    for rel in sorted(exp.tree()):
        folder, _, name = rel.partition("/")
        if name != "result.json":
            continue
        data = (exp / rel).read_bytes()
        if data and not data.endswith(b"\n"):
            (exp / rel).write_bytes(data[:data.rfind(b"\n") + 1])
            cut.append(folder)
    return cut


def _epoch_row(meta: dict, report: dict) -> dict:
    row = {k: meta[k] for k in ("name", "suite", "repeat", "table", "row", "column")}
    return row | {k: report.get(k) for k in EPOCH_FIELDS}


def _gaps(reports: list[dict]) -> list[int]:
    """Epochs missing between the first reported and the last."""
    seen = {r["epoch"] for r in reports}
    return [e for e in range(min(seen, default=1), max(seen, default=0)) if e not in seen]


def _trial_row(meta: dict, reports: list[dict], errors: list[str], tune_status: str | None = None) -> dict:
    last = reports[-1] if reports else {}
    done = bool(last.get("finished"))
    failures = sum(line.startswith("Failure #") for line in errors)
    # Not done: failed for good only where Tune says so (a trial that failed, restarted and was
    # then interrupted is unfinished, not failed); without Tune's state, any recorded failure.
    failed = tune_status == "ERROR" if tune_status else bool(errors)
    verdict = last.get("summary") or outcome([])          # what the trial said it amounts to
    status = verdict["status"] if done else ("error" if failed else "running")
    # A trial that failed and was restarted says so: it may have run partly twice.
    warnings = [r["warning"] for r in reports if r.get("warning")]
    if failures and status != "error":
        warnings.append(f"restarted after {failures} failure(s), the last: {summary(errors[-1])}")
    if _gaps(reports):
        warnings.append(f"no report of epoch(s) {', '.join(map(str, _gaps(reports)))} (cut off by a crash)")
    return {k: meta[k] for k in TRIAL_FIELDS} | {k: last.get(k, "") for k in PROVENANCE} | meta["config"] | verdict | {
        "status": status,
        "wall_seconds": last.get("time_total_s", math.nan),
        "node": last.get("node", ""), "device": last.get("device", ""), "precision": last.get("precision", ""),
        "gpus_per_trial": meta["gpus"], "cpus_per_trial": meta["cpus"],
        "error": errors[-1] if status == "error" and errors else "",
        "failures": failures, "warning": "; ".join(warnings),
    }


def _skipped_row(meta: dict) -> dict:
    """The row of a trial the run did not train, saying why (its cell in the tables)."""
    return {k: meta[k] for k in TRIAL_FIELDS} | meta["config"] | {
        "status": f"skipped: {meta['skipped']}", "final_test_acc": math.nan, "best_test_acc": math.nan,
        "gpus_per_trial": meta["gpus"], "cpus_per_trial": meta["cpus"]}


def write_results(run_dir: str | Path | Place) -> tuple[list[dict], list[dict]]:
    """(Re)write RUN_DIR/trials.parquet and epochs.parquet from the plan and Tune's folder."""
    trial_rows, epoch_rows = collect(run_dir)
    if trial_rows:
        results.write_run(run_dir, trial_rows, epoch_rows)
    return trial_rows, epoch_rows
