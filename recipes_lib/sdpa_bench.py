"""Attention kernels for inference: eager attention against PyTorch's SDPA backends (and flash-attn).

Eager attention materialises the ``[batch, heads, seq, seq]`` score matrix: memory and time grow
with ``seq^2`` and the matrix makes several trips through GPU memory. The fused kernels (SDPA's
flash, memory-efficient and cuDNN backends; the flash-attn package) tile queries and keys, keep
each tile's scores in on-chip memory with an online softmax, and never write the matrix: memory
grows with ``seq``, and time is set by the tensor cores, not by memory traffic.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import measure
from .hardware import Hardware, RecipeError

# Notebook 03's committed cells call it from here; it lives in measure (notebook 02 uses it too).
matmul_peak = measure.matmul_peak

BACKENDS = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention written out: ``softmax(q k^T / sqrt(d) + mask) v`` (the reference)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal ``scaled_dot_product_attention`` forced onto one backend."""
    with sdpa_kernel(BACKENDS[backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_package(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention from the flash-attn package (it takes ``[batch, seq, heads, dim]``)."""
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return out.transpose(1, 2)


def kernels(hw: Hardware) -> dict:
    """Every attention implementation that runs here: eager, each available SDPA backend, flash-attn."""
    found = {"eager": eager_attention}
    for name in ("math", "efficient", "flash", "cudnn"):
        if name in hw.sdpa_backends:
            found[f"sdpa {name}"] = lambda q, k, v, name=name: sdpa(q, k, v, name)
    if hw.cuda and flash_attn_installed():
        found["flash-attn package"] = flash_attn_package
    return found


def choose_backend(requested: str, hw: Hardware) -> str:
    """``requested`` if this device runs it; otherwise the fastest backend it has, with a warning."""
    if requested not in BACKENDS:
        raise RecipeError(f"unknown SDPA backend {requested!r}; choose from {sorted(BACKENDS)}")
    if requested in hw.sdpa_backends:
        return requested
    fallback = next(b for b in ("flash", "cudnn", "efficient", "math") if b in hw.sdpa_backends)
    reason = ("it needs an Ampere or newer GPU (compute capability >= 8.0) and fp16/bf16 inputs"
              if requested == "flash" else "this device/build has no kernel for it")
    warnings.warn(f"SDPA backend {requested!r} does not run on {hw.name}: {reason}; using {fallback!r}.",
                  stacklevel=2)
    return fallback


def random_qkv(batch: int, heads: int, seq: int, head_dim: int, device: torch.device, dtype: torch.dtype,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=gen)
                 for _ in range(3))


def max_error_vs_eager(fn, q, k, v) -> float:
    """Largest absolute difference between ``fn`` and eager attention computed in fp32."""
    reference = eager_attention(q.float(), k.float(), v.float())
    return (fn(q, k, v).float() - reference).abs().max().item()


def causal_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention: two matmuls of ``2·s²·d`` each per head, half of them masked."""
    return 4 * batch * heads * seq * seq * head_dim / 2


def time_and_memory(fn, q, k, v, device: torch.device, repeats: int = 10) -> dict:
    """Median forward time and peak memory of one attention call (OOM is a result)."""
    measure.free_memory()
    try:
        with torch.no_grad():
            seconds = measure.median_seconds(lambda: fn(q, k, v), device, repeats=repeats, warmup=2)
            with measure.peak_memory(device, baseline=(q, k, v)) as peak:
                fn(q, k, v)
    except Exception as error:  # noqa: BLE001 - only OOM becomes a result
        if not measure.is_oom(error):
            raise
        measure.free_memory()
        return {"oom": True}
    return {"oom": False, "seconds": seconds, "peak_bytes": peak["peak"]}
