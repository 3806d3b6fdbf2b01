"""Peak memory of one step, measured the same way by benchmarks and tests.

CPU: the torch profiler's memory events (``profile_memory=True``); the peak is the highest running total of CPU
tensor bytes allocated during the step — the CPU analogue of CUDA's ``max_memory_allocated``. CUDA:
``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` before the step.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch


def cpu_peak_bytes(step: Callable[[], Any]) -> int:
    """Highest running total of CPU tensor bytes allocated during ``step()`` (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    total = peak = 0
    for e in sorted((e for e in events if e["args"].get("Device Type", 0) == 0), key=lambda e: e["ts"]):
        total += e["args"]["Bytes"]
        peak = max(peak, total)
    return peak


def cuda_peak_bytes(step: Callable[[], Any]) -> int:
    """``max_memory_allocated`` during ``step()`` minus ``memory_allocated`` before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
