"""The Tune driver: every trial of a run's plan runs `raycnn.trial.trainable` as one Tune trial,
and every sample of a search (`run_search`) runs `raycnn.trial.sample`, under ASHA.

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
import math
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
from ray.tune.schedulers import ASHAScheduler

from raycnn import (checkpoint, cluster, datafiles, epoch_progress, experiment, lock, plan, process, ray_trackers,
                    search, space, storage)
from raycnn.config import TrainConfig
from raycnn.errors import NodeDied, RunError
from raycnn.experiment import experiment_dir, summary, trial_folder, write_results
from raycnn.storage import Place
from raycnn.suites import Trial
from raycnn.trial import WEIGHTS_KEY, data_key, sample, trainable


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
    with lock.hold(opts.run_dir):       # first: a second driver must change nothing
        todo, objects = _prepare(trials, opts, skipped)
        try:
            with process.output_to_place(opts.run_dir / RAY_LOG), _ray(opts):
                _fit_plan(todo, opts, view, objects)
        except NodeDied as e:     # the rows so far are intact: the run is interrupted, not lost
            _warn(view, f"{e}; Ray's log: {opts.run_dir / RAY_LOG}")
        except RunError:          # a run that cannot start leaves nothing behind
            if not opts.resume:
                for made in (opts.run_dir / RAY_LOG, plan.path(opts.run_dir)):
                    made.unlink()
            raise
        return _finish(opts, todo)


def _prepare(trials: list[Trial], opts: RunOptions, skipped: dict[str, str] | None = None) -> tuple[list, dict]:
    """The run's plan, written (or checked against the saved one on resume), its entries to
    train and the objects they need."""
    new = plan.Plan(plan.entries(apply_resources(trials, opts), opts.repeats, skipped))
    todo = [e for e in new.entries if not e.get("skipped")]
    with phase(opts.timings, "read data"):
        objects, new.inputs = shipped(todo)     # before Ray starts: missing data fails fast
    if opts.resume:
        _check_resumable(opts.run_dir, new)
    else:
        plan.write(opts.run_dir, new)
    return todo, objects


def _finish(opts: RunOptions, todo: list[dict]) -> str:
    """Write the rows and say how the run ended: ok | errors | interrupted."""
    # No trial runs now; what a killed one left is not progress of anything.
    epoch_progress.folder(opts.run_dir).rmtree()
    with phase(opts.timings, "write results"):
        trial_rows, _ = write_results(opts.run_dir)
    statuses = [r["status"] for r in trial_rows if not r["status"].startswith("skipped")]
    if len(statuses) < len(todo) or "running" in statuses:
        return "interrupted"
    return "errors" if "error" in statuses else "ok"


def _warn(view, line: str) -> None:
    if view is not None and hasattr(view, "warn"):
        view.warn(line)


def _check_resumable(run_dir: Place, new: plan.Plan | None, exp: Place | None = None) -> None:
    """Refuse, in one line, a resume that would change the run's results, that would unpickle
    state others could have written, or that finds a checkpoint holding code; then cut any
    result.json line torn by the crash that stopped the run. `exp`: another experiment folder
    of the run than its plan's (a search's cell), whose plan is not checked here."""
    if new is not None:
        plan.check_resume(plan.read(run_dir), new)
    exp = exp or experiment_dir(run_dir)
    # A bucket has no owner and mode to check: who may write there is the bucket policy's
    # matter (docs/cluster.md, Security).
    for folder in (run_dir.local, exp.parent.local, exp.local) if run_dir.local else ():
        info = folder.stat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RunError(f"{folder} can be written by other users; Tune's state in it is pickled and would run "
                           f"their code on --resume: make it yours and `chmod go-w` it first")
    checkpoint.check_all(exp)
    experiment.repair(run_dir, exp)


@contextmanager
def _ray(opts: RunOptions):
    """Connected to Ray for the block (a search's cells and its re-run share one connection),
    every node checked to reach the run folder; Ray is shut down whatever happens."""
    with process.sigterm_as_sigint() as again:
        with phase(opts.timings, "ray start-up"):
            saved = cluster.connect(opts.address, opts.num_cpus, opts.num_gpus)
        again()                   # ray.init installs a SIGTERM handler that aborts
        try:
            if opts.address:      # a private instance is this machine only, which cli checked
                cluster.probe(opts.run_dir)
            yield
        finally:
            with phase(opts.timings, "ray shutdown"):
                cluster.disconnect(saved)


@contextmanager
def _fitting(opts: RunOptions, view, params: list[dict], **active):
    """The block fits a Tuner: the live view runs, the callbacks find the driver's state in
    ACTIVE, and a dead Ray node under the driver surfaces as NodeDied."""
    if view is not None:
        view.start(params)
    ACTIVE.update(run_dir=opts.run_dir, view=view, raylet=None if opts.address else _raylet(), **active)
    try:
        with phase(opts.timings, "tune"):
            yield
    except Exception as e:
        if _dead(ACTIVE.get("raylet")) and not isinstance(e, NodeDied):   # Tune may wrap it
            raise NodeDied("the local Ray node died (its raylet is gone: killed, or out of memory)") from None
        raise
    finally:
        ACTIVE.clear()
        if view is not None:
            view.stop()


def _fit_plan(entries: list[dict], opts: RunOptions, view, objects: dict) -> None:
    """Place and fit the Tuner of a run's plan."""
    params = cluster.place(entries, cluster.shapes(), opts.gpus_per_trial)
    with _fitting(opts, view, params):
        trackers = ray_trackers.callbacks(opts.log, opts.run_dir)
        tuner(params, opts, [JsonLoggerCallback(), ResultsCallback(), *trackers], objects).fit()


# ---------------------------------------------------------------- search

def run_search(doc: dict, trials: dict[str, Trial], opts: RunOptions, view=None) -> str:
    """`raycnn search`: each cell of the search plan `doc` (raycnn.search) searched under ASHA,
    then the best configs re-run with fresh seeds as a run's plan; or the search at
    opts.run_dir resumed. `trials` are the cells as suite trials, by name. Returns ok | errors |
    interrupted."""
    opts = replace(opts, run_dir=storage.resolve(opts.run_dir))
    with lock.hold(opts.run_dir):
        objects, doc["inputs"] = _sample_objects(doc)
        doc = _search_plan(doc, opts)
        outcome = "interrupted"
        try:
            with process.output_to_place(opts.run_dir / RAY_LOG), _ray(opts):
                for cell in [c for c in doc["cells"] if not c.get("best")]:
                    if not _search_cell(doc, cell, opts, view, objects):
                        return outcome
                _settle(opts)
                rerun = replace(opts, repeats=doc["settings"]["repeats"], resume=plan.path(opts.run_dir).exists())
                todo, rerun_objects = _prepare(search.rerun_trials(doc, trials), rerun)
                if todo:          # no cell found a config: nothing to re-run
                    _fit_plan(todo, rerun, view, rerun_objects)
            outcome = _finish(opts, todo)
        except NodeDied as e:
            _warn(view, f"{e}; Ray's log: {opts.run_dir / RAY_LOG}")
        finally:         # also on Ctrl-C: the samples so far are rows
            search.write_samples(opts.run_dir)
            epoch_progress.folder(opts.run_dir).rmtree()
        return outcome


def _settle(opts: RunOptions, limit_s: float = 120.0) -> None:
    """On a private Ray, wait (at most limit_s) until the samples' workers have given their CPUs
    back: they exit after their Tuner ends, and a busy machine can take a while, during which
    the re-run's trials would wait for resources."""
    end = time.monotonic() + limit_s
    while opts.address is None and time.monotonic() < end:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.5)


