"""`TrainConfig`, everything one trial needs, and the catalogs its fields choose from; torch-free,
so the command line can read, check and list suites without importing torch.

The catalogs are data: the networks (their dataset, input size, whether ImageNet weights exist
for them), the datasets (shape, size, Normalize statistics), and the names of the optimizers,
schedulers, precisions and augmentations. The modules that build the real objects
(raycnn.models, raycnn.trainer, raycnn.augment) key their builders by these names, and tests
check that both sides name the same things.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from raycnn.errors import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    """What a network is shaped for: its dataset, the input side it needs (None: the
    dataset's own), whether ImageNet weights exist for it, and whether it trains faster in
    channels_last on the CPU (on CUDA every network uses it)."""
    dataset: str
    input_size: int | None = None
    pretrainable: bool = False
    # benchmarks/layout.py on a 2-core CPU, fp32: the small nets' steps take 7-14% less in
    # channels_last (max-pooling most of all); AlexNet 2% and ResNet-18 8% more. In bf16 every
    # network trains faster in channels_last (raycnn.trainer.memory_format).
    cpu_channels_last: bool = True


# Where torchvision's AlexNet meets 32x32 CIFAR-10: its stem (11x11 stride 4, three 3x3/2 max-pools)
# shrinks 32x32 to nothing, so inputs are resized on the device first. 64 is about the smallest
# size whose feature map survives to the last pool; AlexNet's adaptive pool then makes it 6x6.
ALEXNET_INPUT_SIZE = 64

MODELS: dict[str, ModelInfo] = {
    "mnist_base": ModelInfo("mnist"),
    "mnist_dropout": ModelInfo("mnist"),
    "mnist_batchnorm": ModelInfo("mnist"),
    "mnist_stride2": ModelInfo("mnist"),
    "mnist_kernel5": ModelInfo("mnist"),
    "cifar_base": ModelInfo("cifar10"),
    "cifar_dropout": ModelInfo("cifar10"),
    "cifar_batchnorm": ModelInfo("cifar10"),
    "alexnet": ModelInfo("cifar10", input_size=ALEXNET_INPUT_SIZE, cpu_channels_last=False),
    "resnet18": ModelInfo("cifar10", pretrainable=True, cpu_channels_last=False),
}

# The residual stages of torchvision's ResNet-18, which `finetune` names.
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}          # one image, (C, H, W)
SIZES = {"mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}  # (train, test) images
# Per-channel statistics of the training sets (the usual published values), for Normalize.
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# The statistics torchvision's ImageNet weights were trained with.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Which Normalize(mean, std) a trial uses (the config's `normalize`), by dataset name:
# dataset = its own training-set statistics, half = 0.5 everywhere (the PyTorch CIFAR-10
# tutorial's Normalize), imagenet = what pretrained torchvision weights expect.
NORMALIZATIONS = {
    "dataset": lambda name: STATS[name],
    "half": lambda name: ((0.5,) * SHAPES[name][0], (0.5,) * SHAPES[name][0]),
    "imagenet": lambda name: IMAGENET_STATS,
}

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "multistep")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUGMENTS = ("crop", "flip", "jitter")                 # applied in this order, as the report lists them
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
JITTER_MODES = ("fast", "faithful")
BUDGETS = ("full", "quick", "reduced")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# ColorJitter's ranges: the factor bounds torchvision accepts for each op (hue: a turn of the
# circle either way).
JITTER_BOUNDS = {"brightness": (0.0, math.inf), "contrast": (0.0, math.inf),
                 "saturation": (0.0, math.inf), "hue": (-0.5, 0.5)}


def normalization(kind: str, dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for normalization `kind` (a key of NORMALIZATIONS) on `dataset`."""
    return NORMALIZATIONS[kind](dataset)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one trial needs. Defaults are PyTorch's or the report's common settings."""
    model: str = "mnist_base"            # a key of MODELS
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
    normalize: str = "dataset"           # dataset | half | imagenet: the mean/std of NORMALIZATIONS
    image_size: int = 0                  # resize inputs to this side on the device; 0 = the model's need
    pretrained: bool = False             # ImageNet weights (resnet18)
    weights: str = ""                    # a state-dict file instead of torchvision's cache
    finetune: str = "all"                # all | head | zero-shot | layer1,...,layer4 (see models.parameter_groups)
    backbone_lr: float = 0.0             # lr of fine-tuned stages; 0 = lr
    classifier_lr: float = 0.0           # lr of the new head; 0 = lr
    early_stopping_patience: int = 0     # stop after this many epochs without a better selection accuracy; 0 = off
    val_fraction: float = 0.0            # hold this share of the training set out for selection; 0 = select on test, as the report
    evaluate_test: bool = True           # false for search samples: they select on validation and never see the test split
    precision: str = "auto"              # auto | fp32 | bf16 | fp16
    seed: int = 0
    max_train_samples: int = 0           # train on the first N images; 0 = all
    synthetic: bool = False              # random data of the dataset's shape and size
    data_dir: str = "data"
    eval_batch_size: int = 1000
    device: str = "auto"                 # auto | cpu | mps | cuda | cuda:N
    num_threads: int = 0                 # torch CPU threads; 0 = leave as is
    compile: bool = False                # torch.compile the model
    checkpoint_every: int = 1            # checkpoint every N epochs (and the last); a crash loses < N epochs
    budget: str = "full"                 # full = the suite's; quick (`--quick`) or reduced (--epochs/--max-train-samples)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from plain values (TOML, JSON, Parquet rows): lists become tuples, ints widen
        to floats; unknown keys and wrong types raise ConfigError. Not validated: see `validate`."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a table of fields, got {d!r}")
        unknown = sorted(set(d) - FIELDS)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(map(str, unknown))}")
        return cls(**{key: _coerce(key, value) for key, value in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dataset_name(self) -> str:
        return self.dataset or MODELS[self.model].dataset

    def validate(self) -> "TrainConfig":
        """Raise ConfigError (one line, naming the key) for what cannot run or makes no sense."""
        for ok, message in _checks(self):
            if not ok():
                raise ConfigError(message() if callable(message) else message)
        return self


FIELDS = {f.name for f in fields(TrainConfig)}
_DEFAULTS = TrainConfig()


def _coerce(key: str, value: Any) -> Any:
    """One field's plain value as the type the field declares, or ConfigError."""
    value = value.tolist() if hasattr(value, "tolist") else value   # numpy values from Parquet
    value = tuple(value) if isinstance(value, list) else value
    want = type(getattr(_DEFAULTS, key))
    if key in SCALAR_RANGES and _number(value):
        value = SCALAR_RANGES[key](key, float(value))     # ColorJitter's scalar forms
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)      # TOML's 1 for 1.0
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {want.__name__}, got {value!r}")
    if want is tuple and not all(_number(v) or isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of numbers or names, got {list(value)!r}")
    return value


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _factor_range(key: str, v: float) -> tuple[float, float]:
    """ColorJitter's scalar form: brightness = b means [max(0, 1 - b), 1 + b]."""
    if not 0 <= v < math.inf:
        raise ConfigError(f"{key} = {v:g}: a single number must not be negative or infinite (it means [1 - {key}, 1 + {key}])")
    return (max(0.0, 1.0 - v), 1.0 + v)


def _hue_range(key: str, v: float) -> tuple[float, float]:
    """ColorJitter's scalar form: hue = h means [-h, h]."""
    if not 0 <= v <= 0.5:
        raise ConfigError(f"{key} = {v:g}: a single number must be in [0, 0.5] (it means [-{key}, {key}])")
    return (-v, v)


SCALAR_RANGES = {"brightness": _factor_range, "contrast": _factor_range,
                 "saturation": _factor_range, "hue": _hue_range}


def _range_ok(key: str, value: tuple) -> bool:
    """One ColorJitter range: two numbers, lo <= hi, inside JITTER_BOUNDS."""
    lo_bound, hi_bound = JITTER_BOUNDS[key]
    return (len(value) == 2 and all(_number(v) and not math.isnan(v) for v in value)
            and lo_bound <= value[0] <= value[1] <= hi_bound)


def finetune_stages(finetune: str) -> list[str]:
    """The ResNet stages `finetune` trains (besides the head): [] for all, head and zero-shot."""
    if finetune in ("all", "head", "zero-shot"):
        return []
    chosen = [s.strip() for s in finetune.split(",")]
    bad = [s for s in chosen if s not in RESNET_STAGES]
    if bad:
        raise ConfigError(f"unknown finetune {finetune!r}: use all, head, zero-shot or a comma list of {', '.join(RESNET_STAGES)}")
    return chosen


def _one_of(c: TrainConfig, key: str, choices) -> tuple:
    value = getattr(c, key)
    return (lambda: value in choices), f"unknown {key} {value!r}; choose from {', '.join(choices)}"


def _checks(c: TrainConfig) -> list[tuple]:
    """(ok, message) pairs in the order they are checked. Both are evaluated lazily (a message
    may be a function), so a later check may rely on the earlier ones: a known model, dataset
    and normalization."""
    floats = [f.name for f in fields(TrainConfig) if isinstance(getattr(_DEFAULTS, f.name), float)]
    pretrainable = ", ".join(n for n, m in MODELS.items() if m.pretrainable)
    return [
        _one_of(c, "model", MODELS), _one_of(c, "optimizer", OPTIMIZERS), _one_of(c, "scheduler", SCHEDULERS),
        _one_of(c, "jitter_mode", JITTER_MODES), _one_of(c, "precision", PRECISIONS),
        _one_of(c, "normalize", NORMALIZATIONS), _one_of(c, "budget", BUDGETS),
        (lambda: c.dataset in ("", *SHAPES), f"unknown dataset {c.dataset!r}; choose from {', '.join(SHAPES)}"),
        (lambda: not set(c.augment) - set(AUGMENTS),
         f"unknown augmentation(s) {sorted(map(str, set(c.augment) - set(AUGMENTS)))}; choose from {', '.join(AUGMENTS)}"),
        (lambda: DEVICE.fullmatch(c.device) is not None, f"unknown device {c.device!r}; use auto, cpu, mps, cuda or cuda:N"),
        *((lambda k=k: math.isfinite(getattr(c, k)), f"{k} must be a finite number, got {getattr(c, k)}") for k in floats),
        (lambda: c.epochs > 0, f"epochs must be positive, got {c.epochs}"),
        (lambda: c.batch_size > 0, f"batch_size must be positive, got {c.batch_size}"),
        (lambda: c.eval_batch_size > 0, f"eval_batch_size must be positive, got {c.eval_batch_size}"),
        (lambda: c.checkpoint_every > 0, f"checkpoint_every must be positive, got {c.checkpoint_every}"),
        (lambda: c.num_threads >= 0, f"num_threads must not be negative, got {c.num_threads}"),
        (lambda: c.seed >= 0, f"seed must not be negative, got {c.seed}"),
        (lambda: c.lr > 0, f"lr must be positive, got {c.lr}"),
        (lambda: c.backbone_lr >= 0 and c.classifier_lr >= 0, "backbone_lr and classifier_lr must not be negative"),
        (lambda: c.momentum >= 0 and c.weight_decay >= 0,
         f"momentum and weight_decay must not be negative, got {c.momentum} and {c.weight_decay}"),
        (lambda: c.gamma > 0, f"gamma must be positive, got {c.gamma}"),
        (lambda: c.crop_padding >= 0, f"crop_padding must not be negative, got {c.crop_padding}"),
        (lambda: 0.0 <= c.flip_p <= 1.0, f"flip_p must be a probability in [0, 1], got {c.flip_p}"),
        (lambda: all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in c.milestones)
         and list(c.milestones) == sorted(set(c.milestones)),
         f"milestones must be positive epochs in increasing order, got {list(c.milestones)}"),
        (lambda: 0.0 <= c.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {c.val_fraction}"),
        (lambda: c.evaluate_test or c.val_fraction > 0,
         "evaluate_test = false needs val_fraction > 0: without a test split, selection needs a validation split"),
        (lambda: c.early_stopping_patience >= 0, f"early_stopping_patience must not be negative, got {c.early_stopping_patience}"),
        (lambda: c.max_train_samples >= 0 and c.image_size >= 0, "max_train_samples and image_size must not be negative"),
        *((lambda k=k: _range_ok(k, getattr(c, k)),
           f"{k} must be [lo, hi] with {JITTER_BOUNDS[k][0]:g} <= lo <= hi <= {JITTER_BOUNDS[k][1]:g}, got {list(getattr(c, k))}")
          for k in JITTER_BOUNDS),
        (lambda: c.finetune == "all" or c.model == "resnet18", f"finetune={c.finetune!r} needs model resnet18"),
        (lambda: finetune_stages(c.finetune) is not None, ""),      # raises its own message
        (lambda: not c.pretrained or MODELS[c.model].pretrainable,
         f"pretrained = true needs a model with ImageNet weights ({pretrainable}), not {c.model!r}"),
        (lambda: MODELS[c.model].dataset == c.dataset_name,
         lambda: f"model {c.model!r} is built for {MODELS[c.model].dataset}, not {c.dataset}"),
        (lambda: len(normalization(c.normalize, c.dataset_name)[0]) == SHAPES[c.dataset_name][0],
         lambda: f"normalize = {c.normalize!r} is for 3-channel images; {c.dataset_name} has {SHAPES[c.dataset_name][0]}"),
    ]
