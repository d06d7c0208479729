"""The one training loop every trial runs: `fit(config, report, checkpoint, checkpoint_dir)`.

Ray-free on purpose: Tune calls `fit` through `raycnn.trial`, tests and scripts call it directly.
Data lives on the device (`raycnn.augment`); loss and accuracy accumulate there too, so a step
never waits for the host. Each epoch ends with one sync, a checkpoint (`raycnn.checkpoint`) from
which `fit` resumes bit for bit (on CPU), and a report: the epoch's metrics and what the trial
amounts to so far (`raycnn.outcome`), which is the trial's result row as it stands.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from raycnn import augment, checkpoint as ckpt, datafiles, memory, models
from raycnn.config import JITTER_OPS, MODELS, RESNET_STAGES, TrainConfig
from raycnn.errors import CheckpointError
from raycnn.outcome import outcome

OPTIMIZERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda g, c: torch.optim.SGD(g, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda g, c: torch.optim.Adam(g, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda g, c: torch.optim.AdamW(g, lr=c.lr, weight_decay=c.weight_decay),
}
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, TrainConfig], Any]] = {
    "none": lambda o, c: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0),
    "multistep": lambda o, c: torch.optim.lr_scheduler.MultiStepLR(o, list(c.milestones), c.gamma),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}     # autocast's dtype per precision


def resolve_device(name: str) -> torch.device:
    """auto: CUDA where present, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# Whether bf16 autocast on the CPU passed the accuracy check that decides `auto` there (fp32 against
# bf16, seeds 0-2, mnist/base/sgd-momentum/lr0.01 at 10 epochs and cifar10/base/scheduler at 30;
# results/precision-fp32 and results/precision-bf16). It did not: bf16 ended 0.79 points under fp32
# on CIFAR-10, every seed lower (results/README.md). So `auto` is fp32 on every CPU, and bf16 is the
# user's explicit choice.
CPU_BF16_CHECKED = False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX), as torch's oneDNN sees it.
    Without it, oneDNN emulates bf16 in fp32 and autocast only adds conversions."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on CUDA that supports it natively, fp16 (with GradScaler) on older CUDA; on the
    CPU bf16 where it is native and CPU_BF16_CHECKED, else fp32. Any other name is taken as given."""
    if name != "auto":
        return name
    if device.type == "cpu":
        return "bf16" if CPU_BF16_CHECKED and cpu_has_native_bf16() else "fp32"
    if device.type != "cuda":
        return "fp32"
    # Without including_emulation=False, pre-Ampere GPUs (V100, T4) answer True and get a slow,
    # emulated bf16 instead of their fast fp16.
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


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
    data: augment.DeviceData
    pipeline: augment.Pipeline
    g: torch.Generator                   # device-side: permutations, augmentation parameters
    order_g: torch.Generator             # CPU-side: per-batch choices made on the host

    def autocast(self):
        dtype = DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()


def build_pipeline(config: TrainConfig, device: torch.device) -> augment.Pipeline:
    """The trial's input pipeline: the augmentations `config.augment` names with their
    settings, the model's input size and the declared normalization."""
    jitter = {k: getattr(config, k) for k in JITTER_OPS} if "jitter" in config.augment else None
    return augment.Pipeline(config.dataset_name, device,
                             crop_padding=config.crop_padding if "crop" in config.augment else 0,
                             flip_p=config.flip_p if "flip" in config.augment else 0.0,
                             jitter=jitter, size=config.image_size or MODELS[config.model].input_size,
                             jitter_mode=config.jitter_mode, normalize=config.normalize)


def flush_subnormals() -> None:
    """Have this CPU thread, and the torch threads it starts from now on, flush subnormal floats
    to zero (FTZ/DAZ), as TensorFlow's CPU kernels do.

    Why: a net that collapses (Adam at lr 0.01 on MNIST) decays its dead weights and Adam's
    moments into subnormals (0 < |x| < 1.2e-38: 61% of the dense layer's weights in one such
    search sample's checkpoint), and the CPU takes a microcode assist on every op that reads
    one, so that trial slowed from 445 to 113 img/s in three epochs (benchmarks/denormal.py
    measures the step with and without). A net that learns ends at the same weights, bit for
    bit (tests/test_trainer.py). Call it before the first parallel op: new threads inherit their
    creator's setting."""
    torch.set_flush_denormal(True)


