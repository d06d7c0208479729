import math
import re

import pytest
import torch

from conftest import assert_same_training, whole_and_resumed
from raycnn import checkpoint, trainer
from raycnn.outcome import outcome
from raycnn.config import TrainConfig
from raycnn.errors import ConfigError
from raycnn import datafiles

# Small synthetic sets keep these tests to seconds on a 2-core CPU.
MNIST = datafiles.synthetic("mnist", seed=1, sizes=(1024, 256))
CIFAR = datafiles.synthetic("cifar10", seed=1, sizes=(1024, 256))


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
    assert lrs == pytest.approx([0.01, 0.01, 0.001])          # the rate each epoch trained with: milestone 2 steps after epoch 2


def test_training_reads_subnormals_as_zero():
    """build_training turns on the CPU's flush-to-zero (FTZ/DAZ): a collapsed net's subnormal
    weights would otherwise slow every step several times (benchmarks/denormal.py)."""
    try:
        torch.set_flush_denormal(False)      # earlier tests' trainings turned it on in this process
        tiny = torch.tensor([1e-40])
        assert (tiny * 1.0).item() > 0
        trainer.build_training(cfg(), MNIST)
        assert (tiny * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_flushing_subnormals_changes_nothing_in_a_net_that_trains(monkeypatch):
    """Flushing touches only values under 1.2e-38; a net that learns holds none that count: two
    epochs end at the same weights, bit for bit, with and without."""
    def trained() -> list[torch.Tensor]:
        training = trainer.build_training(cfg(), MNIST)
        for _ in range(2):
            trainer.train_one_epoch(training)
        return [p.detach().clone() for p in training.model.parameters()]

    try:
        flushed = trained()
        monkeypatch.setattr(trainer, "flush_subnormals", lambda: torch.set_flush_denormal(False))
        kept = trained()
    finally:
        torch.set_flush_denormal(False)
    assert all(torch.equal(a, b) for a, b in zip(flushed, kept, strict=True))


def test_report_and_checkpoint_each_epoch(tmp_path):
    seen = []
    trainer.fit(cfg(epochs=2), report=lambda m, d: seen.append((m["epoch"], (d / "state.pt").exists())),
                checkpoint_dir=tmp_path, arrays=MNIST)
    assert seen == [(1, True), (2, True)]
    assert not list(tmp_path.glob(".*tmp"))                     # the atomic write left no temp file


@pytest.mark.parametrize("extra", [{}, {"model": "mnist_dropout", "optimizer": "adam", "lr": 0.001}])
def test_resume_is_exact(tmp_path, extra):
    config = cfg(epochs=3, **extra)
    assert_same_training(*whole_and_resumed(config, MNIST, tmp_path))


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


def test_early_stopping_reports_the_best_epoch(tmp_path):
    # lr so small that accuracy cannot improve on the first epoch's: epoch 1 is the best, epoch 2
    # exhausts a patience of 1 and ends the training.
    result = trainer.fit(cfg(epochs=8, lr=1e-9, momentum=0.0, early_stopping_patience=1),
                         checkpoint_dir=tmp_path, arrays=MNIST)
    history = result["history"]
    assert result["status"] == "ok" and result["early_stopped"] and history[-1]["status"] == "stopped"
    assert (result["epochs_done"], result["reported_epoch"], result["best_epoch"]) == (2, 1, 1)
    assert result["final_test_acc"] == history[0]["test_acc"]
    # best.pt holds the reported model: evaluated again, it gives the headline exactly.
    best = torch.load(tmp_path / checkpoint.BEST_FILE, weights_only=True)
    assert best["epoch"] == 1
    training = trainer.build_training(cfg(), MNIST)
    training.model.load_state_dict(best["model"])
    assert trainer.evaluate(training)[1] == result["final_test_acc"]


def test_patience_running_out_on_the_last_epoch_is_ok():
    result = trainer.fit(cfg(epochs=2, lr=1e-9, momentum=0.0, early_stopping_patience=1), arrays=MNIST)
    assert result["history"][-1]["status"] == "ok" and not result["early_stopped"]
    assert (result["epochs_done"], result["reported_epoch"]) == (2, 2)
    assert result["final_test_acc"] == result["history"][-1]["test_acc"]


def test_validation_split_selects_and_leaves_test_alone():
    config = cfg(epochs=2, val_fraction=0.25)
    training = trainer.build_training(config, MNIST)
    assert (len(training.data.train_y), len(training.data.val_y), len(training.data.test_y)) == (768, 256, 256)
    train_rows = {r.tobytes() for r in training.data.train_x.numpy()}
    assert not any(r.tobytes() in train_rows for r in training.data.val_x.numpy())   # held out, not copied
    result = trainer.fit(config, arrays=MNIST)
    assert all(math.isfinite(m["val_acc"]) for m in result["history"])
    best = max(result["history"], key=lambda m: m["val_acc"])
    assert result["best_epoch"] == best["epoch"] and result["best_test_acc"] == best["test_acc"]
    no_val = trainer.fit(cfg(epochs=1), arrays=MNIST)["history"][0]
    assert math.isnan(no_val["val_acc"])


def history(*rows, last_status="ok"):
    """Epoch metrics as fit reports them: (test_acc, val_acc) per epoch."""
    out = [{"epoch": i + 1, "test_acc": t, "val_acc": v, "images_per_s": 100.0, "status": "running"}
           for i, (t, v) in enumerate(rows)]
    out[-1]["status"] = last_status
    return out


@pytest.mark.parametrize("rows,status,want", [
    # (test, val) per epoch, last status -> (status, early_stopped, final, reported, best_test, best_epoch)
    ([(0.5, math.nan), (0.7, math.nan), (0.6, math.nan)], "ok", ("ok", False, 0.6, 3, 0.7, 2)),
    ([(0.5, math.nan), (0.7, math.nan), (0.6, math.nan)], "stopped", ("ok", True, 0.7, 2, 0.7, 2)),
    ([(0.5, 0.9), (0.7, 0.8), (0.6, 0.7)], "stopped", ("ok", True, 0.5, 1, 0.5, 1)),    # selects on val
    ([(0.5, math.nan), (math.nan, math.nan)], "diverged", ("diverged", False, math.nan, 2, 0.5, 1)),
    ([(0.5, math.nan)], "running", ("running", False, 0.5, 1, 0.5, 1)),
])
def test_outcome_one_rule(rows, status, want):
    got = outcome(history(*rows, last_status=status))
    keys = ("status", "early_stopped", "final_test_acc", "reported_epoch", "best_test_acc", "best_epoch")
    assert [got[k] for k in keys] == pytest.approx(list(want), nan_ok=True)
    assert outcome([])["status"] == "running"


def test_a_trials_row_is_what_fit_reported():
    from raycnn import experiment    # the rows are fit's reports, not a second opinion on them
    reports = []
    config = TrainConfig(model="mnist_base", epochs=3, early_stopping_patience=1, max_train_samples=256,
                         synthetic=True, lr=0.05)
    result = trainer.fit(config, report=lambda m, _: reports.append(m | {"time_total_s": 1.0}))
    entry = {k: "x" for k in experiment.TRIAL_FIELDS} | {"config": config.to_dict(), "gpus": 0.0, "cpus": 1}
    row = experiment._trial_row(entry, reports, [])
    keys = outcome([]).keys()
    assert {k: row[k] for k in keys} == pytest.approx({k: result[k] for k in keys}, nan_ok=True)
    assert row["epochs_done"] == len(reports) and row["status"] == "ok"


def test_pretrained_modes(tmp_path):
    import torchvision
    weights = tmp_path / "imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    small = datafiles.synthetic("cifar10", seed=2, sizes=(128, 64))
    base = dict(model="resnet18", pretrained=True, weights=str(weights), epochs=1, eval_batch_size=64)
    zero = trainer.fit(cfg(**base, finetune="zero-shot"), arrays=small)
    assert zero["epochs_done"] == 0 and len(zero["history"]) == 1
    frozen_before = torch.load(weights)["layer1.0.conv1.weight"]
    seen = {}
    def grab(_, d):
        seen.update(torch.load(d / "state.pt", weights_only=False)["model"])
    tuned = trainer.fit(cfg(**base, finetune="layer4", backbone_lr=0.001, classifier_lr=0.1),
                        report=grab, checkpoint_dir=tmp_path / "ck", arrays=small)
    assert (tuned["history"][0]["lr"], tuned["history"][0]["lr_backbone"]) == (0.1, 0.001)   # classifier, stages
    assert torch.equal(seen["layer1.0.conv1.weight"], frozen_before)           # frozen stage untouched
    assert torch.equal(seen["bn1.running_mean"], torch.load(weights)["bn1.running_mean"])   # frozen BN too
    assert not torch.equal(seen["layer4.0.conv1.weight"], torch.load(weights)["layer4.0.conv1.weight"])


@pytest.mark.parametrize("bad,message", [
    ({"model": "vgg"}, "unknown model"), ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"augment": ("rotate",)}, "unknown augmentation"), ({"lr": 0.0}, "lr must be positive"),
    ({"epochs": 0}, "epochs must be positive"), ({"batch_size": -1}, "batch_size must be positive"),
    ({"dataset": "cifar10"}, "is built for mnist"), ({"finetune": "head"}, "needs model resnet18"),
    ({"model": "resnet18", "finetune": "layer7"}, "unknown finetune"),
    ({"hue": (-2.0, 2.0)}, "hue must be [lo, hi] with -0.5 <= lo <= hi <= 0.5"),
    ({"brightness": (10.0, 3.0)}, "brightness must be [lo, hi]"), ({"saturation": (-1.0, 2.0)}, "saturation must be"),
    ({"contrast": (1.0, 2.0, 3.0)}, "contrast must be [lo, hi]"),
    ({"crop_padding": -3}, "crop_padding must not be negative"), ({"flip_p": 7.0}, "flip_p must be a probability"),
    ({"milestones": (22, 10)}, "milestones must be positive epochs in increasing order"),
    ({"milestones": (0, 10)}, "milestones must be positive"), ({"gamma": 0.0}, "gamma must be positive"),
    ({"pretrained": True}, "pretrained = true needs a model with ImageNet weights"),
    ({"val_fraction": 1.0}, "val_fraction must be in [0, 1)"), ({"normalize": "zscore"}, "unknown normalize"),
    ({"normalize": "imagenet"}, "for 3-channel images"), ({"jitter_mode": "pil"}, "unknown jitter_mode"),
    ({"early_stopping_patience": -1}, "early_stopping_patience must not be negative"),
])
def test_bad_config_is_one_clear_error(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        cfg(**bad).validate()
    assert "\n" not in str(e.value)


def test_from_dict_rejects_unknown_keys():
    assert TrainConfig.from_dict({"milestones": [3, 4]}).milestones == (3, 4)
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_from_dict_accepts_colorjitters_scalar_forms():
    c = TrainConfig.from_dict({"hue": 0.5, "brightness": 0.4, "contrast": 2, "saturation": 0.0})
    assert c.hue == (-0.5, 0.5) and c.brightness == pytest.approx((0.6, 1.4))
    assert (c.contrast, c.saturation) == ((0.0, 3.0), (1.0, 1.0))
    c.validate()
    for bad, message in (({"hue": 0.7}, "hue = 0.7"), ({"brightness": -0.1}, "must not be negative")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict(bad)


def test_from_dict_checks_types():
    import numpy as np
    c = TrainConfig.from_dict({"lr": 1, "epochs": np.int64(3), "brightness": np.array([1.0, 2.0])})
    assert (c.lr, c.epochs, c.brightness) == (1.0, 3, (1.0, 2.0)) and isinstance(c.epochs, int)
    for bad in ({"epochs": "ten"}, {"epochs": True}, {"lr": "0.1"}, {"augment": "crop"}):
        with pytest.raises(ConfigError, match="must be"):
            TrainConfig.from_dict(bad)


@pytest.mark.parametrize("model, device, precision, want", [
    ("cifar_base", "cpu", "fp32", torch.channels_last), ("mnist_base", "cpu", "fp32", torch.channels_last),
    ("resnet18", "cpu", "fp32", torch.contiguous_format), ("alexnet", "cpu", "fp32", torch.contiguous_format),
    ("resnet18", "cpu", "bf16", torch.channels_last), ("alexnet", "cpu", "bf16", torch.channels_last),
    ("resnet18", "cuda", "fp32", torch.channels_last), ("mnist_base", "cuda", "bf16", torch.channels_last)])
def test_memory_format_per_model_device_and_precision(model, device, precision, want):
    # benchmarks/layout.py's figures: channels_last wherever it trains faster
    assert trainer.memory_format(model, torch.device(device), precision) == want


def test_a_bf16_trial_trains_in_the_bf16_layout():
    # build_training resolves the precision before it chooses the layout
    training = trainer.build_training(cfg(model="alexnet", precision="bf16", device="cpu"),
                                      datafiles.synthetic("cifar10", sizes=(64, 64)))
    assert training.layout == torch.channels_last
    assert training.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_weights_and_inputs_share_the_layout():
    training = trainer.build_training(cfg(model="cifar_base", augment=("flip",)), CIFAR)
    assert training.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    training.model.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    trainer.train_one_epoch(training)
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)
