"""raycnn.memory against the real glibc: a CPU step reuses the memory the step before it freed,
and a trial's peak does not count what an earlier trial in the process kept. Each check runs in
a fresh interpreter, because glibc's malloc settings are process-wide."""
import os
import subprocess
import sys

import pytest

from raycnn import memory

pytestmark = pytest.mark.skipif(memory._glibc() is None or not memory.PROC_STATUS.exists(),
                                reason="glibc's malloc and Linux's /proc only")

# The page faults of five epochs after the first. "off" trains with glibc's default settings.
FAULTS = """
import resource, sys
from raycnn import datafiles, memory, trainer
from raycnn.config import TrainConfig
if sys.argv[1] == "off":
    memory.keep_freed_memory = lambda: None
training = trainer.build_training(TrainConfig(model="mnist_base", num_threads=1, device="cpu"),
                                  datafiles.synthetic("mnist", sizes=(512, 64)))
trainer.train_one_epoch(training)              # the heap grows to a step's size once
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    trainer.train_one_epoch(training)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
print(*faults)
"""

# Resident MiB after 300 MiB were touched and freed, then the peak after reset_peak; "off" skips
# the trim in reset_peak.
KEPT = """
import sys
import numpy as np, torch
from raycnn import memory
memory.keep_freed_memory()
if sys.argv[1] == "off":
    memory._glibc().malloc_trim = lambda pad: 0
big = np.ones(300 * 2**20 // 8)
assert big.sum() > 0
del big
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
kept = rss()
memory.reset_peak(torch.device("cpu"))
print(kept, memory.peak_mb(torch.device("cpu")))
"""


# Minor faults of the steps after the first two (the heap grows to a step's size, the momentum
# buffer is made) of a dense layer whose 80 MB gradient is above a thread arena's 64 MB heaps, as
# AlexNet's dense-layer gradients are; in a thread of its own, as Ray Tune trains a function trial.
BIG_IN_THREAD = """
import resource, threading, torch
from raycnn import memory

def steps(out):
    memory.keep_freed_memory()                 # as build_training does, in the trial's thread
    torch.manual_seed(0)
    layer = torch.nn.Linear(5000, 4000)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(64, 5000)
    for step in range(6):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        optimizer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        optimizer.step()
        if step >= 2:
            out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

faults = []
worker = threading.Thread(target=steps, args=(faults,))
worker.start()
worker.join()
print(*faults)
"""


def run(code: str, mode: str = "on", env: dict | None = None) -> list[float]:
    """`code` in a fresh interpreter, with `env` added to the environment (glibc's default
    arenas unless `env` sets MALLOC_ARENA_MAX)."""
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | (env or {})
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300, env=environ)
    assert out.returncode == 0, out.stderr[-2000:]
    return [float(v) for v in out.stdout.split()]


def test_cpu_steps_reuse_the_memory_they_free():
    on, off = run(FAULTS, "on"), run(FAULTS, "off")
    # glibc's default maps and zeroes a step's large blocks afresh in most epochs (its dynamic
    # thresholds spare one now and then): thousands of faults a step. Kept, most epochs fault
    # none, one now and then a few thousand pages.
    assert min(on) < 1000 and 10 * sum(on) < sum(off), (on, off)


def test_a_trials_thread_reuses_its_memory_with_the_trial_environment():
    one_arena, default = run(BIG_IN_THREAD, env=memory.TRIAL_ENV), run(BIG_IN_THREAD)
    # A thread's own arena maps a block above its heaps' 64 MB afresh and unmaps it when freed,
    # whatever mallopt says: the 80 MB gradient is faulted in again every step (about 9,800
    # faults). Started with TRIAL_ENV, the thread allocates from the main heap, which
    # keep_freed_memory keeps, and the steps fault in nothing.
    assert min(default) > 5000 and max(one_arena) < 500, (one_arena, default)


def test_the_users_setting_wins_over_the_trial_environment(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert memory.trial_env() == {"MALLOC_ARENA_MAX": "1"}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.trial_env() == {}


def test_a_trials_peak_leaves_out_what_an_earlier_trial_kept():
    (kept, peak), (kept_off, peak_off) = run(KEPT, "on"), run(KEPT, "off")
    # the 300 MiB stay resident once freed (that is keep_freed_memory's point) until reset_peak
    assert kept > 300 and kept_off > 300, (kept, kept_off)
    assert peak < kept - 250 and peak_off > kept_off - 50, (kept, peak, kept_off, peak_off)
