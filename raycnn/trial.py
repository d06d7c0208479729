"""The Tune trial function: one trial of a run's plan is one `raycnn.trainer.fit`, reporting
each epoch with its checkpoint, so a failed trial restarts from its last epoch.

Runs in a Ray worker. Datasets and `--weights` files arrive through Ray's object store
(`tune.with_parameters`), so no worker needs the driver's files. Every report carries where
and with what the trial trained (node, versions, git revision), stamped here, on the worker
that trained, not on the driver.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import ray
from ray import tune

from raycnn import datafiles, space
from raycnn.config import TrainConfig
from raycnn.epoch_progress import ProgressFile
from raycnn.experiment import trial_folder
from raycnn.provenance import provenance
from raycnn.storage import Place
from raycnn.trainer import fit


def data_key(config: TrainConfig) -> str:
    """The key of a trial's dataset among those the driver ships."""
    return f"{config.dataset_name}{'-synthetic' if config.synthetic else ''}"


# The key of the --weights file's bytes among the shipped objects. Not its path: a resumed run
# may find the same file elsewhere (the plan holds its sha256), and a trial restored by Tune
# still carries the path the run started with.
WEIGHTS_KEY = "weights"


def _stamp() -> dict:
    """Where this worker is, what Ray granted it, and what it runs."""
    ctx = ray.get_runtime_context()
    node_id, host = ctx.get_node_id(), socket.gethostname()
    return {"node": f"{host}/{node_id[:8]}", "hostname": host, "node_id": node_id,
            "resources": ctx.get_assigned_resources(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], **provenance()}


def trainable(param: dict, progress_dir: Place, **shipped) -> None:
    """One trial: fit its plan entry's config, reporting each epoch with its checkpoint to Tune,
    and its progress inside each epoch to a file in `progress_dir` (for the live view)."""
    entry = param["trial"]
    _train(entry, trial_folder(entry), progress_dir, shipped)


def sample(params: dict, cell: dict, progress_dir: Place, **shipped) -> None:
    """One sample of a search: the cell's sample config (`raycnn.search.cell_plan`: validation
    split held out, no test evaluation) with the searcher's values, trained as a trial is; its
    datasets arrive without their test split."""
    values = space.decode(params, space.from_json(cell["space"]))
    config = space.apply(TrainConfig.from_dict(cell["config"]), values)
    _train(cell | {"config": config.to_dict()}, tune.get_context().get_trial_id(), progress_dir, shipped)


def _train(entry: dict, progress_name: str, progress_dir: Place, shipped: dict) -> None:
    config = TrainConfig.from_dict(entry["config"]).validate()
    arrays = datafiles.subset(shipped[data_key(config)], config.max_train_samples)
    stamp = _stamp()
    restored = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="raycnn-") as tmp:
        if config.weights:     # the driver's file, as bytes: written here for the model to load
            local = Path(tmp) / "weights.pt"
            local.write_bytes(shipped[WEIGHTS_KEY])
            config = TrainConfig.from_dict({**entry["config"], "weights": str(local)})
        resume = restored.to_directory(os.path.join(tmp, "resume")) if restored else None

        def report(metrics: dict, checkpoint_dir: Path | None) -> None:
            ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            if metrics.get("warning") and resume:     # name Tune's checkpoint, not our temp copy
                metrics = metrics | {"warning": metrics["warning"].replace(resume, restored.path)}
            tune.report(metrics | stamp, checkpoint=ckpt)

        on_batch = ProgressFile(progress_dir / f"{progress_name}.json", config.batch_size)
        on_batch.remove()     # a restarted trial's old file is not its progress
        try:
            fit(config, report=report, checkpoint=resume, checkpoint_dir=os.path.join(tmp, "ck"), arrays=arrays,
                on_batch=on_batch)
        finally:
            on_batch.remove()
