"""Timing a step: seconds per call (CUDA events on a GPU, wall or CPU seconds on the CPU) and the
measured matmul peak the MFU columns divide by."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.devices import synchronize


def time_steps(
    step: Callable[[], Any], steps: int, warmup: int, device: torch.device, cpu_time: bool = False
) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls (CUDA events on GPU). ``cpu_time`` (CPU
    only): this process's CPU seconds instead of wall-clock seconds — with one thread, the step's work,
    whatever else runs on a shared machine."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    clock = time.process_time if cpu_time else time.perf_counter
    times = []
    for _ in range(steps):
        tick = clock()
        step()
        times.append(clock() - tick)
    return times


def matmul_peak(
    device: torch.device, size: int | None = None, iters: int = 10, cpu_time: bool = False
) -> tuple[float, str]:
    """Measured matmul throughput (FLOP/s, median over ``iters``) and its dtype: bf16 ``8192³`` on
    CUDA, fp32 ``512³`` on CPU (the dtype each device's training step computes in)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = time_steps(lambda: torch.mm(a, b), steps=iters, warmup=3, device=device, cpu_time=cpu_time)
    return 2 * size**3 / statistics.median(times), str(dtype).removeprefix("torch.")
