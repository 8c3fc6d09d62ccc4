"""A comm/compute timeline of training steps, from torch.profiler: where a step's time goes.

``profile_steps(step, steps, device, trace)`` runs ``step()`` a few times under ``torch.profiler``
(CPU activity, and CUDA where the device is a GPU), each call inside a ``record_function`` range
(``STEP_PREFIX``), saves the Chrome trace if asked (open it in ``chrome://tracing`` or Perfetto),
and reads the trace back into one ``StepTimeline`` per step (``step_timelines``):

- **communication**: the collectives as they execute. On a GPU, the NCCL kernels (``ncclDevKernel_*``,
  ``ncclKernel_*``) on their own streams; with gloo (CPU), the ``gloo:<collective>`` ranges that
  gloo's worker threads record while they move the data.
- **compute**: everything else the device runs. On a GPU, every other kernel, copy and memset;
  on CPU, the ``aten::`` operators of the threads that run no collective (the training thread).
- per step: the step's wall time (its ``record_function`` range), the time covered by compute, by
  communication, the communication **not overlapped** by any compute (``exposed_comm_ms``: the
  device waits for the network there), and the time covered by neither (``idle_ms``: host overhead,
  launches, synchronisation); the number of collectives and their message bytes (NCCL kernels carry
  ``In/Out msg nelems`` and ``dtype``; gloo's ranges their input shapes).

Times are unions of intervals, so nested operators and concurrent streams count once. ``step()`` must
wait for its device before it returns (``core.train.sync``), so that each step's kernels fall inside
its range. The arithmetic (``merge``, ``minus``, ``clip``) works on plain ``(start, end)`` pairs.
``trace_events`` is the same profiled run, returning the trace's events to read another way
(``measure.step_split``: a step's time by attention, MLP, loss and copies).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import statistics
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

STEP_PREFIX = "timeline step "
NCCL_KERNELS = ("ncclDevKernel_", "ncclKernel_")
GLOO_PREFIX = "gloo:"
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast", "barrier", "send",
               "recv")
# Element sizes by the names traces use: NCCL kernels' ``dtype`` (c10's ScalarType names), and gloo
# ranges' ``Input type`` (C++ type names).
ELEMENT_BYTES = {"Float": 4, "BFloat16": 2, "Half": 2, "Double": 8, "Long": 8, "Int": 4, "Byte": 1,
                 "Char": 1, "Bool": 1, "Float8_e4m3fn": 1, "Float8_e5m2": 1,
                 "float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
                 "unsigned char": 1, "signed char": 1, "bool": 1}

Interval = tuple[float, float]


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of ``intervals`` as sorted, disjoint intervals (empty ones dropped)."""
    merged: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def length(intervals: Iterable[Interval]) -> float:
    """The time covered by ``intervals`` (overlaps counted once)."""
    return sum(end - start for start, end in merge(intervals))


def clip(intervals: Iterable[Interval], start: float, end: float) -> list[Interval]:
    """The parts of ``intervals`` inside ``[start, end]``."""
    return merge((max(a, start), min(b, end)) for a, b in intervals)


def minus(intervals: Iterable[Interval], covered: Iterable[Interval]) -> list[Interval]:
    """The parts of ``intervals`` that no interval of ``covered`` overlaps (one sweep over both, sorted)."""
    holes, left, first = merge(covered), [], 0
    for start, end in merge(intervals):
        while first < len(holes) and holes[first][1] <= start:  # holes before this interval, and every later
            first += 1
        index = first
        while index < len(holes) and holes[index][0] < end:
            hole_start, hole_end = holes[index]
            if hole_start > start:
                left.append((start, hole_start))
            start, index = max(start, hole_end), index + 1
        if start < end:
            left.append((start, end))
    return left


@dataclass(frozen=True)
class StepTimeline:
    """One profiled step, in milliseconds (module docstring)."""

    step_ms: float
    compute_ms: float
    comm_ms: float
    exposed_comm_ms: float
    idle_ms: float
    collectives: int
    comm_bytes: int | None  # None when a collective's message size is not in the trace
    kinds: dict[str, int]  # collectives by name


def span(event: dict) -> Interval:
    """(start, end) of a Chrome-trace event, in its microseconds."""
    return event["ts"], event["ts"] + event.get("dur", 0.0)


def is_communication(event: dict) -> bool:
    """An NCCL kernel, or a range gloo records while it runs a collective."""
    name = event.get("name", "")
    return (event.get("cat") == "kernel" and name.startswith(NCCL_KERNELS)) or name.startswith(GLOO_PREFIX)


def collective_kind(event: dict) -> str:
    """The collective, by one name whatever the backend (``all_gather``, ``reduce_scatter``, ...): from
    gloo's range name, or NCCL's ``Collective name`` (``_allgather_base``, ...) or kernel name."""
    name = event["name"]
    if name.startswith(GLOO_PREFIX):
        name = name.removeprefix(GLOO_PREFIX)
    else:
        name = event.get("args", {}).get("Collective name") or name.split("_")[1].split("(")[0]
    letters = re.sub("[^a-z]", "", name.lower())
    return next((kind for kind in COLLECTIVES if kind.replace("_", "") in letters), name)


