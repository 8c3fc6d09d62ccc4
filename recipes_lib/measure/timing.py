"""Timing: CUDA events on a GPU, perf_counter on CPU; medians after warm-up; measured device peaks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn``: CUDA events on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        # Events record on the current stream of the current device: make ``device`` current, or a
        # function running on another GPU would be timed by an idle stream (near-zero seconds).
        with torch.cuda.device(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn`` (CUDA events on a GPU, perf_counter on CPU), after warm-up."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def steady_median(values: list[float], skip: int = 1) -> float:
    """Median after dropping the first ``skip`` values (warm-up: allocation, autotuning, lazy state)."""
    kept = values[skip:] if len(values) > skip else values
    return statistics.median(kept)


def matmul_peak(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    """Measured dense matmul FLOP/s on ``n x n`` matrices: the rate a large matmul really gets on this
    device, the practical ceiling for MFU and for attention kernels (datasheet peaks are not reached)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats=repeats, warmup=3)
    return 2 * n**3 / seconds


def copy_bandwidth(device: torch.device, n_bytes: int = 2**30, repeats: int = 20) -> float:
    """Measured memory bandwidth, bytes/s, from a large device-to-device copy (read + write counted)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats, warmup=3)
    return 2 * n_bytes / seconds
