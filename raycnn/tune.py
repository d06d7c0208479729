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
# Only the JSON logger by default (its result.json is where results are read from); `--log
# tensorboard` adds a TensorBoard logger that keeps NaN config values out (raycnn.ray_trackers).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import json
import logging
import math
import platform
import re
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
from raycnn import ray_trackers, results
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
    log: tuple = ()                     # --log trackers: (name, tracking URI or None) each
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
            # `resumed` (and `warning`, when the checkpoint was unreadable) come from fit.
            ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            if metrics.get("warning") and resume:     # name Tune's checkpoint, not our temp copy
                metrics = metrics | {"warning": metrics["warning"].replace(resume, restored.path)}
            tune.report({"resumed": False, **metrics, **where}, checkpoint=ckpt)

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
        try:
            ray.init(address="local", num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, **kwargs)
        except Exception as e:
            raise RunError(f"cannot start a local Ray instance: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    # Tune logs each failed trial with its traceback; raycnn says it in one line instead
    # (ResultsCallback), and the traceback stays in the trial's error.txt.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)


# HTTP/2's client connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, on a HOST:PORT that is not a Ray cluster: ray.init would retry
    for many minutes, printing Ray's C++ warnings. Ray's GCS speaks gRPC, that is HTTP/2, so
    a GCS answers the client's connection preface with a SETTINGS frame."""
    if address == "auto" or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        conn = socket.create_connection((host, int(port)), timeout=3)
    except (OSError, ValueError):
        raise RunError(f"cannot reach a Ray cluster at {address}") from None
    head = b""
    with conn:
        try:
            conn.settimeout(timeout)
            conn.sendall(H2_PREFACE)
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:      # a timeout included
            pass
    if len(head) < 9 or head[3] != 4:     # frame type 4: SETTINGS
        raise RunError(f"{address} answers, but not as a Ray cluster (no Ray GCS there: is it the head's --port?)")


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

    Tune pickles callbacks into the experiment and, on resume, calls the unpickled ones, so this
    holds nothing: the run folder (which may have moved since) and the live view (a rich
    object) are the running driver's, looked up in ACTIVE, which `run` fills."""

    def _show(self, trial, result: dict, method: str = "update") -> None:
        view = ACTIVE.get("view")
        if view is not None and hasattr(view, method):
            getattr(view, method)(trial.config["trial"], result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial failed and Tune restarts it from its last checkpoint (FailureConfig)."""
        self._show(trial, {"error": _summary(_last_error_line(trial))}, method="restarting")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trial, {"status": "running"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trial, {"status": "error"})
        self._show(trial, {"error": _summary(_last_error_line(trial)), "log": trial.error_file}, method="failed")
        self._write()

    def _write(self) -> None:
        if "run_dir" not in ACTIVE:
            return
        try:
            write_results(Path(ACTIVE["run_dir"]))
        except Exception as e:   # never let a results hiccup stop the experiment; the end rewrites
            logging.getLogger("raycnn").warning("could not write results yet: %s", e)


def _last_error_line(trial) -> str:
    """The last line of a failed trial's error as Tune recorded it."""
    try:
        lines = Path(trial.error_file).read_text().strip().splitlines()
    except (OSError, TypeError, AttributeError):
        lines = []
    return lines[-1] if lines else "its worker died"


def _summary(error: str, limit: int = 200) -> str:
    """The first sentence of an error line, at most `limit` characters (Ray's run on)."""
    first = re.split(r"(?<=\.)\s", error.strip(), maxsplit=1)[0]
    return first if len(first) <= limit else first[:limit - 3] + "..."


# The running driver's run folder and live view, for ResultsCallback (see there).
ACTIVE: dict[str, Any] = {}


def run(trials: list[Trial], opts: RunOptions, view=None) -> str:
    """Run `trials` (x repeats) under Tune into opts.run_dir; returns ok | errors | interrupted."""
    params = expand(trials, opts.repeats)
    datasets = _datasets(params)      # before Ray starts: missing data fails fast
    # SIGTERM acts as Ctrl-C: inside fit Tune stops gracefully on SIGINT (fit returns); before
    # it, the KeyboardInterrupt still shuts Ray down below.
    as_sigint = lambda *_: os.kill(os.getpid(), signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, as_sigint)
    try:
        connect(opts)
        signal.signal(signal.SIGTERM, as_sigint)    # again: ray.init installs one that aborts
        try:
            place(params, opts)
            if view is not None:
                view.start(params)
            ACTIVE.update(run_dir=str(opts.run_dir), view=view)
            try:
                trackers = ray_trackers.callbacks(opts.log, opts.run_dir)
                tuner(params, opts, [JsonLoggerCallback(), ResultsCallback(), *trackers], datasets).fit()
            finally:
                ACTIVE.clear()
                if view is not None:
                    view.stop()
        finally:
            ray.shutdown()
    finally:
        signal.signal(signal.SIGTERM, previous)
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
    states = _tune_states(exp)
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


def _tune_states(exp: Path) -> dict[str, str]:
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


EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds",
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
    status = last.get("status") if done else ("error" if failed else "running")
    # A trial that failed and was restarted says so: it may have run partly twice.
    warnings = [e["warning"] for e in epochs if e.get("warning")]
    if failures and status != "error":
        warnings.append(f"restarted after {failures} failure(s), the last: {_summary(errors[-1])}")
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
