"""The one training loop every trial runs: `fit(config, report, checkpoint, checkpoint_dir)`.

Ray-free on purpose: Tune calls `fit` through `raycnn.tune`, tests and scripts call it directly.
Data lives on the device (see `raycnn.data`); loss and accuracy accumulate there too, so a step
never waits for the host. Each epoch ends with one sync, a metrics dict handed to `report`, and
an atomic checkpoint from which `fit` resumes bit for bit (on CPU).
"""
from __future__ import annotations

import math
import os
import re
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
BEST_FILE = "best.pt"            # the best epoch's model, beside the last epoch's state


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
    jitter_mode: str = "fast"            # fast: float ops, order per batch | faithful: PIL's 8-bit ops, order per image
    normalize: str = "dataset"           # dataset | half | imagenet: the mean/std of data.NORMALIZATIONS
    image_size: int = 0                  # resize inputs to this side on the device; 0 = the model's need
    pretrained: bool = False             # ImageNet weights (resnet18)
    weights: str = ""                    # a state-dict file instead of torchvision's cache
    finetune: str = "all"                # all | head | zero-shot | layer1,...,layer4 (see models.parameter_groups)
    backbone_lr: float = 0.0             # lr of fine-tuned stages; 0 = lr
    classifier_lr: float = 0.0           # lr of the new head; 0 = lr
    early_stopping_patience: int = 0     # stop after this many epochs without a better selection accuracy; 0 = off
    val_fraction: float = 0.0            # hold this share of the training set out for selection; 0 = select on test, as the report
    precision: str = "auto"              # auto | fp32 | bf16 | fp16
    seed: int = 0
    max_train_samples: int = 0           # train on the first N images; 0 = all
    synthetic: bool = False              # random data of the dataset's shape and size
    data_dir: str = "data"
    eval_batch_size: int = 1000
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    num_threads: int = 0                 # torch CPU threads; 0 = leave as is
    compile: bool = False                # torch.compile the model
    checkpoint_every: int = 1            # checkpoint every N epochs (and the last); a crash loses < N epochs
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
            if key in SCALAR_RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = SCALAR_RANGES[key](key, float(value))     # ColorJitter's scalar forms
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
        """Raise ConfigError (one line, naming the key) for what cannot run or makes no sense."""
        spec = models.MODELS.get(self.model)
        checks = [
            (self.model in models.MODELS, f"unknown model {self.model!r}; choose from {', '.join(models.MODELS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"),
            (self.scheduler in SCHEDULERS, f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}"),
            (self.jitter_mode in data_mod.JITTER_MODES, f"unknown jitter_mode {self.jitter_mode!r}; choose from {', '.join(data_mod.JITTER_MODES)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}"),
            (not set(self.augment) - set(AUGMENTS), f"unknown augmentation(s) {sorted(set(self.augment) - set(AUGMENTS))}; choose from {', '.join(AUGMENTS)}"),
            (self.dataset in ("",) + tuple(data_mod.SHAPES), f"unknown dataset {self.dataset!r}; choose from {', '.join(data_mod.SHAPES)}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.checkpoint_every > 0, f"checkpoint_every must be positive, got {self.checkpoint_every}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.backbone_lr >= 0 and self.classifier_lr >= 0, "backbone_lr and classifier_lr must not be negative"),
            (self.finetune == "all" or self.model == "resnet18", f"finetune={self.finetune!r} needs model resnet18"),
            (spec is None or not self.pretrained or spec.pretrainable,
             f"pretrained = true needs a model with ImageNet weights ({', '.join(n for n, m in models.MODELS.items() if m.pretrainable)}), not {self.model!r}"),
            (self.normalize in data_mod.NORMALIZATIONS, f"unknown normalize {self.normalize!r}; choose from {', '.join(data_mod.NORMALIZATIONS)}"),
            (self.crop_padding >= 0, f"crop_padding must not be negative, got {self.crop_padding}"),
            (0.0 <= self.flip_p <= 1.0, f"flip_p must be a probability in [0, 1], got {self.flip_p}"),
            (self.momentum >= 0 and self.weight_decay >= 0, f"momentum and weight_decay must not be negative, got {self.momentum} and {self.weight_decay}"),
            (self.gamma > 0, f"gamma must be positive, got {self.gamma}"),
            (all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in self.milestones)
             and list(self.milestones) == sorted(set(self.milestones)),
             f"milestones must be positive epochs in increasing order, got {list(self.milestones)}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.early_stopping_patience >= 0, f"early_stopping_patience must not be negative, got {self.early_stopping_patience}"),
            (self.max_train_samples >= 0 and self.image_size >= 0, "max_train_samples and image_size must not be negative"),
            *(_range_check(key, getattr(self, key)) for key in JITTER_BOUNDS),
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
        channels = data_mod.SHAPES[self.dataset_name][0]
        if len(data_mod.normalization(self.normalize, self.dataset_name)[0]) != channels:
            raise ConfigError(f"normalize = {self.normalize!r} is for 3-channel images; {self.dataset_name} has {channels}")
        return self


# ColorJitter's ranges: the factor bounds torchvision accepts for each op (hue: a turn of the
# circle either way), and its scalar forms: brightness = b means [max(0, 1 - b), 1 + b],
# hue = h means [-h, h].
JITTER_BOUNDS = {"brightness": (0.0, math.inf), "contrast": (0.0, math.inf),
                 "saturation": (0.0, math.inf), "hue": (-0.5, 0.5)}


def _factor_range(key: str, v: float) -> tuple[float, float]:
    if v < 0:
        raise ConfigError(f"{key} = {v:g}: a single number must not be negative (it means [1 - {key}, 1 + {key}])")
    return (max(0.0, 1.0 - v), 1.0 + v)


def _hue_range(key: str, v: float) -> tuple[float, float]:
    if not 0 <= v <= 0.5:
        raise ConfigError(f"{key} = {v:g}: a single number must be in [0, 0.5] (it means [-{key}, {key}])")
    return (-v, v)


SCALAR_RANGES = {"brightness": _factor_range, "contrast": _factor_range,
                 "saturation": _factor_range, "hue": _hue_range}


def _range_check(key: str, value: tuple) -> tuple[bool, str]:
    """(ok, message) for one ColorJitter range: two numbers, lo <= hi, inside JITTER_BOUNDS."""
    lo_bound, hi_bound = JITTER_BOUNDS[key]
    ok = (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
          and lo_bound <= value[0] <= value[1] <= hi_bound)
    return ok, f"{key} must be [lo, hi] with {lo_bound:g} <= lo <= hi <= {hi_bound:g}, got {list(value)}"


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
    """auto: bf16 on CUDA that supports it natively, fp16 (with GradScaler) on older CUDA, fp32 on CPU."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "fp32"
    # Without including_emulation=False, pre-Ampere GPUs (V100, T4) answer True and get a slow,
    # emulated bf16 instead of their fast fp16.
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def scheduled_lrs(config: TrainConfig) -> list[float]:
    """The learning rate each epoch 1..epochs trains with under `config`'s scheduler, for the
    first parameter group (all parameters, or the classifier when fine-tuning)."""
    first = (config.classifier_lr or config.lr) if config.finetune != "all" else config.lr
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=first)
    scheduler = SCHEDULERS[config.scheduler](optimizer, config)
    lrs = []
    for _ in range(config.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def load_arrays(config: TrainConfig) -> data_mod.Arrays:
    """The trial's dataset as numpy arrays (synthetic or read from data_dir), cut to max_train_samples."""
    name = config.dataset_name
    arrays = data_mod.synthetic(name) if config.synthetic else data_mod.read(name, config.data_dir)
    return data_mod.subset(arrays, config.max_train_samples)


@dataclass
class Training:
    """The live objects of one trial's training (one model, one seed)."""
    config: TrainConfig
    device: torch.device
    precision: str
    layout: torch.memory_format          # of the model's weights and its inputs (see memory_format)
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


def build_pipeline(config: TrainConfig, device: torch.device) -> data_mod.Pipeline:
    """The trial's input pipeline: the augmentations `config.augment` names with their
    settings, the model's input size and the declared normalization."""
    jitter = {k: getattr(config, k) for k in data_mod.JITTER_OPS} if "jitter" in config.augment else None
    return data_mod.Pipeline(config.dataset_name, device,
                             crop_padding=config.crop_padding if "crop" in config.augment else 0,
                             flip_p=config.flip_p if "flip" in config.augment else 0.0,
                             jitter=jitter, size=config.image_size or models.MODELS[config.model].input_size,
                             jitter_mode=config.jitter_mode, normalize=config.normalize)


def build_training(config: TrainConfig, arrays: data_mod.Arrays | None = None) -> Training:
    """Model, optimizer, scheduler, data and generators for `config`, seeded."""
    device = resolve_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    model = models.build(config.model, pretrained=config.pretrained, weights=config.weights or None).to(device)
    layout = memory_format(config.model, device)
    model = model.to(memory_format=layout)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True                 # fixed shapes: pick the fastest kernels once
    groups = models.parameter_groups(model, config.finetune, config.lr,
                                     config.backbone_lr or None, config.classifier_lr or None)
    optimizer = OPTIMIZERS[config.optimizer](groups, config) if groups and groups[0]["params"] else None
    scheduler = SCHEDULERS[config.scheduler](optimizer, config) if optimizer else None
    precision = resolve_precision(config.precision, device)
    pipeline = build_pipeline(config, device)
    arrays = data_mod.hold_out(arrays if arrays is not None else load_arrays(config), config.val_fraction)
    data = data_mod.DeviceData.from_arrays(arrays, device)
    return Training(config, device, precision, layout, model, torch.compile(model) if config.compile else model,
                    optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                    data, pipeline, torch.Generator(device).manual_seed(config.seed),
                    torch.Generator().manual_seed(config.seed))


def memory_format(model: str, device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (tensor cores want it) and, on the CPU, for the models oneDNN trains
    faster that way (models.ModelSpec.cpu_channels_last); else torch's default."""
    fast = device.type == "cuda" or models.MODELS[model].cpu_channels_last
    return torch.channels_last if fast else torch.contiguous_format


def train_one_epoch(training: Training, on_step: Callable[[int, int], None] | None = None
                    ) -> tuple[float, float, float]:
    """One pass over the training split; returns (loss, accuracy, images/s). `on_step(step,
    steps)` is called after each optimizer step with host-side counts only (no device sync)."""
    c, d = training.config, training.data
    models.set_train_mode(training.model, c.finetune)
    n = len(d.train_y)
    n -= 1 if n % c.batch_size == 1 else 0     # a last batch of one breaks BatchNorm in training
    perm = torch.randperm(len(d.train_y), device=training.device, generator=training.g)
    loss_sum = torch.zeros((), device=training.device)
    correct = torch.zeros((), device=training.device, dtype=torch.long)
    steps = -(-n // c.batch_size)
    start = time.perf_counter()
    for step, i in enumerate(range(0, n, c.batch_size), 1):
        idx = perm[i:min(i + c.batch_size, n)]
        x = training.pipeline(d.train_x[idx], train=True, g=training.g, order_g=training.order_g
                              ).contiguous(memory_format=training.layout)
        y = d.train_y[idx]
        with training.autocast():
            out = training.step_model(x)
        loss = F.cross_entropy(out.float(), y)
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        loss_sum += loss.detach() * len(idx)
        correct += (out.argmax(1) == y).sum()
        if on_step is not None:
            on_step(step, steps)
    loss_value, acc = loss_sum.item() / n, correct.item() / n   # the epoch's one sync
    return loss_value, acc, n / (time.perf_counter() - start)


@torch.no_grad()
def evaluate(training: Training, split: str = "test") -> tuple[float, float]:
    """Loss and accuracy on the whole `split` (test | val); NaN for a split that is not there."""
    training.model.eval()
    images, labels = getattr(training.data, f"{split}_x"), getattr(training.data, f"{split}_y")
    if images is None:
        return math.nan, math.nan
    loss_sum = torch.zeros((), device=training.device)
    correct = torch.zeros((), device=training.device, dtype=torch.long)
    step = training.config.eval_batch_size
    for i in range(0, len(labels), step):
        x = training.pipeline(images[i:i + step]).contiguous(memory_format=training.layout)
        y = labels[i:i + step]
        with training.autocast():
            out = training.step_model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    return loss_sum.item() / len(labels), correct.item() / len(labels)


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_mb`: Tune reuses a trial's process for the next trial.

    CUDA: the allocator's peak. CPU (Linux): the process's peak resident set (writing 5 to
    clear_refs sets it to the current RSS); elsewhere the CPU peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last `reset_peak_memory` (fit calls it when a trial starts): on CUDA
    the allocator's peak on that device; on the CPU the whole process's peak resident memory
    (Linux's VmHWM, data and libraries included), or without /proc its peak since it started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s*(\d+) kB", PROC_STATUS.read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- checkpoints

def _rng_state(training: Training) -> dict:
    state = {"torch": torch.get_rng_state(), "g": training.g.get_state(), "order_g": training.order_g.get_state()}
    if training.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(training.device)
    return state


def save_checkpoint(training: Training, progress: dict, directory: str | Path) -> Path:
    """Write everything needed to resume into directory/state.pt, atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict() if training.optimizer else None,
        "scheduler": training.scheduler.state_dict() if training.scheduler else None,
        "scaler": training.scaler.state_dict(),
        "rng": _rng_state(training),
        "progress": progress,
        "config": training.config.to_dict(),
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


def _restore(training: Training, path: str | Path) -> dict:
    path = Path(path)
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    # On the CPU: RNG states must be CPU tensors; load_state_dict moves the rest to the device.
    state = torch.load(path, map_location="cpu", weights_only=False)
    training.model.load_state_dict(state["model"])
    if training.optimizer:
        training.optimizer.load_state_dict(state["optimizer"])
        training.scheduler.load_state_dict(state["scheduler"])
    training.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    training.g.set_state(rng["g"])
    training.order_g.set_state(rng["order_g"])
    if "cuda" in rng and training.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], training.device)
    progress = state["progress"]
    if not isinstance(progress.get("epoch"), int) or not isinstance(progress.get("history"), list):
        raise ValueError("no training progress in it")
    return progress


# ---------------------------------------------------------------- the loop

def learning_rates(training: Training) -> tuple[float, float]:
    """(lr, lr_backbone) the optimizer trains with now: `lr` is the first group's (every
    parameter, or the new classifier when fine-tuning), `lr_backbone` the fine-tuned stages'
    (NaN when no stage trains); (0, NaN) with nothing to train."""
    if not training.optimizer:
        return 0.0, math.nan
    groups = training.optimizer.param_groups
    stages = [g["lr"] for g in groups if g.get("name") in models.RESNET_STAGES]
    return groups[0]["lr"], stages[0] if stages else math.nan


def _epoch_metrics(training: Training, epoch: int, train: tuple[float, float, float], test: tuple[float, float],
                   val: tuple[float, float], rates: tuple[float, float], seconds: float) -> dict:
    return {
        "epoch": epoch, "train_loss": train[0], "train_acc": train[1], "test_loss": test[0],
        "test_acc": test[1], "val_loss": val[0], "val_acc": val[1], "lr": rates[0], "lr_backbone": rates[1],
        "seconds": seconds, "images_per_s": train[2], "peak_mem_mb": peak_memory_mb(training.device),
        "device": str(training.device), "precision": training.precision,
    }


def save_best(training: Training, epoch: int, directory: str | Path) -> Path:
    """Keep the model of the best epoch so far in directory/best.pt (atomic), beside state.pt."""
    path = Path(directory) / BEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)     # an epoch may beat the best before any checkpoint
    tmp = path.with_name(f".{BEST_FILE}.{os.getpid()}.tmp")
    torch.save({"model": training.model.state_dict(), "epoch": epoch, "config": training.config.to_dict()}, tmp)
    os.replace(tmp, path)
    return path


def fit(config: TrainConfig, report: Callable[[dict, Path | None], None] | None = None,
        checkpoint: str | Path | None = None, checkpoint_dir: str | Path | None = None,
        arrays: data_mod.Arrays | None = None, on_batch: Callable[[int, int, int], None] | None = None) -> dict:
    """Train `config` to the end and return a summary (see `summarize`).

    After each epoch the metrics dict (epoch, train/test/val loss and accuracy, the learning
    rates the epoch trained with, seconds, images/s, peak memory, status, finished) goes to
    `report(metrics, checkpoint_dir)`, right after the checkpoint was written to
    `checkpoint_dir` (if given; every `checkpoint_every` epochs and after the last, else `report`
    gets None), where best.pt also keeps the best epoch's model. `checkpoint`
    (a file or folder written earlier) resumes the training exactly where it stopped. `arrays`
    skips reading the dataset (Tune passes one shared copy per node). A loss that turns NaN/inf
    stops the training with status "diverged". Early stopping and the best epoch watch the
    selection accuracy: the validation split's where `val_fraction` holds one out, else the
    test set's, as the report did.

    Reported metrics also carry `resumed` (this call continued from `checkpoint`) and, on the
    first epoch after an unreadable `checkpoint` made the training start over, `warning` saying so;
    neither goes into the history, which stays the same whether or not the training was resumed.

    `on_batch(epoch, step, steps)` hears of every optimizer step inside an epoch (epoch counts
    from 1), without a device sync: for progress inside long epochs (`raycnn.epoch_progress`).
    """
    config.validate()
    reset_peak_memory(resolve_device(config.device))     # this trial's peak, not its process's
    arrays = arrays if arrays is not None else load_arrays(config)
    training = build_training(config, arrays)
    progress = {"epoch": 0, "history": [], "best_acc": -1.0, "since_best": 0}
    resumed, warning = False, ""
    if checkpoint is not None:
        try:
            progress, resumed = _restore(training, checkpoint), True
        except Exception as e:   # a corrupt or foreign file must not kill the trial
            warning = unreadable(checkpoint, e)
            warnings.warn(warning)
            del training
            training = build_training(config, arrays)     # a failed restore may have changed some of it
    if config.finetune == "zero-shot":
        return _zero_shot(training, report)
    status = progress["history"][-1]["status"] if progress["history"] else "running"
    while status == "running" and progress["epoch"] < config.epochs:
        start = time.perf_counter()
        rates = learning_rates(training)          # the rates this epoch trains with, before the step
        epoch = progress["epoch"] + 1
        on_step = (lambda step, steps: on_batch(epoch, step, steps)) if on_batch else None
        train = train_one_epoch(training, on_step)
        test, val = evaluate(training), evaluate(training, "val")
        training.scheduler.step()
        progress["epoch"] = epoch
        chosen = val[1] if config.val_fraction else test[1]
        better = chosen > progress["best_acc"]
        progress["best_acc"] = max(progress["best_acc"], chosen)
        progress["since_best"] = 0 if better else progress["since_best"] + 1
        metrics = _epoch_metrics(training, epoch, train, test, val, rates, time.perf_counter() - start)
        status = _status(config, train[0], progress, epoch)
        metrics.update(status=status, finished=status != "running")
        progress["history"].append(metrics)
        saved = checkpoint_dir is not None and (epoch % config.checkpoint_every == 0 or status != "running"
                                                or epoch == config.epochs)
        if saved:
            save_checkpoint(training, progress, checkpoint_dir)
        if better and checkpoint_dir is not None:      # the best model is kept whatever the interval
            save_best(training, epoch, checkpoint_dir)
        if report is not None:
            extra = {"resumed": resumed} | ({"warning": warning} if warning else {})
            warning = ""
            report(metrics | extra, Path(checkpoint_dir) if saved else None)
    return summarize(progress["history"])


def _status(config: TrainConfig, train_loss: float, progress: dict, epoch: int) -> str:
    """running | ok | stopped (early stopping ended it before its last epoch) | diverged."""
    if not math.isfinite(train_loss):
        return "diverged"
    if epoch >= config.epochs:
        return "ok"          # ran every epoch, even where patience ran out on the last one
    if config.early_stopping_patience and progress["since_best"] >= config.early_stopping_patience:
        return "stopped"
    return "running"


def _zero_shot(training: Training, report: Callable | None) -> dict:
    """Evaluate the pretrained model with its new, untrained head: no training at all."""
    start = time.perf_counter()
    test, val = evaluate(training), evaluate(training, "val")
    nan = float("nan")
    metrics = _epoch_metrics(training, 0, (nan, nan, nan), test, val, learning_rates(training),
                             time.perf_counter() - start)
    metrics.update(status="ok", finished=True)
    if report is not None:
        report(metrics, None)
    return summarize([metrics])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def outcome(history: list[dict]) -> dict:
    """What a trial's epoch metrics amount to; the one rule for `fit` and for Tune's result rows.

    status: ok (every epoch trained, or early stopping ended it) | diverged | running (no last
    epoch yet). best_epoch: the epoch of the highest selection accuracy (validation where the
    epochs carry one, else test), best_test_acc its test accuracy. final_test_acc, the headline,
    is the test accuracy of the model the trial reports, from epoch reported_epoch: the last
    epoch's, as the report did, except after early stopping, which reports the best epoch's
    (its weights are best.pt). epochs_done is the epoch it stopped at, early_stopped says
    whether patience ran out first."""
    nan = math.nan
    if not history:
        return {"status": "running", "early_stopped": False, "final_test_acc": nan, "reported_epoch": -1,
                "best_test_acc": nan, "best_epoch": -1, "epochs_done": 0, "images_per_s": nan}
    last = history[-1]
    key = "val_acc" if any(_finite(m.get("val_acc")) for m in history) else "test_acc"
    best = max(history, key=lambda m: m[key] if _finite(m.get(key)) else -math.inf)
    stopped = last.get("status") == "stopped"
    reported = best if stopped else last
    trained = [m["images_per_s"] for m in history if _finite(m.get("images_per_s"))]
    return {
        "status": {"stopped": "ok"}.get(last.get("status"), last.get("status")),
        "early_stopped": stopped,
        "final_test_acc": reported.get("test_acc", nan), "reported_epoch": reported.get("epoch", -1),
        "best_test_acc": best.get("test_acc", nan), "best_epoch": best.get("epoch", -1),
        "epochs_done": last.get("epoch", 0),
        "images_per_s": sum(trained) / len(trained) if trained else nan,
    }


def summarize(history: list[dict]) -> dict:
    """`fit`'s result: the `outcome` of `history`, with training seconds, device, precision and
    the history itself."""
    last = history[-1]
    return outcome(history) | {
        "train_seconds": sum(m["seconds"] for m in history),
        "device": last["device"], "precision": last["precision"], "history": history,
    }
