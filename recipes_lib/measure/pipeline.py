"""How long an input pipeline keeps the accelerator waiting: ``time_pipeline`` over training steps.

Built on ``timing.stamp``: per-step timestamps right before and right after the step's compute, so
the time spent fetching a batch and copying it to the device shows apart from the compute.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ..core.dataload import to_device
from ..core.errors import RecipeError
from . import timing


@dataclass
class PipelineTiming:
    """What ``time_pipeline`` measured over the timed steps (warm-up excluded)."""

    steps: int
    step_s: float  # median time from the end of one step's compute to the end of the next
    wait_s: float  # total time the accelerator sat idle waiting for input
    total_s: float
    wait_fraction: float  # wait_s / total_s
    tokens_per_s: float


def cycle(loader: Iterable[dict]) -> Iterator[dict]:
    """Batches from ``loader``, epoch after epoch."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RecipeError("the loader yields no batches: use more documents or a smaller batch")


def time_pipeline(loader: Iterable[dict], step_fn: Callable[[dict], object], device: torch.device,
                  steps: int = 20, warmup: int = 3) -> PipelineTiming:
    """Run ``warmup + steps`` training steps fed by ``loader`` and time the accelerator's wait for input.

    Each step takes a timestamp right before ``step_fn(batch)`` is called (compute start) and right
    after it returns (compute end). The wait of step ``i`` is compute start ``i`` minus compute end
    ``i-1``: the time in ``next(loader)`` and in the host-to-device copy, during which no compute of
    this loop is queued. On CUDA the timestamps are CUDA events on the current stream, so they mark
    when the GPU reaches that point of its queue: while the host is ahead (the queue still holds
    earlier steps' kernels) the wait is zero, and only the time the GPU really sat idle counts. On
    CPU they are host ``perf_counter`` readings. ``step_s`` is the median time between consecutive
    compute ends; ``wait_fraction`` is the summed wait over the timed steps' total time.

    Args:
        step_fn: one training step on a batch already on ``device`` (forward, backward, optimizer).
        warmup: steps run first and left out (worker start-up, allocator, autotuning).
    """
    if steps < 1 or warmup < 0:
        raise RecipeError(f"steps={steps}, warmup={warmup}: time at least 1 step after 0 or more warm-up "
                          f"steps")
    batches = cycle(loader)
    starts, ends, tokens = [], [], []
    origin = timing.stamp(device)
    for _ in range(warmup + steps):
        batch = to_device(next(batches), device)
        starts.append(timing.stamp(device))
        step_fn(batch)
        ends.append(timing.stamp(device))
        tokens.append(batch["input_ids"].numel())
    return summarise(timing.seconds_since(origin, starts, device), timing.seconds_since(origin, ends, device),
                     tokens, warmup)


def summarise(start_s: list[float], end_s: list[float], tokens: list[int], warmup: int) -> PipelineTiming:
    """Waits and step times from compute start and end times (seconds since the first step began)."""
    previous_end = [0.0, *end_s[:-1]]
    waits = [max(s - e, 0.0) for s, e in zip(start_s[warmup:], previous_end[warmup:])]
    step_times = [e - p for e, p in zip(end_s[warmup:], previous_end[warmup:])]
    total = sum(step_times)
    return PipelineTiming(steps=len(step_times), step_s=statistics.median(step_times), wait_s=sum(waits),
                          total_s=total, wait_fraction=min(sum(waits) / total, 1.0) if total > 0 else 0.0,
                          tokens_per_s=sum(tokens[warmup:]) / total if total > 0 else 0.0)
