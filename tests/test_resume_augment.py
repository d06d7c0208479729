"""Exact resume with crop, flip and colour jitter on: their random streams (the device generator
for per-image parameters, the CPU generator for jitter's op order) are restored from the checkpoint."""
from conftest import assert_same_training, whole_and_resumed
from raycnn.config import TrainConfig
from raycnn import datafiles

CIFAR = datafiles.synthetic("cifar10", seed=4, sizes=(512, 128))


def test_resume_with_crop_flip_jitter_is_exact(tmp_path):
    config = TrainConfig(model="cifar_base", epochs=3, optimizer="sgd", lr=0.01, momentum=0.9, num_threads=1,
                         eval_batch_size=128, device="cpu", augment=("crop", "flip", "jitter"), crop_padding=4)
    assert_same_training(*whole_and_resumed(config, CIFAR, tmp_path))

