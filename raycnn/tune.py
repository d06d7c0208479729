"""The Tune driver: every trial of a run's plan runs `raycnn.trial.trainable` as one Tune trial.

One Tuner per run; each trial gets `cpus_per_trial` CPUs and a (fractional) GPU share, fitted to
the cluster's node shapes by `raycnn.cluster`. Datasets and --weights files go into the object
store once and are shared by the trials of a node. Each epoch reports its metrics with a
checkpoint, so a failed trial restarts from its last checkpoint (FailureConfig) and an
interrupted run resumes (Tuner.restore) its saved plan (`raycnn.plan`). Rows are written by
`raycnn.experiment` from the plan and Tune's folder. One driver per run folder (`raycnn.lock`).
The run folder may be in a bucket (`raycnn.storage`): Tune then writes its checkpoints and state
there through the same pyarrow filesystem (`storage_filesystem`), and on a cluster every node
shows that it can reach the folder before any trial starts (`raycnn.cluster.probe`).

The Ray modules are this one, `raycnn.trial`, `raycnn.cluster` and `raycnn.ray_trackers`;
nothing else imports Ray.
"""
from __future__ import annotations

import os

# Tune's own console output is replaced by raycnn's live view; set before ray is imported.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Only the JSON logger by default (its result.json is where results are read from); `--log
# tensorboard` adds a TensorBoard logger that keeps NaN config values out (raycnn.ray_trackers).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import hashlib
import logging
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback

from raycnn import checkpoint, cluster, datafiles, epoch_progress, experiment, lock, plan, process, ray_trackers, storage
from raycnn.config import TrainConfig
from raycnn.errors import NodeDied, RunError
from raycnn.experiment import experiment_dir, summary, trial_folder, write_results
from raycnn.storage import Place
from raycnn.suites import Trial
from raycnn.trial import WEIGHTS_KEY, data_key, trainable


@dataclass
class RunOptions:
    """How to run (not what: that is the plan)."""
    run_dir: Place | Path | str         # a local folder or a URI (raycnn.storage)
    address: str | None = None          # None: a private local Ray instance
    cpus_per_trial: int | None = None   # None: the suite's
    gpus_per_trial: float | None = None # None: the suite's where the cluster has GPUs, else 0
    max_concurrent: int | None = None
    max_failures: int = 2
    repeats: int = 1
    resume: bool = False
    num_cpus: int | None = None         # private instance only: CPUs to declare (None: all)
    num_gpus: float | None = None       # private instance only: logical GPUs to declare (None: detect)
    log: tuple = ()                     # --log trackers: (name, tracking URI or None) each
    timings: dict = field(default_factory=dict)   # filled by run_trials: seconds per phase


@contextmanager
def phase(timings: dict, name: str):
    """Add the block's wall seconds to timings[name] (benchmarks/overhead.py prints them)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def apply_resources(trials: list[Trial], opts: RunOptions) -> list[Trial]:
    """The trials with --cpus-per-trial/--gpus-per-trial applied; torch threads match the
    trial's CPUs (more threads than cores only contend)."""
    out = []
    for t in trials:
        cpus = opts.cpus_per_trial or t.cpus_per_trial
        gpus = t.gpus_per_trial if opts.gpus_per_trial is None else opts.gpus_per_trial
        out.append(replace(t, cpus_per_trial=cpus, gpus_per_trial=gpus,
                           config=replace(t.config, num_threads=max(1, int(cpus))).validate()))
    return out


def shipped(entries: list[dict]) -> tuple[dict[str, Any], dict[str, str]]:
    """What the trials get through the object store, read once by the driver (each dataset:
    the whole split, max_train_samples applies per trial; each --weights file's bytes), and the
    sha256 of each, which the plan keeps so that a resume trains on the same inputs."""
    objects, digests = {}, {}
    for entry in entries:
        config = TrainConfig.from_dict(entry["config"])
        if data_key(config) not in objects:
            arrays = datafiles.load(replace(config, max_train_samples=0))
            objects[data_key(config)] = arrays
            digests[data_key(config)] = _digest(arrays.train_x, arrays.train_y, arrays.test_x, arrays.test_y)
        if config.weights and WEIGHTS_KEY not in objects:
            objects[WEIGHTS_KEY] = Path(config.weights).read_bytes()
            # by content, not path: a resumed run may find the same file elsewhere
            digests["weights"] = _digest(objects[WEIGHTS_KEY])
    return objects, digests


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(memoryview(np.ascontiguousarray(part)).cast("B") if isinstance(part, np.ndarray) else part)
    return h.hexdigest()


def _resources(param: dict) -> tune.PlacementGroupFactory:
    t = param["trial"]
    return tune.PlacementGroupFactory([{"CPU": t["cpus"], "GPU": t["gpus"]}])


def _dirname(trial) -> str:
    return trial_folder(trial.config["trial"])


