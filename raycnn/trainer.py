"""The one training loop every trial runs: `fit(config, report, checkpoint, checkpoint_dir)`.

Ray-free on purpose: Tune calls `fit` through `raycnn.tune`, tests and scripts call it directly.
Data lives on the device (see `raycnn.data`); loss and accuracy accumulate there too, so a step
never waits for the host. Each epoch ends with one sync, a metrics dict handed to `report`, and
an atomic checkpoint from which `fit` resumes bit for bit (on CPU).
"""
from __future__ import annotations

import math
import os
import resource
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from raycnn import data as data_mod
from raycnn import models

CHECKPOINT_FILE = "state.pt"


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line for the user."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything one trial needs. Defaults are PyTorch's or the report's common settings."""
    model: str = "mnist_base"            # a key of raycnn.models.MODELS
    dataset: str = ""                    # mnist | cifar10; "" = the model's own
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"               # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.0                # SGD only
    weight_decay: float = 0.0            # note: torch's AdamW default is 0.01; suites say so explicitly
    scheduler: str = "none"              # none | multistep
    milestones: tuple[int, ...] = (10, 22)
    gamma: float = 0.1
    augment: tuple[str, ...] = ()        # any of crop, flip, jitter (applied in that order)
    crop_padding: int = 10               # RandomCrop(size, padding=crop_padding)
    flip_p: float = 0.5                  # RandomHorizontalFlip(p)
    brightness: tuple[float, float] = (3.0, 10.0)   # ColorJitter factor ranges, as in the report
    contrast: tuple[float, float] = (3.0, 10.0)
    saturation: tuple[float, float] = (3.0, 10.0)
    hue: tuple[float, float] = (-0.5, 0.5)          # ColorJitter(hue=0.5)
    image_size: int = 0                  # resize inputs to this side on the device; 0 = the model's need
    pretrained: bool = False             # ImageNet weights (resnet18)
    weights: str = ""                    # a state-dict file instead of torchvision's cache
    finetune: str = "all"                # all | head | zero-shot | layer1,...,layer4 (see models.parameter_groups)
    backbone_lr: float = 0.0             # lr of fine-tuned stages; 0 = lr
    classifier_lr: float = 0.0           # lr of the new head; 0 = lr
    early_stopping_patience: int = 0     # stop after this many epochs without a better test accuracy; 0 = off
    precision: str = "auto"              # auto | fp32 | bf16 | fp16
    seed: int = 0
    max_train_samples: int = 0           # train on the first N images; 0 = all
    synthetic: bool = False              # random data of the dataset's shape and size
    data_dir: str = "data"
    eval_batch_size: int = 1000
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    num_threads: int = 0                 # torch CPU threads; 0 = leave as is
    compile: bool = False                # torch.compile the model
    budget: str = "full"                 # full = the suite's; quick (`--quick`) or reduced (--epochs/--max-train-samples)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from plain values (TOML, Parquet rows): lists become tuples, ints widen to floats;
        unknown keys and wrong types raise ConfigError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        defaults = cls()
        values = {}
        for key, value in d.items():
            value = value.tolist() if hasattr(value, "tolist") else value   # numpy values from Parquet
            value = tuple(value) if isinstance(value, list) else value
            want = type(getattr(defaults, key))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)      # TOML's 1 for 1.0
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"{key} must be {want.__name__}, got {value!r}")
            values[key] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dataset_name(self) -> str:
        return self.dataset or models.MODELS[self.model].dataset

    def validate(self) -> "TrainConfig":
        """Raise ConfigError (one line) for what cannot run."""
        checks = [
            (self.model in models.MODELS, f"unknown model {self.model!r}; choose from {', '.join(models.MODELS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"),
            (self.scheduler in SCHEDULERS, f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}"),
            (not set(self.augment) - set(AUGMENTS), f"unknown augmentation(s) {sorted(set(self.augment) - set(AUGMENTS))}; choose from {', '.join(AUGMENTS)}"),
            (self.dataset in ("",) + tuple(data_mod.SHAPES), f"unknown dataset {self.dataset!r}; choose from {', '.join(data_mod.SHAPES)}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.backbone_lr >= 0 and self.classifier_lr >= 0, "backbone_lr and classifier_lr must not be negative"),
            (self.finetune == "all" or self.model == "resnet18", f"finetune={self.finetune!r} needs model resnet18"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.model in models.MODELS and models.MODELS[self.model].dataset != self.dataset_name:
            raise ConfigError(f"model {self.model!r} is built for {models.MODELS[self.model].dataset}, not {self.dataset}")
        try:
            models._stages(self.finetune) if self.finetune != "all" else None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


OPTIMIZERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda g, c: torch.optim.SGD(g, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda g, c: torch.optim.Adam(g, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda g, c: torch.optim.AdamW(g, lr=c.lr, weight_decay=c.weight_decay),
}
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, TrainConfig], Any]] = {
    "none": lambda o, c: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0),
    "multistep": lambda o, c: torch.optim.lr_scheduler.MultiStepLR(o, list(c.milestones), c.gamma),
}
PRECISIONS = {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUGMENTS = ("crop", "flip", "jitter")


def resolve_device(name: str) -> torch.device:
    """auto: CUDA where present, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on CUDA that supports it, fp16 (with GradScaler) on older CUDA, fp32 on CPU."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_arrays(config: TrainConfig) -> data_mod.Arrays:
    """The trial's dataset as numpy arrays (synthetic or read from data_dir), cut to max_train_samples."""
    name = config.dataset_name
    arrays = data_mod.synthetic(name) if config.synthetic else data_mod.read(name, config.data_dir)
    return data_mod.subset(arrays, config.max_train_samples)


@dataclass
class Run:
    """The live objects of one trial."""
    config: TrainConfig
    device: torch.device
    precision: str
    model: torch.nn.Module
    step_model: torch.nn.Module          # the compiled model where config.compile, else model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    data: data_mod.DeviceData
    pipeline: data_mod.Pipeline
    g: torch.Generator                   # device-side: permutations, augmentation parameters
    order_g: torch.Generator             # CPU-side: per-batch choices made on the host

    def autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()


def build_run(config: TrainConfig, arrays: data_mod.Arrays | None = None) -> Run:
    """Model, optimizer, scheduler, data and generators for `config`, seeded."""
    device = resolve_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    spec = models.MODELS[config.model]
    model = models.build(config.model, pretrained=config.pretrained, weights=config.weights or None).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)   # faster convolutions with tensor cores
        torch.backends.cudnn.benchmark = True                 # fixed shapes: pick the fastest kernels once
    groups = models.parameter_groups(model, config.finetune, config.lr,
                                     config.backbone_lr or None, config.classifier_lr or None)
    optimizer = OPTIMIZERS[config.optimizer](groups, config) if groups and groups[0]["params"] else None
    scheduler = SCHEDULERS[config.scheduler](optimizer, config) if optimizer else None
    precision = resolve_precision(config.precision, device)
    jitter = {k: getattr(config, k) for k in data_mod.JITTER_OPS} if "jitter" in config.augment else None
    pipeline = data_mod.Pipeline(config.dataset_name, device,
                                 crop_padding=config.crop_padding if "crop" in config.augment else 0,
                                 flip_p=config.flip_p if "flip" in config.augment else 0.0,
                                 jitter=jitter, size=config.image_size or spec.input_size)
    data = data_mod.DeviceData.from_arrays(arrays if arrays is not None else load_arrays(config), device)
    return Run(config, device, precision, model, torch.compile(model) if config.compile else model,
               optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
               data, pipeline, torch.Generator(device).manual_seed(config.seed),
               torch.Generator().manual_seed(config.seed))


