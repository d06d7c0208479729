import sys
import subprocess

import pytest
import torch

from raycnn import models

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
    with pytest.raises(ValueError):
        models.parameter_groups(models.build("resnet18"), "layer9", 0.01, None, None)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("vgg")


def test_core_modules_do_not_import_ray():
    code = "import sys, raycnn.trainer, raycnn.models, raycnn.data; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
