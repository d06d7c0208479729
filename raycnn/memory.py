"""A trial's memory on its device: its peak (the allocator's peak on CUDA, the process's peak
resident set on the CPU, Linux), reset when a trial starts because Tune reuses a trial's process
for the next trial; and glibc's malloc kept from handing a CPU step's memory back to the kernel."""
from __future__ import annotations

import ctypes
import functools
import os
import re
import resource
from pathlib import Path

import torch

PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# The largest trim threshold mallopt takes (an int): the heap's free top is never trimmed.
NO_TRIM = 2**31 - 1
# What a trial's process must start with for `keep_freed_memory` to reach the thread that trains
# (Ray Tune trains a function trial in a thread of its own). glibc gives each new thread an arena
# of its own, grown in heaps of at most 64 MB, and maps any larger block there afresh and unmaps
# it when freed, whatever mallopt says: AlexNet's 151 MB and 67 MB dense-layer gradients were
# faulted in page by page every step, 15% of a trial's CPU time spent in the kernel
# (benchmarks/arena.py). With one arena every thread allocates from the main heap, which mallopt
# governs. glibc reads it when the process starts, so it goes in the environment Ray starts trial
# processes with.
TRIAL_ENV = {"MALLOC_ARENA_MAX": "1"}


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc; None elsewhere (macOS, musl), whose allocators stay as they are."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version          # glibc's own symbol
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> None:
    """Have glibc's malloc keep the memory a training step frees for the next step: large blocks
    come from the heap instead of fresh mappings, and the heap's free top is not trimmed.

    Why: glibc maps each block above its mmap threshold fresh from the kernel and unmaps it when
    it is freed, and trims the heap's free top, so every CPU step faulted in and zeroed the pages
    of its large activations, gradients and (bf16) autocast's weight copies again: kernel time
    that was a large share of a CPU epoch, most of all in bf16. Process-wide and idempotent;
    `reset_peak` hands the kept memory back to the kernel when the next trial starts."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM)


def trial_env() -> dict[str, str]:
    """TRIAL_ENV less the variables the user's environment sets (theirs win)."""
    return {k: v for k, v in TRIAL_ENV.items() if k not in os.environ}


def reset_peak(device: torch.device) -> None:
    """Start a new peak for `peak_mb`. CUDA: the allocator's peak. CPU (Linux): the process's
    peak resident set (writing 5 to clear_refs sets it to the current RSS), after glibc gave back
    the free memory `keep_freed_memory` kept, which is an earlier trial's, not this one's;
    elsewhere the CPU peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_mb(device: torch.device) -> float:
    """Peak memory since the last `reset_peak`: on CUDA the allocator's peak on that device; on
    the CPU the whole process's peak resident memory (Linux's VmHWM, data and libraries
    included), or without /proc its peak since it started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s*(\d+) kB", PROC_STATUS.read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
