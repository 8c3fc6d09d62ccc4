"""Time attention kernels: median time, spread, peak memory and TFLOP/s of one call, or OOM."""

from __future__ import annotations

import torch

from ..attention.kernels import attend
from . import memory, timing
from .flops import attention_flops


def time_attention(implementation: str, seq_len: int, heads: int, head_dim: int, hw, window: int | None = None,
                   backward: bool = True, repeats: int = 5) -> dict:
    """Median time and peak extra memory of one attention call (forward, or forward+backward), or OOM.

    Inputs are ``[1, heads, seq_len, head_dim]`` in the device's weight dtype; the peak excludes them.
    FlexAttention is timed compiled (on CPU too, where it has no backward); on CPU its peak is not
    measured (None): the allocation tracker cannot run inside it.
    """
    row = {"implementation": implementation, "seq_len": seq_len, "window": window, "oom": False}
    memory.free_memory()
    try:
        gen = torch.Generator(device=hw.device).manual_seed(0)
        q, k, v = (torch.randn(1, heads, seq_len, head_dim, device=hw.device, dtype=hw.model_dtype, generator=gen,
                               requires_grad=backward) for _ in range(3))
        grad = torch.randn_like(q) if backward else None

        def call():
            out = attend(implementation, q, k, v, window, compiled=True)  # timing eager Flex would mislead
            if backward:
                out.backward(grad)
                q.grad = k.grad = v.grad = None

        seconds = timing.time_it(call, hw.device, repeats=repeats, warmup=1).median
        inputs = [t for t in (q, k, v, grad) if t is not None]
        peak_bytes = None
        if hw.cuda or not implementation.startswith("flex"):  # the CPU tracker cannot see inside FlexAttention
            with memory.peak_memory(hw.device, inputs) as peak:
                call()
            peak_bytes = peak["peak"] - memory.tensor_bytes(inputs)
        n_flops = attention_flops(seq_len, heads, head_dim, window if implementation != "flex-causal" else None,
                                backward)
        row.update(seconds=seconds, peak_bytes=peak_bytes,
                   tflops=n_flops / seconds / 1e12)
    except Exception as error:  # noqa: BLE001 - only OOM becomes a result
        if not memory.is_oom(error):
            raise
        row["oom"] = True
    finally:
        q = k = v = grad = None
        memory.free_memory()
    return row


def time_and_memory(fn, q, k, v, device: torch.device, repeats: int = 10) -> dict:
    """Median forward time and peak memory of one attention call (OOM is a result)."""
    memory.free_memory()
    try:
        with torch.no_grad():
            seconds = timing.time_it(lambda: fn(q, k, v), device, repeats=repeats, warmup=2).median
            with memory.peak_memory(device, baseline=(q, k, v)) as peak:
                fn(q, k, v)
    except Exception as error:  # noqa: BLE001 - only OOM becomes a result
        if not memory.is_oom(error):
            raise
        memory.free_memory()
        return {"oom": True}
    return {"oom": False, "seconds": seconds, "peak_bytes": peak["peak"]}