def build_training(config: TrainConfig, arrays: datafiles.Arrays | None = None) -> Training:
    """Model, optimizer, scheduler, data and generators for `config`, seeded."""
    device = resolve_device(config.device)
    flush_subnormals()                   # host ops on every device, the whole step on the CPU
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if device.type == "cpu":
        memory.keep_freed_memory()       # a step's freed memory serves the next step (see there)
    torch.manual_seed(config.seed)
    model = models.build(config.model, pretrained=config.pretrained, weights=config.weights or None).to(device)
    precision = resolve_precision(config.precision, device)
    layout = memory_format(config.model, device, precision)
    model = model.to(memory_format=layout)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True                 # fixed shapes: pick the fastest kernels once
    groups = models.parameter_groups(model, config.finetune, config.lr,
                                     config.backbone_lr or None, config.classifier_lr or None)
    optimizer = OPTIMIZERS[config.optimizer](groups, config) if groups and groups[0]["params"] else None
    scheduler = SCHEDULERS[config.scheduler](optimizer, config) if optimizer else None
    pipeline = build_pipeline(config, device)
    arrays = datafiles.hold_out(arrays if arrays is not None else datafiles.load(config), config.val_fraction)
    if not config.evaluate_test:     # a search sample: the test images never reach its device
        arrays = datafiles.without_test(arrays)
    data = augment.DeviceData.from_arrays(arrays, device)
    return Training(config, device, precision, layout, model, torch.compile(model) if config.compile else model,
                    optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                    data, pipeline, torch.Generator(device).manual_seed(config.seed),
                    torch.Generator().manual_seed(config.seed))


def memory_format(model: str, device: torch.device, precision: str = "fp32") -> torch.memory_format:
    """channels_last on CUDA (tensor cores want it), on the CPU in bf16 (oneDNN's bf16 kernels
    train every network faster that way: `benchmarks/layout.py --precision bf16`), and in fp32 for
    the models oneDNN trains faster that way (raycnn.config.ModelInfo.cpu_channels_last); else
    torch's default."""
    fast = device.type == "cuda" or precision == "bf16" or MODELS[model].cpu_channels_last
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


def _rng_state(training: Training) -> dict:
    state = {"torch": torch.get_rng_state(), "g": training.g.get_state(), "order_g": training.order_g.get_state()}
    if training.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(training.device)
    return state


def save_state(training: Training, progress: dict, directory: str | Path) -> Path:
    """Everything needed to resume, into directory/state.pt (atomic and durable)."""
    return ckpt.save({
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict() if training.optimizer else None,
        "scheduler": training.scheduler.state_dict() if training.scheduler else None,
        "scaler": training.scaler.state_dict(),
        "rng": _rng_state(training),
        "progress": progress,
        "config": training.config.to_dict(),
    }, directory)


def save_best(training: Training, epoch: int, directory: str | Path) -> Path:
    """The model of the best epoch so far, into directory/best.pt beside state.pt."""
    return ckpt.save({"model": training.model.state_dict(), "epoch": epoch, "config": training.config.to_dict()},
                     directory, ckpt.BEST_FILE)


def restore(training: Training, path: str | Path) -> dict:
    """Load a checkpoint written by `save_state` into `training`; returns its progress."""
    state = ckpt.read(path)      # on the CPU: load_state_dict moves what it needs to the device
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
        raise CheckpointError(f"checkpoint {path} holds no training progress")
    return progress


def learning_rates(training: Training) -> tuple[float, float]:
    """(lr, lr_backbone) the optimizer trains with now: `lr` is the first group's (every
    parameter, or the new classifier when fine-tuning), `lr_backbone` the fine-tuned stages'
    (NaN when no stage trains); (0, NaN) with nothing to train."""
    if not training.optimizer:
        return 0.0, math.nan
    groups = training.optimizer.param_groups
    stages = [g["lr"] for g in groups if g.get("name") in RESNET_STAGES]
    return groups[0]["lr"], stages[0] if stages else math.nan


def _epoch_metrics(training: Training, epoch: int, train: tuple[float, float, float], test: tuple[float, float],
                   val: tuple[float, float], rates: tuple[float, float], seconds: float) -> dict:
    return {
        "epoch": epoch, "train_loss": train[0], "train_acc": train[1], "test_loss": test[0],
        "test_acc": test[1], "val_loss": val[0], "val_acc": val[1], "lr": rates[0], "lr_backbone": rates[1],
        "seconds": seconds, "images_per_s": train[2], "peak_mem_mb": memory.peak_mb(training.device),
        "device": str(training.device), "precision": training.precision,
    }


