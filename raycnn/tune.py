"""Ray Tune: every trial of a suite runs `raycnn.trainer.fit` as one Tune trial.

The only module that imports Ray. One Tuner per run; each trial gets `cpus_per_trial` CPUs and a
(fractional) GPU share; datasets go into the object store once and are shared, zero-copy, by
the trials of a node. Each epoch reports its metrics with a checkpoint, so a failed trial
restarts from its last epoch (FailureConfig) and an interrupted run resumes (Tuner.restore).

Results are rebuilt from Tune's own experiment folder (one result.json line per epoch, written
before the epoch is acknowledged), so they survive driver crashes and resumes without
duplicates: `collect` reads that folder, `write_results` turns it into Parquet.
"""
from __future__ import annotations

import os

# Tune's own console output is replaced by raycnn's live view; set before ray is imported.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray 2.60's ray.init() writes ~/.ray/auth_token, after which `ray start` turns token auth on and
# local tools fail with AuthenticationError; a benchmark suite on a private network needs neither.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Only the JSON logger is wanted (its result.json is where results are read from): the default
# TensorBoard logger prints "NaN or Inf found" over the live view for NaN config values.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import json
import logging
import math
import platform
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
import torchvision
from ray import tune
from ray.tune.logger import JsonLoggerCallback

from raycnn import data as data_mod
from raycnn import results
from raycnn.suites import Trial
from raycnn.trainer import TrainConfig, fit, load_arrays

EXIT = {"ok": 0, "errors": 3, "interrupted": 130}


class RunError(RuntimeError):
    """A run that cannot start; the message is one line for the user."""


@dataclass
class RunOptions:
    """How to run (not what: that is the suite). Paths must be absolute."""
    run_dir: Path
    address: str | None = None          # None: a private local Ray instance
    cpus_per_trial: int | None = None   # None: the suite's
    gpus_per_trial: float | None = None # None: the suite's where the cluster has GPUs, else 0
    max_concurrent: int | None = None
    max_failures: int = 2
    repeats: int = 1
    resume: bool = False
    num_cpus: int | None = None         # private instance only: CPUs to declare (None: all)
    num_gpus: float | None = None       # private instance only: logical GPUs to declare (None: detect)
    live: bool = True
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- inside a trial

def _trainable(param: dict, **datasets) -> None:
    """One trial: fit the config, reporting each epoch with its checkpoint to Tune."""
    meta = param["trial"]
    config = TrainConfig.from_dict(meta["config"])
    arrays = data_mod.subset(datasets[_data_key(config)], config.max_train_samples)
    ctx = ray.get_runtime_context()
    where = {"node": f"{socket.gethostname()}/{ctx.get_node_id()[:8]}", "hostname": socket.gethostname()}
    restored = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="raycnn-") as tmp:
        resume = restored.to_directory(os.path.join(tmp, "resume")) if restored else None

        def report(metrics: dict, checkpoint_dir: Path | None) -> None:
            ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            tune.report({**metrics, **where, "resumed": resume is not None}, checkpoint=ckpt)

        fit(config, report=report, checkpoint=resume, checkpoint_dir=os.path.join(tmp, "ck"), arrays=arrays)


def _data_key(config: TrainConfig) -> str:
    return f"{config.dataset_name}{'-synthetic' if config.synthetic else ''}"


# ---------------------------------------------------------------- the driver

def provenance() -> dict:
    """Versions and git revision of the code that runs the trials."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        rev = f"{rev}-dirty" if rev and dirty else rev
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {"git_rev": rev or "unknown", "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__, "ray_version": ray.__version__,
            "python_version": platform.python_version()}


def expand(trials: list[Trial], repeats: int) -> list[dict]:
    """Trial x repeat as Tune parameter dicts; repeat r uses seed + r."""
    prov = provenance()
    out = []
    for trial in trials:
        for r in range(repeats):
            config = trial.config.to_dict() | {"seed": trial.config.seed + r}
            out.append({"name": trial.name, "suite": trial.suite, "table": trial.table, "row": trial.row,
                        "column": trial.column, "order": trial.order, "report_acc": trial.report_acc,
                        "repeat": r, "gpus": trial.gpus_per_trial, "cpus": trial.cpus_per_trial,
                        "config": config, **prov})
    return out


def connect(opts: RunOptions) -> None:
    """Join the cluster at opts.address, or start a private local instance."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if opts.address:
        _check_reachable(opts.address)
        try:
            ray.init(address=opts.address, **kwargs)
        except Exception as e:   # ray raises several types here; all mean the same to the user
            raise RunError(f"cannot join the Ray cluster at {opts.address}: {str(e).splitlines()[0]}") from None
    else:
        ray.init(address="local", num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, **kwargs)


