"""Result rows rebuilt from Tune's experiment folder; Ray-free.

Tune writes one result.json line per epoch report before the epoch is acknowledged, so the rows
survive driver crashes and resumes: `collect` reads the folder, `write_results` turns it into
Parquet. A restarted trial reports again from the epoch after its checkpoint, so a report of
epoch k supersedes the earlier reports of epoch k and later (no duplicates after restarts).
Tune's status of each trial comes from its experiment state (see `tune_states`).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from raycnn import results
from raycnn.trainer import outcome


def experiment_dir(run_dir: Path) -> Path:
    """Tune's experiment folder (checkpoints, result.json files) inside a run folder."""
    return Path(run_dir) / "tune" / "experiment"


def trial_folder(meta: dict) -> str:
    """The folder name of a trial (its `trial` param: order, name, repeat) in the experiment."""
    return f"{meta['order']:03d}-{meta['name'].replace('/', '-')}-r{meta['repeat']}"


def summary(error: str, limit: int = 200) -> str:
    """The first sentence of an error line, at most `limit` characters (Ray's run on)."""
    first = re.split(r"(?<=\.)\s", error.strip(), maxsplit=1)[0]
    return first if len(first) <= limit else first[:limit - 3] + "..."


def collect(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Trial rows and epoch rows from the result.json files of the run's Tune experiment."""
    trial_rows, epoch_rows = [], []
    exp = experiment_dir(run_dir)
    states = tune_states(exp)
    for folder in sorted(p for p in exp.glob("*") if (p / "params.json").exists()):
        try:
            meta = json.loads((folder / "params.json").read_text())["trial"]
        except (json.JSONDecodeError, KeyError):
            continue      # Tune is still writing it; the next rewrite picks the trial up
        epochs = _epochs(folder / "result.json")
        errors = (folder / "error.txt").read_text().strip().splitlines() if (folder / "error.txt").exists() else []
        trial_rows.append(_trial_row(meta, epochs, errors, states.get(folder.name)))
        epoch_rows += [_epoch_row(meta, e) for e in epochs]
    return trial_rows, epoch_rows


def tune_states(exp: Path) -> dict[str, str]:
    """Tune's status of each trial (PENDING, RUNNING, PAUSED, TERMINATED, ERROR) by trial folder,
    from its newest experiment state; {} where there is none yet."""
    files = sorted(exp.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        data = json.loads(files[-1].read_text())["trial_data"] if files else []
        states = [json.loads(t[0]) for t in data]
        return {t["relative_logdir"]: t["status"] for t in states}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}


def _epochs(path: Path) -> list[dict]:
    """The epoch results of one trial, in order. A restarted trial reports again from the epoch
    after its checkpoint (or from 1 when it starts over): a report of epoch k supersedes every
    earlier report of epoch k and later, so the rows are those of the run that went on."""
    by_epoch: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    result = json.loads(line)
                except json.JSONDecodeError:
                    continue      # a line cut off by a crash
                if "epoch" in result:
                    by_epoch = {k: v for k, v in by_epoch.items() if k < result["epoch"]}
                    by_epoch[result["epoch"]] = result
    return [by_epoch[k] for k in sorted(by_epoch)]


EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "lr", "lr_backbone", "seconds",
                "images_per_s", "peak_mem_mb", "node", "device", "precision", "status", "resumed", "warning")
TRIAL_META = ("name", "suite", "table", "row", "column", "order", "report_acc", "repeat", "git_rev",
              "torch_version", "torchvision_version", "ray_version", "python_version")


def _epoch_row(meta: dict, e: dict) -> dict:
    row = {k: meta[k] for k in ("name", "suite", "repeat", "table", "row", "column")}
    return row | {k: e.get(k) for k in EPOCH_FIELDS}


def _trial_row(meta: dict, epochs: list[dict], errors: list[str], tune_status: str | None = None) -> dict:
    last = epochs[-1] if epochs else {}
    done = bool(last.get("finished"))
    failures = sum(line.startswith("Failure #") for line in errors)
    # Not done: failed for good only where Tune says so (a trial that failed, restarted and was
    # then interrupted is unfinished, not failed); without Tune's state, any recorded failure.
    failed = tune_status == "ERROR" if tune_status else bool(errors)
    verdict = outcome(epochs)                   # final/best/status: the trainer's one rule
    status = verdict["status"] if done else ("error" if failed else "running")
    # A trial that failed and was restarted says so: it may have run partly twice.
    warnings = [e["warning"] for e in epochs if e.get("warning")]
    if failures and status != "error":
        warnings.append(f"restarted after {failures} failure(s), the last: {summary(errors[-1])}")
    row = {k: meta[k] for k in TRIAL_META} | meta["config"]
    return row | verdict | {
        "status": status,
        "wall_seconds": last.get("time_total_s", math.nan),
        "node": last.get("node", ""), "device": last.get("device", ""), "precision": last.get("precision", ""),
        "gpus_per_trial": meta["gpus"], "cpus_per_trial": meta["cpus"],
        "error": errors[-1] if status == "error" and errors else "",
        "failures": failures, "warning": "; ".join(warnings),
    }


def write_results(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(Re)write RUN_DIR/trials.parquet and epochs.parquet from Tune's folder, atomically."""
    trial_rows, epoch_rows = collect(run_dir)
    if trial_rows:
        results.write_parquet(trial_rows, Path(run_dir) / "trials.parquet")
        results.write_parquet(epoch_rows, Path(run_dir) / "epochs.parquet")
    return trial_rows, epoch_rows
