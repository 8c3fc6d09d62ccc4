"""Measurement: peak memory with a breakdown, step time, tokens/s and MFU, on CUDA and on CPU.

Peak memory on CUDA is the caching allocator's ``max_memory_allocated``. On CPU, where PyTorch keeps
no such counter, ``AllocationTracker`` counts the bytes of every tensor storage created inside it and
releases them when the storage dies, so the same claims can be checked without a GPU.

The breakdown is ``parameters + gradients + optimizer state`` (sizes of the tensors that hold them,
on the accelerator) and ``activations`` = peak minus those three: activations and temporaries.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GiB = 2**30
OOM = "OOM"


def tensor_bytes(tensors: Iterable[torch.Tensor], device: torch.device | None = None) -> int:
    """Bytes held by ``tensors`` (each storage once), optionally only those on ``device``'s type
    (and on that very device if it has an index, e.g. ``cuda:1``)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or (device is not None and t.device.type != device.type):
            continue
        if device is not None and device.index is not None and t.device.index != device.index:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
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
            tensors += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if t is not None]
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


def is_oom(error: BaseException) -> bool:
    """True for CUDA out-of-memory errors (and CPU allocation failures)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_memory() -> None:
    """Return cached blocks to the driver so the next measurement starts clean."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def matmul_peak(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    """Measured dense matmul FLOP/s on ``n x n`` matrices: the rate a large matmul really gets on this
    device, the practical ceiling for MFU and for attention kernels (datasheet peaks are not reached)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats=repeats, warmup=3)
    return 2 * n**3 / seconds


def linear_shapes(config) -> list[tuple[int, int]]:
    """(d_in, d_out) of every decoder linear layer of a Llama-style config: q, k, v, o, gate, up, down."""
    d, ffn = config.hidden_size, config.intermediate_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or d // n_heads
    q, kv = n_heads * head_dim, n_kv * head_dim
    per_layer = [(d, q), (d, kv), (d, kv), (q, d), (d, ffn), (d, ffn), (ffn, d)]
    return per_layer * config.num_hidden_layers


def training_flops_per_token(config, seq_len: int, trainable_fraction: float = 1.0) -> float:
    """Model FLOPs per trained token: ``6N + 12 L d T`` (PaLM's count; recomputation not included).

    With a frozen base (LoRA), weight gradients of frozen matrices are skipped, so the base costs
    ``4N`` (forward 2N + input gradients 2N) and only the trainable fraction costs ``6N``.
    """
    d, layers, n_heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // n_heads
    n_matmul = sum(i * o for i, o in linear_shapes(config)) + config.vocab_size * d  # + the LM head
    weights = n_matmul * (4 + 2 * trainable_fraction)
    attention = 12 * layers * n_heads * head_dim * seq_len
    return weights + attention


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None if the peak is unknown)."""
    if not peak_flops:
        return None
    return tokens_per_second * flops_per_token / peak_flops


def steady_median(values: list[float], skip: int = 1) -> float:
    """Median after dropping the first ``skip`` values (warm-up: allocation, autotuning, lazy state)."""
    kept = values[skip:] if len(values) > skip else values
    return statistics.median(kept)


def report(label: str, **values) -> None:
    """The one print format for measurements: ``label | key: value | ...`` with units in the keys."""
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            value = f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        parts.append(f"{key}: {value}")
    print(f"{label:<28} | " + " | ".join(parts))