def _check_reachable(address: str) -> None:
    """Fail fast on HOST:PORT that does not answer (ray.init would wait for minutes)."""
    if address == "auto" or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except (OSError, ValueError):
        raise RunError(f"cannot reach a Ray cluster at {address}") from None


def place(params: list[dict], opts: RunOptions) -> None:
    """Set each trial's CPU/GPU share from the options and what the cluster has."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    max_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    max_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    if opts.gpus_per_trial is not None and opts.gpus_per_trial > max_gpus:
        raise RunError(f"--gpus-per-trial {opts.gpus_per_trial} is more than any node has (largest: {max_gpus:g} GPUs)")
    for p in params:
        p["cpus"] = opts.cpus_per_trial or p["cpus"]
        # A GPU share only where GPUs exist: on a CPU-only cluster the suite's share would never schedule.
        p["gpus"] = opts.gpus_per_trial if opts.gpus_per_trial is not None else (p["gpus"] if max_gpus else 0.0)
        p["gpus"] = min(p["gpus"], max_gpus)
        if p["cpus"] > max_cpus:
            raise RunError(f"--cpus-per-trial {p['cpus']} is more than any node has (largest: {max_cpus:g} CPUs)")
        # Torch threads match the trial's CPUs: more threads than cores only contend.
        p["config"]["num_threads"] = int(p["cpus"])


def _resources(param: dict) -> tune.PlacementGroupFactory:
    t = param["trial"]
    return tune.PlacementGroupFactory([{"CPU": t["cpus"], "GPU": t["gpus"]}])


def _dirname(trial) -> str:
    t = trial.config["trial"]
    return f"{t['order']:03d}-{t['name'].replace('/', '-')}-r{t['repeat']}"


def _datasets(params: list[dict]) -> dict[str, data_mod.Arrays]:
    """Each dataset the trials need, read once in the driver (max_train_samples applies per trial)."""
    out = {}
    for p in params:
        config = TrainConfig.from_dict(p["config"])
        key = _data_key(config)
        if key not in out:
            out[key] = load_arrays(TrainConfig.from_dict({**p["config"], "max_train_samples": 0}))
    return out


def tuner(params: list[dict], opts: RunOptions, callbacks: list, datasets: dict) -> tune.Tuner:
    """A new Tuner for `params`, or the restored one of opts.run_dir when resuming."""
    trainable = tune.with_resources(tune.with_parameters(_trainable, **datasets), _resources)
    exp = experiment_dir(opts.run_dir)
    if opts.resume:
        return tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(params)},
        tune_config=tune.TuneConfig(max_concurrent_trials=opts.max_concurrent, reuse_actors=True,
                                    trial_dirname_creator=_dirname),
        run_config=tune.RunConfig(
            name=exp.name, storage_path=str(exp.parent), verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def experiment_dir(run_dir: Path) -> Path:
    """Tune's experiment folder (checkpoints, result.json files) inside a run folder."""
    return Path(run_dir) / "tune" / "experiment"