def _layout(run: Run, x: torch.Tensor) -> torch.Tensor:
    """channels_last on CUDA, to match the model's weights (see build_run)."""
    return x.contiguous(memory_format=torch.channels_last) if run.device.type == "cuda" else x


def train_one_epoch(run: Run) -> tuple[float, float, float]:
    """One pass over the training split; returns (loss, accuracy, images/s)."""
    c, d = run.config, run.data
    models.set_train_mode(run.model, c.finetune)
    n = len(d.train_y)
    n -= 1 if n % c.batch_size == 1 else 0     # a last batch of one breaks BatchNorm in training
    perm = torch.randperm(len(d.train_y), device=run.device, generator=run.g)
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    start = time.perf_counter()
    for i in range(0, n, c.batch_size):
        idx = perm[i:min(i + c.batch_size, n)]
        x = _layout(run, run.pipeline(d.train_x[idx], train=True, g=run.g, order_g=run.order_g))
        y = d.train_y[idx]
        with run.autocast():
            out = run.step_model(x)
        loss = F.cross_entropy(out.float(), y)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        loss_sum += loss.detach() * len(idx)
        correct += (out.argmax(1) == y).sum()
    loss_value, acc = loss_sum.item() / n, correct.item() / n   # the epoch's one sync
    return loss_value, acc, n / (time.perf_counter() - start)