def message_bytes(event: dict) -> int | None:
    """A collective's message size in bytes (the larger of input and output for NCCL), None if unknown."""
    args = event.get("args", {})
    if "In msg nelems" in args and args.get("dtype") in ELEMENT_BYTES:
        return max(args["In msg nelems"], args.get("Out msg nelems", 0)) * ELEMENT_BYTES[args["dtype"]]
    dims, types = args.get("Input Dims"), args.get("Input type")
    if not dims or not types or any(t not in ELEMENT_BYTES for t in types[:len(dims)]):
        return None
    return sum(math.prod(shape) * ELEMENT_BYTES[t] for shape, t in zip(dims, types))


def classify(events: Sequence[dict]) -> tuple[list[dict], list[Interval], list[Interval]]:
    """(communication events, communication intervals, compute intervals) of a trace (module docstring)."""
    spans = [e for e in events if e.get("ph") == "X" and "ts" in e]
    comm = [e for e in spans if is_communication(e)]
    if any(e.get("cat") == "kernel" for e in spans):  # a GPU trace: what the device runs
        compute = [e for e in spans if e.get("cat") in DEVICE_CATEGORIES and not is_communication(e)]
    else:  # CPU: the operators of the threads that run no collective
        comm_threads = {e.get("tid") for e in comm}
        compute = [e for e in spans if e.get("cat") == "cpu_op" and e["name"].startswith("aten::")
                   and e.get("tid") not in comm_threads]
    return comm, [span(e) for e in comm], [span(e) for e in compute]


def step_timelines(events: Sequence[dict]) -> list[StepTimeline]:
    """One ``StepTimeline`` per ``STEP_PREFIX`` range of a Chrome trace's ``traceEvents``, in order."""
    steps = sorted((e for e in events if e.get("cat") == "user_annotation"
                    and e.get("name", "").startswith(STEP_PREFIX)), key=lambda e: e["ts"])
    comm_events, comm, compute = classify(events)
    timelines = []
    for step in steps:
        start, end = span(step)
        inside = [e for e in comm_events if start <= e["ts"] < end]
        step_comm, step_compute = clip(comm, start, end), clip(compute, start, end)
        sizes = [message_bytes(e) for e in inside]
        timelines.append(StepTimeline(
            step_ms=(end - start) / 1e3, compute_ms=length(step_compute) / 1e3,
            comm_ms=length(step_comm) / 1e3,
            exposed_comm_ms=length(minus(step_comm, step_compute)) / 1e3,
            idle_ms=(end - start - length(step_comm + step_compute)) / 1e3,
            collectives=len(inside), comm_bytes=None if None in sizes else sum(sizes),
            kinds=dict(Counter(collective_kind(e) for e in inside))))
    return timelines


def profile_steps(step: Callable[[], object], steps: int, device: torch.device, trace: str | None = None,
                  warmup: int = 0) -> list[StepTimeline]:
    """Run ``step()`` ``warmup + steps`` times under torch.profiler; the last ``steps`` steps' timelines
    (module docstring). The arguments are ``trace_events``'."""
    return step_timelines(trace_events(step, steps, device, trace, warmup))


def trace_events(step: Callable[[], object], steps: int, device: torch.device, trace: str | None = None,
                 warmup: int = 0) -> list[dict]:
    """Run ``step()`` ``warmup + steps`` times under torch.profiler, each inside a ``STEP_PREFIX`` range
    numbered from 0 (the warm-up's from -``warmup``); the Chrome trace's ``traceEvents`` of the last
    ``steps`` steps.

    Args:
        step: one training step that waits for its device before returning.
        trace: write the Chrome trace there (a ``.json``, or ``.json.gz``); None keeps none.
        warmup: steps traced first and thrown away: tracing costs most in its first step (CUPTI's
            set-up on a GPU), as torch.profiler's docs warn.
    """
    on_gpu = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity
    activities = [activity.CPU, activity.CUDA] if on_gpu else [activity.CPU]
    collected = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*won't be using warmup.*")  # warmup=0 is a choice here
        cycle = torch.profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    # Shapes give gloo's message sizes; NCCL kernels carry theirs, and on a GPU recording shapes
    # would only slow the host down.
    with torch.profiler.profile(activities=activities, record_shapes=not on_gpu, schedule=cycle,
                                on_trace_ready=collected.append) as prof:
        for index in range(warmup + steps):
            with torch.profiler.record_function(f"{STEP_PREFIX}{index - warmup}"):
                step()
            prof.step()
    with tempfile.TemporaryDirectory() as folder:
        path = trace or os.path.join(folder, "trace.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        collected[0].export_chrome_trace(path)
        with open(path, "rb") as f:
            raw = f.read()
    return json.loads(gzip.decompress(raw) if path.endswith(".gz") else raw)["traceEvents"]


def summary(timelines: Sequence[StepTimeline]) -> dict:
    """The median of each figure over the profiled steps (``kinds``: of each collective's count), and
    every step's own (``steps``)."""
    steps = [asdict(t) for t in timelines]
    numbers = ("step_ms", "compute_ms", "comm_ms", "exposed_comm_ms", "idle_ms", "collectives")
    medians = {key: statistics.median(s[key] for s in steps) for key in numbers} if steps else {}
    sizes = [s["comm_bytes"] for s in steps]
    medians["comm_bytes"] = statistics.median(sizes) if steps and None not in sizes else None
    kinds = sorted({kind for s in steps for kind in s["kinds"]})
    medians["kinds"] = {kind: statistics.median(s["kinds"].get(kind, 0) for s in steps) for kind in kinds}
    return medians | {"steps": steps}