def fit(config: TrainConfig, report: Callable[[dict, Path | None], None] | None = None,
        checkpoint: str | Path | None = None, checkpoint_dir: str | Path | None = None,
        arrays: datafiles.Arrays | None = None, on_batch: Callable[[int, int, int], None] | None = None) -> dict:
    """Train `config` to the end and return a summary (see `summarize`).

    After each epoch `report(metrics, checkpoint_dir)` gets the epoch's metrics (epoch,
    train/test/val loss and accuracy, the learning rates the epoch trained with, seconds,
    images/s, peak memory, status, finished) and, under "summary", the trial's `outcome` so far:
    its result row as it stands. The checkpoint was written to `checkpoint_dir` just before (if
    given; every `checkpoint_every` epochs and after the last, else `report` gets None), where
    best.pt also keeps the best epoch's model. `checkpoint` (a file or folder written earlier)
    resumes the training exactly where it stopped. `arrays` skips reading the dataset (Tune
    passes one shared copy per node). A loss that turns NaN/inf stops the training with status
    "diverged". With `evaluate_test` false (a search sample) the test split is dropped before
    anything reaches the device and every test metric is NaN. Early stopping and the best epoch watch the selection accuracy: the validation
    split's where `val_fraction` holds one out, else the test set's, as the report did.

    Reports also carry `resumed` (this call continued from `checkpoint`) and, on the first
    epoch after an unreadable `checkpoint` made the training start over, `warning` saying so;
    neither goes into the history, which stays the same whether or not the training was resumed.

    `on_batch(epoch, step, steps)` hears of every optimizer step inside an epoch (epoch counts
    from 1), without a device sync: for progress inside long epochs (`raycnn.epoch_progress`).
    """
    config.validate()
    memory.reset_peak(resolve_device(config.device))     # this trial's peak, not its process's
    arrays = arrays if arrays is not None else datafiles.load(config)
    training, progress, warning = _start(config, arrays, checkpoint)
    if config.finetune == "zero-shot":
        return _zero_shot(training, report)
    notes = {"resumed": checkpoint is not None and not warning} | ({"warning": warning} if warning else {})
    status = progress["history"][-1]["status"] if progress["history"] else "running"
    while status == "running" and progress["epoch"] < config.epochs:
        metrics, better = _train_epoch(training, progress, on_batch)
        status = metrics["status"]
        saved = checkpoint_dir is not None and (progress["epoch"] % config.checkpoint_every == 0
                                                or status != "running")
        if saved:
            save_state(training, progress, checkpoint_dir)
        if better and checkpoint_dir is not None:      # the best model is kept whatever the interval
            save_best(training, progress["epoch"], checkpoint_dir)
        if report is not None:
            report(metrics | notes | {"summary": outcome(progress["history"])}, Path(checkpoint_dir) if saved else None)
            notes.pop("warning", None)
    return summarize(progress["history"])


def _start(config: TrainConfig, arrays: datafiles.Arrays, checkpoint) -> tuple[Training, dict, str]:
    """(training, progress, warning): built afresh, or resumed from `checkpoint`; a checkpoint
    that cannot be restored starts the training over, with a warning saying so."""
    training = build_training(config, arrays)
    progress = {"epoch": 0, "history": [], "best_acc": -1.0, "since_best": 0}
    if checkpoint is None:
        return training, progress, ""
    try:
        return training, restore(training, checkpoint), ""
    except Exception as e:   # a corrupt or foreign file must not kill the trial
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        warning = f"checkpoint {checkpoint} is unreadable ({type(e).__name__}: {detail}); restarting from scratch"
        warnings.warn(warning)
        del training           # a failed restore may have changed some of it
        return build_training(config, arrays), progress, warning


def _train_epoch(training: Training, progress: dict, on_batch) -> tuple[dict, bool]:
    """Train and evaluate one epoch, step the scheduler and update `progress`; returns the
    epoch's metrics and whether it beat the best selection accuracy so far."""
    config, start = training.config, time.perf_counter()
    rates = learning_rates(training)          # the rates this epoch trains with, before the step
    epoch = progress["epoch"] + 1
    on_step = (lambda step, steps: on_batch(epoch, step, steps)) if on_batch else None
    train = train_one_epoch(training, on_step)
    test = evaluate(training) if config.evaluate_test else (math.nan, math.nan)
    val = evaluate(training, "val")
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
    return metrics, better


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
        report(metrics | {"summary": outcome([metrics])}, None)
    return summarize([metrics])


def summarize(history: list[dict]) -> dict:
    """`fit`'s result: the `outcome` of `history`, with training seconds, device, precision and
    the history itself."""
    last = history[-1]
    return outcome(history) | {
        "train_seconds": sum(m["seconds"] for m in history),
        "device": last["device"], "precision": last["precision"], "history": history,
    }
