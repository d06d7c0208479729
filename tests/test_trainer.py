import math

import pytest
import torch

from raycnn import data, trainer
from raycnn.trainer import ConfigError, TrainConfig

# Small synthetic sets keep these tests to seconds on a 2-core CPU.
MNIST = data.synthetic("mnist", seed=1, sizes=(1024, 256))
CIFAR = data.synthetic("cifar10", seed=1, sizes=(1024, 256))


def cfg(**kw):
    base = dict(model="mnist_base", epochs=2, optimizer="sgd", lr=0.01, momentum=0.9, num_threads=1, eval_batch_size=256)
    return TrainConfig(**{**base, **kw})


def test_learns_above_chance():
    result = trainer.fit(cfg(), arrays=MNIST)
    assert result["status"] == "ok" and result["epochs_done"] == 2
    assert result["final_test_acc"] > 0.5, result["final_test_acc"]     # chance is 0.1
    epoch = result["history"][-1]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_s", "peak_mem_mb"):
        assert math.isfinite(epoch[key]), key
    assert result["precision"] == "fp32" and result["device"] == "cpu"


def test_cifar_with_augmentation_and_scheduler_learns():
    result = trainer.fit(cfg(model="cifar_batchnorm", epochs=3, augment=("crop", "flip"), crop_padding=2,
                             scheduler="multistep", milestones=(2,), gamma=0.1), arrays=CIFAR)
    assert result["final_test_acc"] > 0.3
    lrs = [m["lr"] for m in result["history"]]
    assert lrs == pytest.approx([0.01, 0.001, 0.001])         # lr after each epoch's scheduler step


def test_report_and_checkpoint_each_epoch(tmp_path):
    seen = []
    trainer.fit(cfg(epochs=2), report=lambda m, d: seen.append((m["epoch"], (d / "state.pt").exists())),
                checkpoint_dir=tmp_path, arrays=MNIST)
    assert seen == [(1, True), (2, True)]
    assert not list(tmp_path.glob(".*tmp"))                     # the atomic write left no temp file


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("extra", [{}, {"model": "mnist_dropout", "optimizer": "adam", "lr": 0.001}])
def test_resume_is_exact(tmp_path, extra):
    config = cfg(epochs=3, **extra)
    whole = trainer.fit(config, checkpoint_dir=tmp_path / "whole", arrays=MNIST)

    def stop_after_first(metrics, _):
        if metrics["epoch"] == 1:
            raise Interrupt
    with pytest.raises(Interrupt):
        trainer.fit(config, report=stop_after_first, checkpoint_dir=tmp_path / "cut", arrays=MNIST)
    resumed = trainer.fit(config, checkpoint=tmp_path / "cut", checkpoint_dir=tmp_path / "cut", arrays=MNIST)

    strip = lambda h: [{k: v for k, v in m.items() if k not in ("seconds", "images_per_s", "peak_mem_mb")} for m in h]
    assert strip(resumed["history"]) == strip(whole["history"])
    a = torch.load(tmp_path / "whole/state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut/state.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    trainer.fit(cfg(epochs=1), checkpoint_dir=tmp_path, arrays=MNIST)
    calls = []
    result = trainer.fit(cfg(epochs=1), report=lambda m, d: calls.append(m), checkpoint=tmp_path, arrays=MNIST)
    assert calls == [] and result["epochs_done"] == 1


def test_corrupt_checkpoint_restarts_from_scratch(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="restarting from scratch"):
        result = trainer.fit(cfg(epochs=1), checkpoint=tmp_path, arrays=MNIST)
    assert result["epochs_done"] == 1


def test_divergence_is_a_result_not_a_crash():
    result = trainer.fit(cfg(epochs=3, lr=1e6), arrays=MNIST)
    assert result["status"] == "diverged"
    assert result["epochs_done"] < 3 or not math.isfinite(result["history"][-1]["train_loss"])


def test_early_stopping_watches_test_accuracy():
    # lr so small that accuracy cannot improve on the first epoch's for long
    result = trainer.fit(cfg(epochs=8, lr=1e-9, momentum=0.0, early_stopping_patience=1), arrays=MNIST)
    assert result["status"] == "ok" and result["epochs_done"] < 8
    assert result["history"][-1]["status"] == "stopped"


def test_pretrained_modes(tmp_path):
    import torchvision
    weights = tmp_path / "imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    small = data.synthetic("cifar10", seed=2, sizes=(128, 64))
    base = dict(model="resnet18", pretrained=True, weights=str(weights), epochs=1, eval_batch_size=64)
    zero = trainer.fit(cfg(**base, finetune="zero-shot"), arrays=small)
    assert zero["epochs_done"] == 0 and len(zero["history"]) == 1
    frozen_before = torch.load(weights)["layer1.0.conv1.weight"]
    seen = {}
    def grab(_, d):
        seen.update(torch.load(d / "state.pt", weights_only=False)["model"])
    trainer.fit(cfg(**base, finetune="layer4", backbone_lr=0.001, classifier_lr=0.1),
                report=grab, checkpoint_dir=tmp_path / "ck", arrays=small)
    assert torch.equal(seen["layer1.0.conv1.weight"], frozen_before)           # frozen stage untouched
    assert torch.equal(seen["bn1.running_mean"], torch.load(weights)["bn1.running_mean"])   # frozen BN too
    assert not torch.equal(seen["layer4.0.conv1.weight"], torch.load(weights)["layer4.0.conv1.weight"])


@pytest.mark.parametrize("bad,message", [
    ({"model": "vgg"}, "unknown model"), ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"augment": ("rotate",)}, "unknown augmentation"), ({"lr": 0.0}, "lr must be positive"),
    ({"epochs": 0}, "epochs must be positive"), ({"batch_size": -1}, "batch_size must be positive"),
    ({"dataset": "cifar10"}, "is built for mnist"), ({"finetune": "head"}, "needs model resnet18"),
    ({"model": "resnet18", "finetune": "layer7"}, "unknown finetune"),
])
def test_bad_config_is_one_clear_error(bad, message):
    with pytest.raises(ConfigError, match=message) as e:
        cfg(**bad).validate()
    assert "\n" not in str(e.value)


def test_from_dict_rejects_unknown_keys():
    assert TrainConfig.from_dict({"milestones": [3, 4]}).milestones == (3, 4)
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_from_dict_checks_types():
    import numpy as np
    c = TrainConfig.from_dict({"lr": 1, "epochs": np.int64(3), "brightness": np.array([1.0, 2.0])})
    assert (c.lr, c.epochs, c.brightness) == (1.0, 3, (1.0, 2.0)) and isinstance(c.epochs, int)
    for bad in ({"epochs": "ten"}, {"epochs": True}, {"lr": "0.1"}, {"augment": "crop"}):
        with pytest.raises(ConfigError, match="must be"):
            TrainConfig.from_dict(bad)
