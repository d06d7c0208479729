"""Every network of the report, by name.

`BUILDERS` maps a network's name to its builder (`raycnn.config.MODELS` says what each is
shaped for); `build(name)` makes one. The hand-built MNIST nets end in
log-softmax as the report's do, the CIFAR-10 nets end in logits; the trainer uses cross-entropy
for both, which is exact for log-softmax outputs too (log_softmax is idempotent, so
cross_entropy(log_softmax(z)) == nll_loss(log_softmax(z))).

Where the report does not say where a layer sits, the choice is written in the builder's
docstring and pinned by the layer-sequence and parameter-count tests (tests/test_models.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torchvision

from raycnn.config import MODELS, RESNET_STAGES, finetune_stages


class MnistNet(nn.Module):
    """Base MNIST net of the report: conv 1->32, ReLU, conv 32->64, ReLU, max-pool 2,
    fc ->128, ReLU, fc 128->10, log-softmax.

    Variants: `kernel` (5 for the 5x5 net), `conv2_stride` with `pool=False` (the stride-2 net:
    the second conv strides 2 instead of the max-pool, so fc1 still sees 64x12x12 = 9216),
    `dropout` (three Dropout(p) layers: after conv1's ReLU, after the pool, after fc1's ReLU),
    `batchnorm` (two BatchNorm1d: on the flattened 9216 features and on fc1's 128 outputs,
    before the ReLU).
    """

    def __init__(self, kernel: int = 3, conv2_stride: int = 1, pool: bool = True,
                 dropout: float = 0.0, batchnorm: bool = False, num_classes: int = 10):
        super().__init__()
        side = 28 - kernel + 1                          # after conv1, no padding
        side = (side - kernel) // conv2_stride + 1      # after conv2
        side = side // 2 if pool else side
        flat = 64 * side * side
        drop = (lambda: nn.Dropout(dropout)) if dropout else nn.Identity
        norm = (lambda n: nn.BatchNorm1d(n)) if batchnorm else (lambda n: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel), nn.ReLU(), drop(),
            nn.Conv2d(32, 64, kernel, stride=conv2_stride), nn.ReLU(),
            nn.MaxPool2d(2) if pool else nn.Identity(), drop(), nn.Flatten())
        self.classifier = nn.Sequential(
            norm(flat), nn.Linear(flat, 128), norm(128), nn.ReLU(), drop(),
            nn.Linear(128, num_classes), nn.LogSoftmax(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CifarNet(nn.Module):
    """LeNet-style CIFAR-10 base: conv 3->6 5x5, ReLU, pool, conv 6->16 5x5, ReLU, pool,
    fc 400->120->84->10 with ReLUs; returns logits (the report used CrossEntropyLoss).

    Variants: `dropout` puts Dropout(p) after the ReLUs of fc1 and fc2 (two layers);
    `batchnorm` puts BatchNorm1d after fc1 (120) and fc2 (84), before their ReLUs.
    """

    def __init__(self, dropout: float = 0.0, batchnorm: bool = False, num_classes: int = 10):
        super().__init__()
        drop = (lambda: nn.Dropout(dropout)) if dropout else nn.Identity
        norm = (lambda n: nn.BatchNorm1d(n)) if batchnorm else (lambda n: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(400, 120), norm(120), nn.ReLU(), drop(),
            nn.Linear(120, 84), norm(84), nn.ReLU(), drop(),
            nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet18(num_classes: int = 10, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """torchvision's ResNet-18 as is (its ImageNet stem, at CIFAR's native 32x32).

    From scratch: `num_classes` outputs. Pretrained: ImageNet weights from `weights` (a state-dict
    file) or else torchvision's IMAGENET1K_V1 (downloaded once into TORCH_HOME's cache), then a
    new `num_classes` head (fc), as in the report.
    """
    if not pretrained:
        return torchvision.models.resnet18(num_classes=num_classes)
    if weights:
        model = torchvision.models.resnet18()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        model = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _alexnet(num_classes: int = 10, **_) -> nn.Module:
    """torchvision's AlexNet as is; it needs inputs of config.ALEXNET_INPUT_SIZE (the trainer resizes them)."""
    return torchvision.models.alexnet(num_classes=num_classes)


def _mnist(**kw) -> Callable[..., nn.Module]:
    return lambda num_classes=10, **_: MnistNet(num_classes=num_classes, **kw)


def _cifar(**kw) -> Callable[..., nn.Module]:
    return lambda num_classes=10, **_: CifarNet(num_classes=num_classes, **kw)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mnist_base": _mnist(),
    "mnist_dropout": _mnist(dropout=0.4),
    "mnist_batchnorm": _mnist(batchnorm=True),
    "mnist_stride2": _mnist(conv2_stride=2, pool=False),
    "mnist_kernel5": _mnist(kernel=5),
    "cifar_base": _cifar(),
    "cifar_dropout": _cifar(dropout=0.4),
    "cifar_batchnorm": _cifar(batchnorm=True),
    "alexnet": _alexnet,
    "resnet18": _resnet18,
}


def build(name: str, num_classes: int = 10, pretrained: bool = False,
          weights: str | None = None) -> nn.Module:
    """Build network `name` (pretrained ImageNet weights where config.MODELS allows them)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
    if pretrained and not MODELS[name].pretrainable:
        raise ValueError(f"model {name!r} has no pretrained weights; only {[n for n, s in MODELS.items() if s.pretrainable]}")
    return BUILDERS[name](num_classes=num_classes, pretrained=pretrained, weights=weights)


def head_and_backbone(model: nn.Module) -> tuple[list[nn.Parameter], dict[str, nn.Module]]:
    """Split a torchvision ResNet into its classifier parameters and its named backbone stages."""
    return list(model.fc.parameters()), {name: getattr(model, name) for name in RESNET_STAGES}


def parameter_groups(model: nn.Module, finetune: str, lr: float,
                     backbone_lr: float | None, classifier_lr: float | None) -> list[dict]:
    """Freeze what `finetune` leaves out and return optimizer parameter groups.

    finetune: "all" trains every parameter at `lr` (from-scratch training). "head" freezes the
    whole backbone and trains the classifier. "layer2" or "layer1,layer2,layer3,layer4" trains
    those ResNet stages at `backbone_lr` and the classifier at `classifier_lr` (each defaulting to
    `lr`); everything else (stem, other stages) is frozen. "zero-shot" freezes everything.
    Frozen modules are also kept in eval mode by `set_train_mode`, so their BatchNorm statistics
    stay the pretrained ones.
    """
    if finetune == "all":
        return [{"params": [p for p in model.parameters()], "lr": lr}]
    head, stages = head_and_backbone(model)
    chosen = finetune_stages(finetune)
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    if finetune != "zero-shot":
        groups.append({"params": head, "lr": classifier_lr or lr, "name": "classifier"})
    for name in chosen:
        params = list(stages[name].parameters())
        groups.append({"params": params, "lr": backbone_lr or lr, "name": name})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def set_train_mode(model: nn.Module, finetune: str) -> None:
    """model.train(), but frozen parts (see `parameter_groups`) stay in eval mode."""
    model.train()
    if finetune == "all":
        return
    model.eval()
    _, stages = head_and_backbone(model)
    model.fc.train()
    for name in finetune_stages(finetune):
        stages[name].train()