def _search_plan(doc: dict, opts: RunOptions) -> dict:
    """The search's plan: written, or on --resume the saved one (with the bests found so far),
    refused in one line where the command line would plan another search."""
    if not opts.resume:
        search.write(opts.run_dir, doc)
        return doc
    saved = search.read(opts.run_dir)
    search.check_resume(saved, doc)
    for cell in saved["cells"]:
        exp = search.experiment_dir(opts.run_dir, cell)
        if exp.exists() and not cell.get("best"):
            _check_resumable(opts.run_dir, None, exp)
    return saved


def _sample_objects(doc: dict) -> tuple[dict, dict]:
    """What the samples get through the object store: their datasets without the test split
    (a sample cannot read what it was never sent); and the digests of the data."""
    objects, digests = shipped(doc["cells"])
    return {k: datafiles.without_test(v) if isinstance(v, datafiles.Arrays) else v for k, v in objects.items()}, digests


# The searcher's view of a domain (raycnn.space.Domain), by kind; choices as JSON text.
TUNE_DOMAINS = {
    "loguniform": lambda values: tune.loguniform(*values),
    "uniform": lambda values: tune.uniform(*values),
    "choice": lambda values: tune.choice([space.encode(v) for v in values]),
}


def _optuna(seed: int):
    import optuna                                        # the `search` extra
    from ray.tune.search.optuna import OptunaSearch
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # its per-study lines are not the user's news
    return OptunaSearch(seed=seed)


