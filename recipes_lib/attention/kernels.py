"""Attention kernels by name: eager (the reference), each SDPA backend, FlexAttention, flash-attn.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from ..core.errors import RecipeError
from ..core.hardware import SDPA_BACKENDS, Hardware, raise_recompile_limit
from .masks import block_mask, dense_mask, effective_window

IMPLEMENTATIONS = ("eager", *(f"sdpa-{b}" for b in SDPA_BACKENDS), "flex-causal", "flex-sliding")


@functools.cache
def _flex(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled:
        return flex_attention
    raise_recompile_limit()  # one compiled kernel per (length, mask); eager Flex would materialise the scores
    return torch.compile(flex_attention, dynamic=False)


def _compile_for(q: torch.Tensor, compiled: bool | None) -> bool:
    """Whether to compile FlexAttention for ``q``: the caller's choice, else on a GPU."""
    return q.device.type == "cuda" if compiled is None else compiled


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
         compiled: bool | None = None, sinks: int = 0) -> torch.Tensor:
    """FlexAttention over ``[batch, heads, seq, head_dim]`` with a causal or sliding-window mask (GQA allowed).

    Args:
        compiled: compile the kernel (default on a GPU). Compiled, FlexAttention is one fused kernel
            that skips fully masked blocks; eager, it materialises the scores: fine for short rows
            and CPU checks, hopeless at long lengths.
        sinks: with a window, the first ``sinks`` tokens stay visible to every query.
    """
    mask = block_mask(q.shape[-2], effective_window(window, q.shape[-2]), str(q.device), sinks)
    return _flex(_compile_for(q, compiled))(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Textbook causal (or windowed) attention: the ``[seq, seq]`` scores and probabilities are materialised."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~dense_mask(q.shape[-2], window, q.device), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa(q, k, v, backend: str, window: int | None = None) -> torch.Tensor:
    """SDPA with one backend forced: causal through ``is_causal`` (the flash path), a window as a dense mask."""
    if backend not in SDPA_BACKENDS:
        raise RecipeError(f"unknown SDPA backend {backend!r}; choose from {sorted(SDPA_BACKENDS)}")
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        if window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(q.shape[-2], window, q.device))


def attend(implementation: str, q, k, v, window: int | None = None, compiled: bool | None = None) -> torch.Tensor:
    """One attention call by name: ``eager``, ``sdpa-<backend>``, ``flex-causal`` or ``flex-sliding``.

    ``compiled`` applies to FlexAttention (see ``flex``).
    """
    if implementation == "eager":
        return eager(q, k, v, window)
    if implementation.startswith("sdpa-"):
        return sdpa(q, k, v, implementation.removeprefix("sdpa-"), window)
    if implementation == "flex-causal":
        return flex(q, k, v, None, compiled)
    if implementation == "flex-sliding":
        if window is None:
            raise RecipeError("flex-sliding needs a window")
        return flex(q, k, v, window, compiled)
    raise RecipeError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")


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
    found = {"eager": eager}
    for name in ("math", "efficient", "flash", "cudnn"):
        if name in hw.sdpa_backends:
            found[f"sdpa {name}"] = lambda q, k, v, name=name: sdpa(q, k, v, name)
    if hw.cuda and flash_attn_installed():
        found["flash-attn package"] = flash_attn_package
    return found


def choose_backend(requested: str, hw: Hardware) -> str:
    """``requested`` if this device runs it; otherwise the fastest backend it has, with a warning."""
    if requested not in SDPA_BACKENDS:
        raise RecipeError(f"unknown SDPA backend {requested!r}; choose from {sorted(SDPA_BACKENDS)}")
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
    reference = eager(q.float(), k.float(), v.float())
    return (fn(q, k, v).float() - reference).abs().max().item()