class ResultsCallback(tune.Callback):
    """Rewrites the Parquet files as trials finish, and feeds the live view each epoch.

    Tune pickles callbacks, so this holds only the run folder; the live view (a rich object)
    is looked up in a module-level registry."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def _show(self, trial, result: dict) -> None:
        view = LIVE_VIEWS.get(self.run_dir)
        if view is not None:
            view.update(trial.config["trial"], result)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trial, {"status": "running"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trial, {"status": "error"})
        self._write()

    def _write(self) -> None:
        try:
            write_results(Path(self.run_dir))
        except Exception as e:   # never let a results hiccup stop the experiment; the end rewrites
            logging.getLogger("raycnn").warning("could not write results yet: %s", e)


LIVE_VIEWS: dict[str, Any] = {}


def run(trials: list[Trial], opts: RunOptions, view=None) -> str:
    """Run `trials` (x repeats) under Tune into opts.run_dir; returns ok | errors | interrupted."""
    params = expand(trials, opts.repeats)
    datasets = _datasets(params)      # before Ray starts: missing data fails fast
    connect(opts)
    try:
        place(params, opts)
        if view is not None:
            view.start(params)
            LIVE_VIEWS[str(opts.run_dir)] = view
        previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
        try:
            tuner(params, opts, [JsonLoggerCallback(), ResultsCallback(str(opts.run_dir))], datasets).fit()
        finally:
            signal.signal(signal.SIGTERM, previous)
            LIVE_VIEWS.pop(str(opts.run_dir), None)
            if view is not None:
                view.stop()
    finally:
        ray.shutdown()
    trial_rows, _ = write_results(opts.run_dir)
    statuses = [r["status"] for r in trial_rows]
    if len(trial_rows) < len(params) or "running" in statuses:
        return "interrupted"
    return "errors" if "error" in statuses else "ok"


# ---------------------------------------------------------------- results from Tune's folder

def collect(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Trial rows and epoch rows from the result.json files of the run's Tune experiment."""
    trial_rows, epoch_rows = [], []
    exp = experiment_dir(run_dir)
    for folder in sorted(p for p in exp.glob("*") if (p / "params.json").exists()):
        try:
            meta = json.loads((folder / "params.json").read_text())["trial"]
        except (json.JSONDecodeError, KeyError):
            continue      # Tune is still writing it; the next rewrite picks the trial up
        epochs = _epochs(folder / "result.json")
        error = (folder / "error.txt").read_text().strip().splitlines()[-1:] if (folder / "error.txt").exists() else []
        trial_rows.append(_trial_row(meta, epochs, error))
        epoch_rows += [_epoch_row(meta, e) for e in epochs]
    return trial_rows, epoch_rows


def _epochs(path: Path) -> list[dict]:
    """The epoch results of one trial; a restarted trial's re-reported epochs count once."""
    by_epoch: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                if "epoch" in result:
                    by_epoch[result["epoch"]] = result
    return [by_epoch[k] for k in sorted(by_epoch)]


EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds",
                "images_per_s", "peak_mem_mb", "node", "device", "precision", "status", "resumed")
TRIAL_META = ("name", "suite", "table", "row", "column", "order", "report_acc", "repeat", "git_rev",
              "torch_version", "torchvision_version", "ray_version", "python_version")


def _epoch_row(meta: dict, e: dict) -> dict:
    row = {k: meta[k] for k in ("name", "suite", "repeat", "table", "row", "column")}
    return row | {k: e.get(k) for k in EPOCH_FIELDS}


def _trial_row(meta: dict, epochs: list[dict], error: list[str]) -> dict:
    last = epochs[-1] if epochs else {}
    done = bool(last.get("finished"))
    status = last.get("status") if done else ("error" if error else "running")
    best = max(epochs, key=lambda e: e["test_acc"], default={})
    trained = [e["images_per_s"] for e in epochs if e.get("images_per_s") is not None and math.isfinite(e["images_per_s"])]
    row = {k: meta[k] for k in TRIAL_META} | meta["config"]
    return row | {
        "status": {"stopped": "ok"}.get(status, status),
        "final_test_acc": last.get("test_acc", math.nan), "best_test_acc": best.get("test_acc", math.nan),
        "best_epoch": best.get("epoch", -1), "epochs_done": last.get("epoch", 0),
        "early_stopped": status == "stopped",
        "wall_seconds": last.get("time_total_s", math.nan),
        "images_per_s": sum(trained) / len(trained) if trained else math.nan,
        "node": last.get("node", ""), "device": last.get("device", ""), "precision": last.get("precision", ""),
        "gpus_per_trial": meta["gpus"], "cpus_per_trial": meta["cpus"],
        "error": error[0] if error else "",
    }


def write_results(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(Re)write RUN_DIR/trials.parquet and epochs.parquet from Tune's folder, atomically."""
    trial_rows, epoch_rows = collect(run_dir)
    if trial_rows:
        results.write_parquet(trial_rows, Path(run_dir) / "trials.parquet")
        results.write_parquet(epoch_rows, Path(run_dir) / "epochs.parquet")
    return trial_rows, epoch_rows
