"""Experiment trackers for `raycnn run --log`: Tune's TensorBoard and MLflow logger callbacks.

A Ray module (it imports Ray): `raycnn.tune` adds `callbacks(...)` to the Tuner's callbacks.
Both loggers name each trial as raycnn does (`mnist/base/sgd/lr0.01 r0`: trial name, repeat),
log the trial's config fields as parameters and every epoch's metrics, and never see a NaN or
inf: a config without a report number (report_acc = NaN) or a diverged epoch's loss would make
tensorboardX print "NaN or Inf found" warnings over the live view, so such values are left out
of what is logged (they stay in the Parquet results).
"""
from __future__ import annotations

import logging
import math
import numbers

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.utils import flatten_dict

from raycnn.storage import Place

# The default local store, inside the run folder: an SQLite file (MLflow 3 refuses new
# file-based stores); `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db` shows it.
MLFLOW_DB = "mlflow.db"
# Tune's bookkeeping in every result that says nothing about training, and where the trial ran.
NOT_METRICS = ("config", "pid", "timestamp", "date", "hostname", "node_ip", "trial_id", "experiment_tag",
               "resources", "gpu_ids", "node_id")


def finite(values: dict) -> dict:
    """The items of a flat dict that a tracker can take: NaN/inf numbers dropped, bools and
    other numbers kept, strings kept, lists and tuples as their text (e.g. milestones)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, numbers.Number) and not isinstance(value, bool) and not math.isfinite(value):
            continue
        out[key] = str(list(value)) if isinstance(value, (list, tuple)) else value
    return out


def trial_name(trial) -> str:
    """The raycnn name of a Tune trial: "suite/trial rREPEAT"."""
    meta = trial.config["trial"]
    return f"{meta['name']} r{meta['repeat']}"


def params(trial) -> dict:
    """What a trial is, as tracker parameters: every TrainConfig field, then the trial's name,
    repeat, place in the report's tables and the report's accuracy (where it has one)."""
    meta = trial.config["trial"]
    about = {k: meta[k] for k in ("name", "suite", "table", "row", "column", "repeat", "report_acc")}
    return finite({**meta["config"], **about, "cpus_per_trial": meta["cpus"], "gpus_per_trial": meta["gpus"]})


def metrics(result: dict) -> dict:
    """An epoch's result as finite numbers: Tune's bookkeeping and the config left out."""
    kept = {k: v for k, v in result.items() if k not in NOT_METRICS}
    return {k: v for k, v in finite(flatten_dict(kept, delimiter="/")).items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool)}


class TensorBoard(TBXLoggerCallback):
    """TBXLoggerCallback writing finite scalars only, with raycnn's config fields as hparams.

    Event files go into each trial's folder (named after the trial) under the run's Tune
    experiment: `tensorboard --logdir RUN/tune/experiment`."""

    def log_trial_result(self, iteration: int, trial, result: dict):
        super().log_trial_result(iteration, trial, metrics(result))   # keeps training_iteration: the step

    def _try_log_hparams(self, trial, result: dict):
        from tensorboardX.summary import hparams
        writer = self._trial_writer[trial].file_writer
        for summary in hparams(hparam_dict=params(trial), metric_dict=finite(result)):
            writer.add_summary(summary)


class MLflow(MLflowLoggerCallback):
    """MLflowLoggerCallback with one MLflow run per trial named as raycnn names it, the trial's
    config fields as params, and every epoch's finite metrics at step = epoch."""

    def setup(self, *args, **kwargs):
        # MLflow's INFO lines ("Creating initial MLflow database tables...") would print over
        # the live view; its warnings and errors still show.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial):
        if trial not in self._trial_runs:
            name = trial_name(trial)
            run = self.mlflow_util.start_run(tags={**self.tags, "trial_name": name}, run_name=name)
            self._trial_runs[trial] = run.info.run_id
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=params(trial))

    def log_trial_result(self, iteration: int, trial, result: dict):
        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics(result),
                                     step=result["training_iteration"])

    def log_trial_end(self, trial, failed: bool = False):
        if trial in self._trial_runs:   # params went in at the start: do not log them again
            self.mlflow_util.end_run(run_id=self._trial_runs.pop(trial), status="FAILED" if failed else "FINISHED")


def mlflow_uri(run_dir: Place, uri: str | None) -> str:
    """The tracking URI: the one given, else a local store, RUN/mlflow.db (the CLI asks for a
    URI where the run folder is in a bucket: SQLite needs a local file)."""
    return uri or f"sqlite:///{run_dir.local / MLFLOW_DB}"


# --log NAME -> the callback for a run folder and the URI given after "=" (None if none).
BUILDERS = {
    "tensorboard": lambda run_dir, uri: TensorBoard(),
    "mlflow": lambda run_dir, uri: MLflow(tracking_uri=mlflow_uri(run_dir, uri), experiment_name=run_dir.name),
}


def callbacks(log: tuple, run_dir: Place) -> list:
    """The Tune callbacks for `--log` values, each (name, uri or None); [] for none."""
    return [BUILDERS[name](run_dir, uri) for name, uri in log]