def _random(seed: int):
    from ray.tune.search import BasicVariantGenerator
    return BasicVariantGenerator(random_state=seed)


SEARCHERS = {"optuna": _optuna, "random": _random}


def _search_cell(doc: dict, cell: dict, opts: RunOptions, view, objects: dict) -> bool:
    """Search one cell (a new Tuner, or its interrupted one restored); True when it ended by
    itself (every sample run, or the epochs cap reached), with its best sample in the plan."""
    settings, exp = doc["settings"], search.experiment_dir(opts.run_dir, cell)
    [placed] = cluster.place([cell], cluster.shapes(), opts.gpus_per_trial)
    fn = tune.with_resources(tune.with_parameters(sample, cell=placed, progress_dir=epoch_progress.folder(opts.run_dir),
                                                  **objects),
                             tune.PlacementGroupFactory([{"CPU": placed["cpus"], "GPU": placed["gpus"]}]))
    rows, epoch_rows = search.sample_rows(opts.run_dir, cell | {"metric": settings["metric"]})
    active = dict(cell=cell | {"metric": settings["metric"]}, exp=exp, budget=cell["budget"],
                  spent={r["folder"]: r["epochs_done"] for r in rows}, reported=_reported(rows, epoch_rows, settings))
    with _fitting(opts, view, [], **active):
        if tune.Tuner.can_restore(exp.path, storage_filesystem=exp.fs):
            tuner_ = tune.Tuner.restore(exp.path, fn, resume_unfinished=True, resume_errored=True,
                                        storage_filesystem=exp.fs)
        else:
            tuner_ = _search_tuner(fn, cell, settings, opts, exp)
        tuner_.fit()
    rows, _ = search.sample_rows(opts.run_dir, cell | {"metric": settings["metric"]})
    ended = rows and all(r["stop"] != "running" for r in rows) and (
        len(rows) >= cell["samples"] or sum(r["epochs_done"] for r in rows) >= cell["budget"])
    if not ended:
        return False
    chosen = search.best(rows, search.METRICS[settings["metric"]])
    cell["best"] = None if chosen is None else {
        "sample": chosen["sample"], "folder": chosen["folder"], "epochs_done": chosen["epochs_done"],
        "metric_value": chosen["metric_value"], "values": {k: chosen[k] for k in chosen["searched"].split(",")}}
    search.write(opts.run_dir, doc)
    return True


def _reported(rows: list[dict], epoch_rows: list[dict], settings: dict) -> dict[str, list[tuple]]:
    """What each sample of a cell reported so far, by folder: (epoch, metric) per epoch, in order
    (RungScheduler replays them into ASHA's record when a search is resumed)."""
    folders = {r["sample"]: r["folder"] for r in rows}
    out: dict[str, list[tuple]] = {}
    for e in sorted(epoch_rows, key=lambda e: (e["sample"], e["epoch"])):
        out.setdefault(folders[e["sample"]], []).append((e["epoch"], e[settings["metric"]]))
    return out


