"""A trial's peak memory: the allocator's peak on CUDA, the process's peak resident set on the
CPU (Linux). Tune reuses a trial's process for the next trial, so each trial resets the peak."""
from __future__ import annotations

import re
import resource
from pathlib import Path

import torch

PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak(device: torch.device) -> None:
    """Start a new peak for `peak_mb`. CUDA: the allocator's peak. CPU (Linux): the process's
    peak resident set (writing 5 to clear_refs sets it to the current RSS); elsewhere the CPU
    peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
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
