"""The one timer: CUDA events on a GPU, ``perf_counter`` on CPU; a median with its min-max spread.

``seconds(fn, device)`` times one call. ``time_it(fn, device)`` warms up, times ``repeats`` calls and
returns a ``Timing`` (median, min, max, every sample; ``per_second`` turns it into rates).
``Timing.of(samples)`` summarises times taken elsewhere (the training loop's steps), dropping warm-up
samples. ``stamp``/``seconds_since`` take timestamps inside a loop without waiting for the GPU (the
input pipeline's wait for data).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of the timed samples and their spread."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float], skip: int = 0) -> Timing:
        """Summarise ``samples`` after dropping the first ``skip`` (warm-up), if enough remain."""
        kept = tuple(samples[skip:]) if len(samples) > skip else tuple(samples)
        if not kept:
            raise ValueError("no timed samples to summarise")
        return cls(statistics.median(kept), min(kept), max(kept), kept)

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the samples disagree."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def per_second(self, work: float) -> dict[str, float]:
        """``work`` (tokens, say) per second at the median call, the slowest (``_min``) and the fastest
        (``_max``), under the keys ``measure.bench.speed_ratio`` and ``bench.spread`` read."""
        return {"tokens_per_s": work / self.median, "tokens_per_s_min": work / self.high,
                "tokens_per_s_max": work / self.low}

    def over(self, reference: float) -> tuple[float, float, float]:
        """Median, min and max in multiples of ``reference`` seconds, for ``bench.describe_ratio``."""
        return self.median / reference, self.low / reference, self.high / reference

    def __str__(self) -> str:
        return f"{self.median * 1e3:,.3g} ms [{self.low * 1e3:,.3g}-{self.high * 1e3:,.3g}]"


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


def stamp(device: torch.device):
    """A timestamp on ``device``'s timeline, taken without waiting: a CUDA event recorded on the current
    stream (it marks when the GPU reaches this point of its queue), or ``perf_counter`` on CPU."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_since(origin, stamps: Sequence, device: torch.device) -> list[float]:
    """Seconds from the ``stamp`` ``origin`` to each of ``stamps`` (waits for the GPU once, at the end)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return [origin.elapsed_time(mark) / 1e3 for mark in stamps]
    return [mark - origin for mark in stamps]


def time_it(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 2) -> Timing:
    """``fn`` called ``warmup`` times untimed, then timed ``repeats`` times: median and spread."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time at least one call")
    for _ in range(warmup):
        fn()
    return Timing.of([seconds(fn, device) for _ in range(repeats)])


def stepper(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """``fn -> seconds`` on ``device``: the clock the training loop takes to time its steps."""
    return lambda fn: seconds(fn, device)


def matmul_peak(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                repeats: int = 20) -> float:
    """Measured dense matmul FLOP/s on ``n x n`` matrices: the rate a large matmul really gets on this
    device, the practical ceiling for MFU and for attention kernels (datasheet peaks are not reached)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_it(lambda: a @ b, device, repeats=repeats, warmup=3).median


def copy_bandwidth(device: torch.device, n_bytes: int = 2**30, repeats: int = 20) -> float:
    """Measured memory bandwidth, bytes/s, from a large device-to-device copy (read + write counted)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / time_it(lambda: dst.copy_(src), device, repeats, warmup=3).median