def _search_tuner(fn, cell: dict, settings: dict, opts: RunOptions, exp: Place) -> tune.Tuner:
    """A new Tuner for one cell's samples: ASHA over the epochs, the searcher, the epochs cap."""
    epochs = cell["config"]["epochs"]
    return tune.Tuner(
        fn,
        param_space={k: TUNE_DOMAINS[d.kind](d.values) for k, d in space.from_json(cell["space"]).items()},
        tune_config=tune.TuneConfig(
            metric=settings["metric"], mode=search.METRICS[settings["metric"]], num_samples=cell["samples"],
            scheduler=RungScheduler(time_attr="epoch", max_t=epochs, grace_period=cell["grace"],
                                    reduction_factor=cell["reduction_factor"]),
            search_alg=SEARCHERS[settings["searcher"]](settings["seed"]),
            max_concurrent_trials=opts.max_concurrent, trial_dirname_creator=_sample_dirname),
        run_config=tune.RunConfig(
            name=exp.name, storage_path=exp.parent.path, storage_filesystem=exp.fs, verbose=0, stop=EpochsCap(),
            callbacks=[JsonLoggerCallback(), SearchCallback()],
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _sample_dirname(trial) -> str:
    return search.sample_folder(trial.experiment_tag)


class RungScheduler(ASHAScheduler):
    """Tune's ASHA, which also notes each sample it stops before its last epoch (the rows' stop
    reason "asha"), and which a resumed search gives back its record of the rungs. Holds nothing
    but ASHA's state: the experiment folder and the samples' reports are the running driver's
    (ACTIVE), as for ResultsCallback."""

    def on_trial_add(self, tune_controller, trial):
        """Tune saves no scheduler state, so a restored search's ASHA starts with empty rungs, and
        its next samples would be compared only with those reported since. Each sample's reports
        so far are replayed into its bracket, as ASHA recorded them (its decisions were taken then)."""
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for epoch, value in ACTIVE.get("reported", {}).get(_sample_dirname(trial), []):
            if value is not None:          # a report without the metric: ASHA skips it too
                bracket.on_result(trial, epoch, self._metric_op * value)

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and result.get("epoch", 0) < self._max_t and "exp" in ACTIVE:
            search.record_stop(ACTIVE["exp"], _sample_dirname(trial), result["epoch"])
        return decision


class EpochsCap(tune.Stopper):
    """--budget: the whole search stops once its samples have trained the cell's cap of epochs.
    Tune asks `stop_all` after each result it takes in, one at a time, so no epoch reported
    after the cap is reached is taken. The count is the running driver's (ACTIVE, kept by
    SearchCallback; on resume it starts from the samples' rows), so it survives a restore."""

    def __call__(self, trial_id, result) -> bool:
        return False              # a single sample is ASHA's to stop

    def stop_all(self) -> bool:
        return sum(ACTIVE.get("spent", {}).values()) >= ACTIVE.get("budget", math.inf)


class SearchCallback(ResultsCallback):
    """ResultsCallback for a search's samples: counts the epochs each sample trained (for
    EpochsCap), shows each sample's epoch and rung in the live view, and rewrites the samples'
    Parquet files as samples end."""

    def _meta(self, trial) -> dict:
        cell, folder = ACTIVE["cell"], _sample_dirname(trial)
        return {"name": cell["name"], "repeat": int(folder.split("-")[1]), "order": cell["order"],
                "folder": trial.trial_id, "rungs": cell["rungs"], "config": cell["config"]}

    def _show(self, trial, result: dict, method: str = "update") -> None:
        view = ACTIVE.get("view")
        if view is not None and hasattr(view, method) and "cell" in ACTIVE:
            getattr(view, method)(self._meta(trial), result)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        spent = ACTIVE.setdefault("spent", {})
        folder = _sample_dirname(trial)
        spent[folder] = max(spent.get(folder, 0), result.get("epoch", 0))
        super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not (trial.last_result or {}).get("finished"):     # ASHA or the epochs cap stopped it
            self._show(trial, {"status": "stopped"})
        super().on_trial_complete(iteration, trials, trial, **info)

    def on_step_begin(self, iteration, trials, **info):
        if _dead(ACTIVE.get("raylet")):
            raise NodeDied("the local Ray node died (its raylet is gone: killed, or out of memory)")

    def _write(self) -> None:
        if "run_dir" not in ACTIVE:
            return
        try:
            search.write_samples(ACTIVE["run_dir"])
        except Exception as e:   # never let a results hiccup stop the search; the end rewrites
            logging.getLogger("raycnn").warning("could not write samples yet: %s", e)
