"""Time attention kernels: median time, spread, peak memory and TFLOP/s (with min-max) of one call, or OOM."""

from __future__ import annotations

import torch

from ..attention.kernels import attend, random_qkv
from ..core.hardware import Hardware
from . import memory, timing
from .flops import attention_flops


def time_attention(implementation: str, seq_len: int, heads: int, head_dim: int, hw: Hardware,
                   window: int | None = None, backward: bool = True, repeats: int = 5,
                   batch: int = 1) -> dict:
    """Median time (with min and max) and peak extra memory of one attention call, or OOM.

    Inputs are ``[batch, heads, seq_len, head_dim]`` in the device's compute dtype (``hw.compute_dtype``:
    bf16, fp16 on a T4, fp32 on a CPU); the peak excludes them. The call is forward + backward
    (``backward``) or forward only (no autograd graph).
    FlexAttention is timed compiled (on CPU too, where it has no backward); on CPU its peak is not
    measured (None): the allocation tracker cannot run inside it. TFLOP/s count the pairs the mask
    keeps (causal: half; ``flex-causal`` ignores ``window``), at the median call (``tflops``) and at
    the slowest and fastest (``tflops_min``, ``tflops_max``).
    """
    row = {"implementation": implementation, "seq_len": seq_len, "window": window}
    measured = memory.oom_as_result(
        lambda: _measure(implementation, seq_len, heads, head_dim, hw, window, backward, repeats, batch))
    return row | {"seconds": None, "seconds_min": None, "seconds_max": None, "peak_bytes": None,
                  "tflops": None, "tflops_min": None, "tflops_max": None} | measured


def _measure(implementation, seq_len, heads, head_dim, hw, window, backward, repeats, batch) -> dict:
    q, k, v = random_qkv(batch, heads, seq_len, head_dim, hw.device, hw.compute_dtype, requires_grad=backward)
    grad = torch.randn_like(q) if backward else None

    def call():
        out = attend(implementation, q, k, v, window, compiled=True)  # timing eager Flex would mislead
        if backward:
            out.backward(grad)
            q.grad = k.grad = v.grad = None

    took = timing.time_it(call, hw.device, repeats=repeats, warmup=1)
    inputs = [t for t in (q, k, v, grad) if t is not None]
    peak_bytes = None
    if hw.cuda or not implementation.startswith("flex"):  # the CPU tracker cannot see inside FlexAttention
        with memory.peak_memory(hw.device, inputs) as peak:
            call()
        peak_bytes = peak["peak"] - memory.tensor_bytes(inputs)
    counted_window = None if implementation == "flex-causal" else window
    n_flops = batch * attention_flops(seq_len, heads, head_dim, counted_window, backward)
    return {"oom": False, "seconds": took.median, "seconds_min": took.low, "seconds_max": took.high,
            "peak_bytes": peak_bytes, "tflops": n_flops / took.median / 1e12,
            "tflops_min": n_flops / took.high / 1e12, "tflops_max": n_flops / took.low / 1e12}