def tuner(params: list[dict], opts: RunOptions, callbacks: list, objects: dict) -> tune.Tuner:
    """A new Tuner for `params`, or the restored one of opts.run_dir when resuming. Tune reads
    and writes the experiment through the run folder's own filesystem, a bucket's included."""
    # The progress folder is the running driver's (a resumed run folder may have moved).
    fn = tune.with_resources(tune.with_parameters(trainable, progress_dir=epoch_progress.folder(opts.run_dir),
                                                  **objects), _resources)
    exp = experiment_dir(opts.run_dir)
    if opts.resume:    # where the folder is now: Tune moves its trials' paths there
        return tune.Tuner.restore(exp.path, fn, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=exp.fs)
    return tune.Tuner(
        fn,
        param_space={"trial": tune.grid_search(params)},
        tune_config=tune.TuneConfig(max_concurrent_trials=opts.max_concurrent, reuse_actors=True,
                                    trial_dirname_creator=_dirname),
        run_config=tune.RunConfig(
            name=exp.name, storage_path=exp.parent.path, storage_filesystem=exp.fs, verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


class ResultsCallback(tune.Callback):
    """Rewrites the Parquet files as trials finish, feeds the live view each epoch, and says so
    when no trial runs and trials wait for resources (Tune's own warning is muted with the rest
    of its logging).

    Tune pickles callbacks into the experiment and, on resume, calls the unpickled ones, so this
    holds nothing: the run folder (which may have moved since) and the live view (a rich
    object) are the running driver's, looked up in ACTIVE, which `run_trials` fills."""

    # How long trials may wait for resources before the view says so (tests shorten it).
    WAIT_S = float(os.environ.get("RAYCNN_WAIT_NOTICE_S", "30"))

    def _show(self, trial, result: dict, method: str = "update") -> None:
        view = ACTIVE.get("view")
        if view is not None and hasattr(view, method):
            getattr(view, method)(trial.config["trial"], result)

    def on_step_begin(self, iteration, trials, **info):
        """Stop at once if the private Ray node died under the driver (Ray's core worker would
        end the process soon, without a word); once per WAIT_S while trials are pending and
        none has started meanwhile, say so in one line."""
        if _dead(ACTIVE.get("raylet")):
            raise NodeDied("the local Ray node died (its raylet is gone: killed, or out of memory)")
        pending = [t for t in trials if t.status == "PENDING"]
        now = time.monotonic()
        since = ACTIVE.setdefault("progress_at", now)
        # Trials queued behind running ones are the normal case, and a trial whose resources are
        # free is starting (a busy machine can take a while); only then is a run waiting.
        if (not pending or any(t.status == "RUNNING" for t in trials) or now - since < self.WAIT_S
                or any(_fits_now(t) for t in pending)):
            return
        ACTIVE["progress_at"] = now
        view = ACTIVE.get("view")
        if view is not None and hasattr(view, "warn"):
            view.warn(waiting_line(pending))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial failed and Tune restarts it from its last checkpoint (FailureConfig)."""
        self._show(trial, {"error": summary(_last_error_line(trial))}, method="restarting")

    def on_trial_start(self, iteration, trials, trial, **info):
        ACTIVE["progress_at"] = time.monotonic()
        self._show(trial, {"status": "running"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trial, {"status": "error"})
        self._show(trial, {"error": summary(_last_error_line(trial)), "log": trial.error_file}, method="failed")
        self._write()

    def _write(self) -> None:
        if "run_dir" not in ACTIVE:
            return
        try:
            write_results(ACTIVE["run_dir"])
        except Exception as e:   # never let a results hiccup stop the experiment; the end rewrites
            logging.getLogger("raycnn").warning("could not write results yet: %s", e)


def _fits_now(trial) -> bool:
    """Whether the cluster's free resources could hold the trial's request right now."""
    free = ray.available_resources()
    need = trial.config["trial"]
    return free.get("CPU", 0) >= need["cpus"] and free.get("GPU", 0) >= need["gpus"]


def waiting_line(pending: list) -> str:
    """What pending trials need against what the cluster has now, in one line."""
    needs = sorted({(t.config["trial"]["cpus"], t.config["trial"]["gpus"]) for t in pending})
    need = ", ".join(f"{c:g} CPU" + (f" + {g:g} GPU" if g else "") for c, g in needs)
    total, free = ray.cluster_resources(), ray.available_resources()
    have = ", ".join(f"{free.get(k, 0):g}/{total.get(k, 0):g} {k}" for k in ("CPU", "GPU") if total.get(k) or k == "CPU")
    return (f"{len(pending)} trial(s) waiting for resources: each needs {need}; the cluster has {have} free "
            f"now (an autoscaling cluster adds nodes for them)")


def _raylet():
    """The private local instance's raylet process (a Popen: its child, so a killed one is a
    zombie until polled); None when joined to a cluster."""
    node = getattr(ray._private.worker, "_global_node", None)
    procs = getattr(node, "all_processes", {}) or {}
    infos = procs.get(ray._private.ray_constants.PROCESS_TYPE_RAYLET, [])
    return infos[0].process if infos else None


def _dead(raylet) -> bool:
    return raylet is not None and raylet.poll() is not None


def _last_error_line(trial) -> str:
    """The last line of a failed trial's error as Tune recorded it."""
    try:
        lines = Path(trial.error_file).read_text().strip().splitlines()
    except (OSError, TypeError, AttributeError):
        lines = []
    return lines[-1] if lines else "its worker died"


RAY_LOG = "ray.log"      # in the run folder: what Ray prints during a run


# The running driver's run folder and live view, for ResultsCallback (see there).
ACTIVE: dict[str, Any] = {}


def run_trials(trials: list[Trial], opts: RunOptions, view=None, skipped: dict[str, str] | None = None) -> str:
    """Run `trials` (x repeats) under Tune into opts.run_dir, or resume the run there; the trials
    named in `skipped` are planned but not trained (their rows give the reason). Returns ok |
    errors | interrupted."""
    opts = replace(opts, run_dir=storage.resolve(opts.run_dir))
    run_dir = opts.run_dir
    with lock.hold(run_dir):       # first: a second driver must change nothing
        new = plan.Plan(plan.entries(apply_resources(trials, opts), opts.repeats, skipped))
        todo = [e for e in new.entries if not e.get("skipped")]
        with phase(opts.timings, "read data"):
            objects, new.inputs = shipped(todo)     # before Ray starts: missing data fails fast
        if opts.resume:
            _check_resumable(run_dir, new)
        else:
            plan.write(run_dir, new)
        try:
            with process.output_to_place(run_dir / RAY_LOG):
                _drive(todo, opts, view, objects)
        except NodeDied as e:     # the rows so far are intact: the run is interrupted, not lost
            if view is not None and hasattr(view, "warn"):
                view.warn(f"{e}; Ray's log: {run_dir / RAY_LOG}")
        except RunError:          # a run that cannot start leaves nothing behind
            if not opts.resume:
                for made in (run_dir / RAY_LOG, plan.path(run_dir)):
                    made.unlink()
            raise
        # No trial runs now; what a killed one left is not progress of anything.
        epoch_progress.folder(run_dir).rmtree()
        with phase(opts.timings, "write results"):
            trial_rows, _ = write_results(run_dir)
    statuses = [r["status"] for r in trial_rows if not r["status"].startswith("skipped")]
    if len(statuses) < len(todo) or "running" in statuses:
        return "interrupted"
    return "errors" if "error" in statuses else "ok"


def _check_resumable(run_dir: Place, new: plan.Plan) -> None:
    """Refuse, in one line, a resume that would change the run's results, that would unpickle
    state others could have written, or that finds a checkpoint holding code; then cut any
    result.json line torn by the crash that stopped the run."""
    plan.check_resume(plan.read(run_dir), new)
    exp = experiment_dir(run_dir)
    # A bucket has no owner and mode to check: who may write there is the bucket policy's
    # matter (docs/cluster.md, Security).
    for folder in (run_dir.local, exp.parent.local, exp.local) if run_dir.local else ():
        info = folder.stat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RunError(f"{folder} can be written by other users; Tune's state in it is pickled and would run "
                           f"their code on --resume: make it yours and `chmod go-w` it first")
    checkpoint.check_all(exp)
    experiment.repair(run_dir)


def _drive(entries: list[dict], opts: RunOptions, view, objects: dict) -> None:
    """Connect, place and fit the Tuner; Ray is shut down whatever happens."""
    with process.sigterm_as_sigint() as again:
        with phase(opts.timings, "ray start-up"):
            saved = cluster.connect(opts.address, opts.num_cpus, opts.num_gpus)
        again()                   # ray.init installs a SIGTERM handler that aborts
        try:
            if opts.address:      # a private instance is this machine only, which cli checked
                cluster.probe(opts.run_dir)
            params = cluster.place(entries, cluster.shapes(), opts.gpus_per_trial)
            if view is not None:
                view.start(params)
            ACTIVE.update(run_dir=opts.run_dir, view=view, raylet=None if opts.address else _raylet())
            try:
                with phase(opts.timings, "tune"):
                    trackers = ray_trackers.callbacks(opts.log, opts.run_dir)
                    tuner(params, opts, [JsonLoggerCallback(), ResultsCallback(), *trackers], objects).fit()
            except Exception as e:
                if _dead(ACTIVE.get("raylet")) and not isinstance(e, NodeDied):   # Tune may wrap it
                    raise NodeDied("the local Ray node died (its raylet is gone: killed, or out of memory)") from None
                raise
            finally:
                ACTIVE.clear()
                if view is not None:
                    view.stop()
        finally:
            with phase(opts.timings, "ray shutdown"):
                cluster.disconnect(saved)
