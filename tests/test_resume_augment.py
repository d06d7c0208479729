"""Exact resume with crop, flip and colour jitter on: their random streams (the device generator
for per-image parameters, the CPU generator for jitter's op order) are restored from the checkpoint."""
import pytest
import torch

from conftest import timeless
from raycnn import data, trainer
from raycnn.trainer import TrainConfig

CIFAR = data.synthetic("cifar10", seed=4, sizes=(512, 128))


class Interrupt(Exception):
    pass


def test_resume_with_crop_flip_jitter_is_exact(tmp_path):
    config = TrainConfig(model="cifar_base", epochs=3, optimizer="sgd", lr=0.01, momentum=0.9, num_threads=1,
                         eval_batch_size=128, device="cpu", augment=("crop", "flip", "jitter"), crop_padding=4)
    whole = trainer.fit(config, checkpoint_dir=tmp_path / "whole", arrays=CIFAR)

    def stop_after_first(metrics, _):
        if metrics["epoch"] == 1:
            raise Interrupt
    with pytest.raises(Interrupt):
        trainer.fit(config, report=stop_after_first, checkpoint_dir=tmp_path / "cut", arrays=CIFAR)
    resumed = trainer.fit(config, checkpoint=tmp_path / "cut", checkpoint_dir=tmp_path / "cut", arrays=CIFAR)

    assert timeless(resumed["history"]) == timeless(whole["history"])
    a = torch.load(tmp_path / "whole/state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut/state.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

