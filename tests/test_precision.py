"""Precision on the CPU: `auto`'s choice with the GPU's capability faked, and bf16 (CPU autocast)
and fp16 (CPU autocast + torch.amp.GradScaler("cpu")) runs of `fit` that learn and resume exactly.
Also the per-trial peak memory, which must not carry an earlier trial's peak in the same process."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import assert_same_training, whole_and_resumed
from raycnn import memory, trainer
from raycnn.config import TrainConfig
from raycnn import datafiles

# cifar_base: fp16 convolution backward on the CPU is slow (~0.5 s a batch of 64 for LeNet, ~50 s
# for mnist_base), so the small net and few images keep these tests to seconds.
CIFAR = datafiles.synthetic("cifar10", seed=3, sizes=(256, 128))


def fake_gpu(monkeypatch, major: int, emulated_bf16: bool) -> None:
    """torch.cuda as seen on a GPU of compute capability `major`.x, whose bf16 works emulated or not;
    torch's own is_bf16_supported runs on these answers."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulated_bf16)


@pytest.mark.parametrize("major,emulated,expected", [
    (8, True, "bf16"),     # A100, H100: native bf16
    (9, False, "bf16"),
    (7, True, "fp16"),     # V100, T4: bf16 only emulated, slow; fp16 + GradScaler instead
    (6, False, "fp16"),
])
def test_auto_precision_on_cuda_needs_native_bf16(monkeypatch, major, emulated, expected):
    fake_gpu(monkeypatch, major, emulated)
    assert trainer.resolve_precision("auto", torch.device("cuda")) == expected
    assert trainer.resolve_precision("bf16", torch.device("cuda")) == "bf16"     # explicit wins


@pytest.mark.parametrize("checked,avx512_bf16,amx,expected", [
    (True, True, False, "bf16"),     # Zen 4/5, Cooper Lake: AVX512_BF16
    (True, False, True, "bf16"),     # Sapphire Rapids and later: AMX
    (True, False, False, "fp32"),    # bf16 would be emulated: slower than fp32
    (False, True, True, "fp32"),     # the accuracy check did not pass: bf16 only when asked for
])
def test_auto_precision_on_the_cpu_needs_native_bf16_and_the_check(monkeypatch, checked, avx512_bf16, amx, expected):
    monkeypatch.setattr(trainer, "CPU_BF16_CHECKED", checked)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert trainer.resolve_precision("auto", torch.device("cpu")) == expected
    assert trainer.resolve_precision("fp32", torch.device("cpu")) == "fp32"     # explicit wins
    assert trainer.resolve_precision("auto", torch.device("mps")) == "fp32"


def cfg(**kw) -> TrainConfig:
    base = dict(model="cifar_base", epochs=4, optimizer="adam", lr=0.003, num_threads=1,
                eval_batch_size=128, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_learns_and_resumes_exactly(tmp_path, precision):
    whole, resumed = whole_and_resumed(cfg(precision=precision), CIFAR, tmp_path)
    assert whole["precision"] == precision and whole["status"] == "ok"
    assert all(math.isfinite(m["train_loss"]) for m in whole["history"])
    assert whole["final_test_acc"] > 0.2, whole["final_test_acc"]          # chance is 0.1
    assert_same_training(whole, resumed)


def test_fp16_scales_the_loss_on_cpu(tmp_path):
    trainer.fit(cfg(precision="fp16", epochs=1), checkpoint_dir=tmp_path, arrays=CIFAR)
    scaler = torch.load(tmp_path / "state.pt", weights_only=False)["scaler"]
    assert scaler and scaler["scale"] > 1          # an enabled GradScaler, not fp16 without one


@pytest.mark.skipif(not memory.PROC_STATUS.exists(), reason="per-trial CPU peak needs Linux's /proc")
def test_peak_memory_is_the_trials_own():
    big = np.ones(300 * 2**20 // 8)           # 300 MiB touched: an earlier, bigger trial in this process
    assert big.sum() > 0
    del big
    earlier = memory.peak_mb(torch.device("cpu"))      # includes those 300 MiB
    small = trainer.fit(cfg(epochs=1), arrays=datafiles.subset(CIFAR, 64))
    assert small["history"][0]["peak_mem_mb"] < earlier - 150, (small["history"][0]["peak_mem_mb"], earlier)
