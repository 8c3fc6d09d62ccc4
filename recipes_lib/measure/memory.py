"""Measurement: peak memory with a breakdown, step time, tokens/s and MFU, on CUDA and on CPU.

Peak memory on CUDA is the caching allocator's ``max_memory_allocated``. On CPU, where PyTorch keeps
no such counter, ``AllocationTracker`` counts the bytes of every tensor storage created inside it and
releases them when the storage dies, so the same claims can be checked without a GPU.

The breakdown is ``parameters + gradients + optimizer state`` (sizes of the tensors that hold them,
on the accelerator) and ``activations`` = peak minus those three: activations and temporaries.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GiB = 2**30


OOM = "OOM"


def storage_leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s data: itself, a DTensor's local shard, or a tensor
    subclass's inner tensors (torchao's quantized weights), with bitsandbytes' int8 row scales."""
    if isinstance(t, DTensor):
        return storage_leaves(t.to_local())
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [leaf for n in names for leaf in storage_leaves(getattr(t, n))]
    scales = getattr(t, "SCB", None)  # bitsandbytes Int8Params keep their row scales beside the data
    return [t] + ([scales] if isinstance(scales, torch.Tensor) else [])


def tensor_bytes(tensors: Iterable[torch.Tensor | None], device: torch.device | None = None) -> int:
    """The one byte counter: bytes held by ``tensors``, each storage once.

    A DTensor counts its local shard (what this rank holds), a tensor subclass its inner tensors.
    With ``device``, only storages on that device type count (and on that very device if it has an
    index, e.g. ``cuda:1``).
    """
    seen, total = set(), 0
    for t in tensors:
        for leaf in storage_leaves(t) if t is not None else ():
            if device is not None and leaf.device.type != device.type:
                continue
            if device is not None and device.index is not None and leaf.device.index != device.index:
                continue
            storage = leaf.untyped_storage()
            key = (leaf.device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state (works for wrappers exposing ``optim_dict`` too)."""
    inner = getattr(optimizer, "optim_dict", None)  # torchao's CPUOffloadOptimizer (host side) ...
    optimizers = list(inner.values()) if inner else [optimizer]
    if getattr(optimizer, "d_opt", None) is not None:  # ... and the small parameters it keeps on the device
        optimizers.append(optimizer.d_opt)
    return [v for opt in optimizers for state in opt.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


@dataclass
class MemoryBreakdown:
    """Bytes on the accelerator (host memory on CPU) at the step's peak."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    peak: int

    @property
    def states(self) -> int:
        """Parameters + gradients + optimizer state: what does not scale with batch or length."""
        return self.parameters + self.gradients + self.optimizer

    def gib(self) -> dict[str, float]:
        return {k: v / GiB for k, v in asdict(self).items()}


def breakdown(model: torch.nn.Module, optimizer, peak: int, device: torch.device) -> MemoryBreakdown:
    """Split ``peak`` into parameter, gradient (one per trainable parameter), optimizer and the rest."""
    params = list(model.parameters()) + list(model.buffers()) + _quantization_state(model)
    parameters = tensor_bytes(params, device)
    trainable = [p for p in model.parameters() if p.requires_grad and p.device.type == device.type]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    opt = tensor_bytes(optimizer_tensors(optimizer), device) if optimizer is not None else 0
    return MemoryBreakdown(parameters, gradients, opt, max(peak - parameters - gradients - opt, 0), peak)


def _quantization_state(model: torch.nn.Module) -> list[torch.Tensor]:
    """bitsandbytes' 4-bit block scales (and their own scales), held beside the packed weights."""
    tensors = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None and not isinstance(state, list):
            scales = (getattr(state, "absmax", None), getattr(state, "code", None))
            tensors += [t for t in scales if t is not None]
            state = getattr(state, "state2", None)
    return tensors


class AllocationTracker(TorchDispatchMode):
    """Peak bytes of tensor storages alive while inside, counting those alive at entry (CPU or CUDA)."""

    def __init__(self, baseline: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = self.peak = 0
        for t in baseline:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if isinstance(t, torch.nn.Parameter):
            t = t.data
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # torchao: Int8Tensor, NF4Tensor
            for name in t.__tensor_flatten__()[0]:
                self._add(getattr(t, name))
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._live or storage.nbytes() == 0:
            return
        self._live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._add(t)
        return out


@contextlib.contextmanager
def peak_memory(device: torch.device, baseline: Iterable[torch.Tensor] = ()):
    """Yield a dict whose ``"peak"`` (bytes) is filled in on exit.

    Args:
        baseline: on CPU, tensors alive before the block that count towards the peak (the model's
            parameters, gradients and optimizer state); CUDA counts everything allocated anyway.
    """
    result: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device)
    else:
        tracker = AllocationTracker(baseline)
        with tracker:
            yield result
        result["peak"] = tracker.peak


@contextlib.contextmanager
def host_peak_memory(device: torch.device):
    """Yield a dict whose ``"peak"`` is, on CUDA, the most pinned host memory handed out inside the block
    (``torch.cuda.host_memory_stats``' active bytes, in its power-of-two blocks: offloaded activations);
    the dict stays empty on a CPU, where host memory is the device's memory, and with a torch that keeps
    no such statistics (before 2.7). Where ``active_bytes`` is missing it reads the pool's bytes instead."""
    result: dict[str, int] = {}
    reset = getattr(torch.cuda, "reset_peak_host_memory_stats", None)
    if device.type != "cuda" or reset is None:
        yield result
        return
    torch.cuda.synchronize(device)
    reset()
    yield result
    torch.cuda.synchronize(device)
    stats = torch.cuda.host_memory_stats()
    result["peak"] = int(stats.get("active_bytes.peak", stats.get("allocated_bytes.peak", 0)))


def host_total_bytes() -> int:
    """The machine's physical memory in bytes (what pinned, unswappable host buffers can at most take)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def is_oom(error: BaseException) -> bool:
    """True for CUDA out-of-memory errors (and CPU allocation failures)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def oom_as_result(fn: Callable[[], dict]) -> dict:
    """``fn()``'s row, or ``{"oom": True, "error": ...}`` if it ran out of memory (memory freed around it).

    The one place where running out of memory becomes a result instead of a crash; any other error
    propagates.
    """
    free_memory()
    try:
        row = fn()
    except Exception as error:  # noqa: BLE001 - only OOM becomes a result
        if not is_oom(error):
            raise
        row = {"oom": True, "error": str(error).splitlines()[0][:120]}
    finally:
        free_memory()
    return row


def free_memory() -> None:
    """Return cached blocks to the driver so the next measurement starts clean."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def param_bytes(model: torch.nn.Module, device: torch.device | None = None) -> int:
    """Bytes of the weights this rank holds (its shard under FSDP2 and ZeRO-3), optionally on one device."""
    tensors = [getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p for p in model.parameters()]
    return tensor_bytes(t for t in tensors if t is not None and (device is None or t.device == device))


def optimizer_bytes(optimizer, device: torch.device | None = None) -> int:
    """Bytes of this rank's optimizer state: AdamW's moments, and DeepSpeed's fp32 master partitions."""
    tensors, level = [], optimizer
    while level is not None:
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-2, ZeRO-3
            tensors += list(getattr(level, name, None) or [])
        if isinstance(getattr(level, "state", None), dict) and getattr(level, "optimizer", None) is None:
            tensors += [v for s in level.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        level = getattr(level, "optimizer", None)
    return tensor_bytes(tensors, device)


def memory_breakdown(result: dict, device_index: int | None = None):
    """A rank's (or one GPU's) peak split into weights, gradients, optimizer state and activations.

    From a training script's result: gradients are what was allocated right after the last backward
    beyond weights and optimizer state (with DDP, its all-reduce buckets too); activations (and
    temporaries, FSDP2's gathered layers among them) are the peak beyond that. With several GPUs per
    rank (naive model parallelism) ``device_index`` picks one, by default the fullest. None without
    CUDA readings.
    """
    i = device_index if result.get("device_peaks") else None
    if i is None and result.get("device_peaks"):  # naive model parallelism: the fullest GPU
        i = max(range(len(result["device_peaks"])), key=result["device_peaks"].__getitem__)
    peak = result["peak_bytes"] if i is None else result["device_peaks"][i]
    if peak is None or not result.get("after_backward_bytes"):
        return None
    after = result["after_backward_bytes"][i or 0]
    params = result["param_bytes"] if i is None else result["device_param_bytes"][i]
    opt = result["optimizer_bytes"] if i is None else result["device_optimizer_bytes"][i]
    grads = max(after - params - opt, 0)
    return MemoryBreakdown(params, grads, opt, max(peak - params - grads - opt, 0), peak)


class DeviceMemory:
    """CUDA memory of the rank's devices: peaks after warm-up, and the most allocated after a backward."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self.on_gpu = devices[0].type == "cuda"
        self.after_backward = [0] * len(devices)

    def reset_peaks(self) -> None:
        """Start the peaks afresh (warm-up done: optimizer state exists, kernels chosen)."""
        for d in self.devices:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)

    def read_after_backward(self) -> None:
        """Record what is allocated now: gradients alive, activations gone."""
        for i, d in enumerate(self.devices):
            self.after_backward[i] = max(self.after_backward[i], torch.cuda.memory_allocated(d))

    def peaks(self) -> list[int | None]:
        return [torch.cuda.max_memory_allocated(d) for d in self.devices] if self.on_gpu else [None]
