
import pytest
import torch

from raycnn import models
from raycnn.errors import ConfigError

# Input shapes per dataset; AlexNet gets its resized input (see models.ALEXNET_INPUT_SIZE).
SHAPE = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.mark.parametrize("name", list(models.MODELS))
def test_forward_backward(name):
    spec = models.MODELS[name]
    torch.manual_seed(0)
    model = models.build(name)
    c, h, w = SHAPE[spec.dataset]
    side = spec.input_size or h
    x = torch.randn(4, c, side, side)
    out = model(x)
    assert out.shape == (4, 10)
    torch.nn.functional.cross_entropy(out, torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mnist_nets_end_in_log_softmax():
    for name in [n for n, s in models.MODELS.items() if s.dataset == "mnist"]:
        model = models.build(name).eval()
        out = model(torch.randn(3, 1, 28, 28))
        assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5), name


@pytest.mark.parametrize("name,count", [
    ("mnist_base", 1_199_882), ("cifar_base", 62_006),
    # The placements chosen where the report is silent (see the builders' docstrings):
    ("mnist_dropout", 1_199_882), ("mnist_batchnorm", 1_199_882 + 2 * (9216 + 128)),
    ("mnist_stride2", 1_199_882), ("mnist_kernel5", 832 + 51_264 + 6400 * 128 + 128 + 1290),
    ("cifar_dropout", 62_006), ("cifar_batchnorm", 62_006 + 2 * (120 + 84)),
    ("alexnet", 57_044_810), ("resnet18", 11_181_642),
])
def test_parameter_counts(name, count):
    assert sum(p.numel() for p in models.build(name).parameters()) == count


def layers(model: torch.nn.Module) -> list[str]:
    """The leaf layers in forward order, with what places them (Identity stand-ins left out)."""
    def describe(m):
        if isinstance(m, torch.nn.Conv2d):
            return f"Conv{m.in_channels}-{m.out_channels}k{m.kernel_size[0]}s{m.stride[0]}"
        if isinstance(m, torch.nn.Linear):
            return f"Linear{m.in_features}-{m.out_features}"
        if isinstance(m, torch.nn.Dropout):
            return f"Dropout{m.p}"
        if isinstance(m, torch.nn.BatchNorm1d):
            return f"BN{m.num_features}"
        return type(m).__name__
    return [describe(m) for m in model.modules()
            if not list(m.children()) and not isinstance(m, torch.nn.Identity)]


MNIST_HEAD = ["Linear9216-128", "ReLU", "Linear128-10", "LogSoftmax"]
CIFAR_FEATURES = ["Conv3-6k5s1", "ReLU", "MaxPool2d", "Conv6-16k5s1", "ReLU", "MaxPool2d", "Flatten"]


# The report's hand-built networks, layer by layer: where each dropout and BatchNorm sits
# (the parameter counts cannot see a dropout's place; this can).
@pytest.mark.parametrize("name,want", [
    ("mnist_base", ["Conv1-32k3s1", "ReLU", "Conv32-64k3s1", "ReLU", "MaxPool2d", "Flatten", *MNIST_HEAD]),
    ("mnist_dropout", ["Conv1-32k3s1", "ReLU", "Dropout0.4", "Conv32-64k3s1", "ReLU", "MaxPool2d", "Dropout0.4",
                       "Flatten", "Linear9216-128", "ReLU", "Dropout0.4", "Linear128-10", "LogSoftmax"]),
    ("mnist_batchnorm", ["Conv1-32k3s1", "ReLU", "Conv32-64k3s1", "ReLU", "MaxPool2d", "Flatten",
                         "BN9216", "Linear9216-128", "BN128", "ReLU", "Linear128-10", "LogSoftmax"]),
    ("mnist_stride2", ["Conv1-32k3s1", "ReLU", "Conv32-64k3s2", "ReLU", "Flatten", *MNIST_HEAD]),
    ("mnist_kernel5", ["Conv1-32k5s1", "ReLU", "Conv32-64k5s1", "ReLU", "MaxPool2d", "Flatten",
                       "Linear6400-128", "ReLU", "Linear128-10", "LogSoftmax"]),
    ("cifar_base", [*CIFAR_FEATURES, "Linear400-120", "ReLU", "Linear120-84", "ReLU", "Linear84-10"]),
    ("cifar_dropout", [*CIFAR_FEATURES, "Linear400-120", "ReLU", "Dropout0.4", "Linear120-84", "ReLU", "Dropout0.4",
                       "Linear84-10"]),
    ("cifar_batchnorm", [*CIFAR_FEATURES, "Linear400-120", "BN120", "ReLU", "Linear120-84", "BN84", "ReLU",
                         "Linear84-10"]),
])
def test_layer_sequence(name, want):
    assert layers(models.build(name)) == want


def test_torchvision_networks_as_is():
    from collections import Counter
    alex = layers(models.build("alexnet"))
    assert Counter(l.split("-")[0].rstrip("0123456789.") for l in alex) == Counter(
        Conv=5, ReLU=7, MaxPool2d=3, AdaptiveAvgPool2d=1, Dropout=2, Linear=3)
    assert alex[-1] == "Linear4096-10"
    res = layers(models.build("resnet18"))
    assert res[0] == "Conv3-64k7s2" and res[-1] == "Linear512-10"
    assert sum(l.startswith("Conv") for l in res) == 20 and res.count("BatchNorm2d") == 20


def test_dropout_variants_have_their_layers():
    count = lambda m, t: sum(isinstance(x, t) for x in m.modules())
    assert count(models.build("mnist_dropout"), torch.nn.Dropout) == 3
    assert count(models.build("cifar_dropout"), torch.nn.Dropout) == 2
    assert count(models.build("mnist_batchnorm"), torch.nn.BatchNorm1d) == 2
    assert count(models.build("cifar_batchnorm"), torch.nn.BatchNorm1d) == 2
    assert count(models.build("mnist_stride2"), torch.nn.MaxPool2d) == 0


def test_pretrained_from_a_state_dict_file(tmp_path):
    import torchvision
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18()       # stands in for the ImageNet weights
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    model = models.build("resnet18", pretrained=True, weights=str(path))
    assert torch.equal(model.layer3[0].conv1.weight, imagenet.layer3[0].conv1.weight)
    assert model.fc.out_features == 10


def test_parameter_groups_freeze_what_is_not_trained():
    model = models.build("resnet18")
    groups = models.parameter_groups(model, "layer2,layer4", lr=0.01, backbone_lr=0.001, classifier_lr=0.1)
    assert {g["name"]: g["lr"] for g in groups} == {"classifier": 0.1, "layer2": 0.001, "layer4": 0.001}
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc", "layer2", "layer4"}
    models.set_train_mode(model, "layer2,layer4")
    assert model.layer2.training and model.fc.training and not model.layer1.training and not model.bn1.training

    model = models.build("resnet18")
    assert [g["name"] for g in models.parameter_groups(model, "head", 0.01, None, None)] == ["classifier"]
    assert models.parameter_groups(models.build("resnet18"), "zero-shot", 0.01, None, None) == []
    with pytest.raises(ConfigError):
        models.parameter_groups(models.build("resnet18"), "layer9", 0.01, None, None)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("vgg")