@torch.no_grad()
def evaluate(run: Run) -> tuple[float, float]:
    """Loss and accuracy on the whole test split."""
    run.model.eval()
    d = run.data
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    for i in range(0, len(d.test_y), run.config.eval_batch_size):
        x = _layout(run, run.pipeline(d.test_x[i:i + run.config.eval_batch_size]))
        y = d.test_y[i:i + run.config.eval_batch_size]
        with run.autocast():
            out = run.step_model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    n = len(d.test_y)
    return loss_sum.item() / n, correct.item() / n


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory of this process: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- checkpoints

def _rng_state(run: Run) -> dict:
    state = {"torch": torch.get_rng_state(), "g": run.g.get_state(), "order_g": run.order_g.get_state()}
    if run.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.device)
    return state


def save_checkpoint(run: Run, progress: dict, directory: str | Path) -> Path:
    """Write everything needed to resume into directory/state.pt, atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict() if run.optimizer else None,
        "scheduler": run.scheduler.state_dict() if run.scheduler else None,
        "scaler": run.scaler.state_dict(),
        "rng": _rng_state(run),
        "progress": progress,
        "config": run.config.to_dict(),
    }
    path = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def unreadable(path: str | Path, error: Exception) -> str:
    """The one-line warning for a checkpoint that cannot be restored."""
    detail = (str(error).strip().splitlines() or [""])[0][:200]
    return f"checkpoint {path} is unreadable ({type(error).__name__}: {detail}); restarting from scratch"


def _restore(run: Run, path: str | Path) -> dict:
    path = Path(path)
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    # On the CPU: RNG states must be CPU tensors; load_state_dict moves the rest to the device.
    state = torch.load(path, map_location="cpu", weights_only=False)
    run.model.load_state_dict(state["model"])
    if run.optimizer:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    run.g.set_state(rng["g"])
    run.order_g.set_state(rng["order_g"])
    if "cuda" in rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    progress = state["progress"]
    if not isinstance(progress.get("epoch"), int) or not isinstance(progress.get("history"), list):
        raise ValueError("no training progress in it")
    return progress


# ---------------------------------------------------------------- the loop

def _epoch_metrics(run: Run, epoch: int, train: tuple[float, float, float], test: tuple[float, float],
                   seconds: float) -> dict:
    return {
        "epoch": epoch, "train_loss": train[0], "train_acc": train[1], "test_loss": test[0],
        "test_acc": test[1], "lr": run.optimizer.param_groups[0]["lr"] if run.optimizer else 0.0,
        "seconds": seconds, "images_per_s": train[2], "peak_mem_mb": peak_memory_mb(run.device),
        "device": str(run.device), "precision": run.precision,
    }


def fit(config: TrainConfig, report: Callable[[dict, Path | None], None] | None = None,
        checkpoint: str | Path | None = None, checkpoint_dir: str | Path | None = None,
        arrays: data_mod.Arrays | None = None) -> dict:
    """Train `config` to the end and return a summary (see `summarize`).

    After each epoch the metrics dict (epoch, train/test loss and accuracy, lr, seconds,
    images/s, peak memory, status, finished) goes to `report(metrics, checkpoint_dir)`, right after the
    checkpoint was written to `checkpoint_dir` (if given). `checkpoint` (a file or folder written
    earlier) resumes the run exactly where it stopped. `arrays` skips reading the dataset (Tune
    passes one shared copy per node). A loss that turns NaN/inf stops the run with status
    "diverged"; early stopping watches test accuracy, as the report did.

    Reported metrics also carry `resumed` (this call continued from `checkpoint`) and, on the
    first epoch after an unreadable `checkpoint` made the run start over, `warning` saying so;
    neither goes into the history, which stays the same whether or not a run was resumed.
    """
    config.validate()
    arrays = arrays if arrays is not None else load_arrays(config)
    run = build_run(config, arrays)
    progress = {"epoch": 0, "history": [], "best_acc": -1.0, "since_best": 0}
    resumed, warning = False, ""
    if checkpoint is not None:
        try:
            progress, resumed = _restore(run, checkpoint), True
        except Exception as e:   # a corrupt or foreign file must not kill the trial
            warning = unreadable(checkpoint, e)
            warnings.warn(warning)
            del run
            run = build_run(config, arrays)     # a failed restore may have changed some of it
    if config.finetune == "zero-shot":
        return _zero_shot(run, report)
    status = progress["history"][-1]["status"] if progress["history"] else "running"
    while status == "running" and progress["epoch"] < config.epochs:
        start = time.perf_counter()
        train = train_one_epoch(run)
        test = evaluate(run)
        run.scheduler.step()
        epoch = progress["epoch"] = progress["epoch"] + 1
        better = test[1] > progress["best_acc"]
        progress["best_acc"] = max(progress["best_acc"], test[1])
        progress["since_best"] = 0 if better else progress["since_best"] + 1
        metrics = _epoch_metrics(run, epoch, train, test, time.perf_counter() - start)
        status = _status(config, train[0], progress, epoch)
        metrics.update(status=status, finished=status != "running")
        progress["history"].append(metrics)
        if checkpoint_dir is not None:
            save_checkpoint(run, progress, checkpoint_dir)
        if report is not None:
            extra = {"resumed": resumed} | ({"warning": warning} if warning else {})
            warning = ""
            report(metrics | extra, Path(checkpoint_dir) if checkpoint_dir is not None else None)
    return summarize(progress["history"])


def _status(config: TrainConfig, train_loss: float, progress: dict, epoch: int) -> str:
    if not math.isfinite(train_loss):
        return "diverged"
    if config.early_stopping_patience and progress["since_best"] >= config.early_stopping_patience:
        return "stopped"     # early stopping; counted as ok in the summary
    return "ok" if epoch >= config.epochs else "running"


def _zero_shot(run: Run, report: Callable | None) -> dict:
    """Evaluate the pretrained model with its new, untrained head: no training at all."""
    start = time.perf_counter()
    test = evaluate(run)
    nan = float("nan")
    metrics = _epoch_metrics(run, 0, (nan, nan, nan), test, time.perf_counter() - start)
    metrics.update(status="ok", finished=True)
    if report is not None:
        report(metrics, None)
    return summarize([metrics])


def summarize(history: list[dict]) -> dict:
    """The trial's result: status (ok | diverged), final test accuracy (after the last epoch, the
    report's headline figure), best test accuracy and its epoch, epochs done, mean images/s."""
    last = history[-1]
    best = max(history, key=lambda m: m["test_acc"])
    trained = [m["images_per_s"] for m in history if math.isfinite(m["images_per_s"])]
    return {
        "status": "diverged" if last["status"] == "diverged" else "ok",
        "final_test_acc": last["test_acc"], "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
        "epochs_done": last["epoch"], "train_seconds": sum(m["seconds"] for m in history),
        "images_per_s": sum(trained) / len(trained) if trained else float("nan"),
        "device": last["device"], "precision": last["precision"], "history": history,
    }
