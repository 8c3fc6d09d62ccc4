"""Attention kernels by name: eager (the reference), each SDPA backend, FlexAttention, flash-attn.

``attend(name, q, k, v)`` runs one of ``IMPLEMENTATIONS``; ``available(hw)`` lists those that run
here; ``max_error_vs_eager`` checks one against eager attention in fp32.
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

IMPLEMENTATIONS = ("eager", *(f"sdpa-{b}" for b in SDPA_BACKENDS), "flex-causal", "flex-sliding",
                   "flash-attn")


@functools.cache
def flex_kernel(compiled: bool):
    """FlexAttention itself, compiled (one fused kernel) or eager (materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled:
        return flex_attention
    raise_recompile_limit()  # one compiled kernel per (length, mask); eager Flex would materialise the scores
    return torch.compile(flex_attention, dynamic=False)


def compile_flex(q: torch.Tensor, compiled: bool | None) -> bool:
    """Whether to compile FlexAttention for ``q``: the caller's choice, else on a GPU."""
    return q.device.type == "cuda" if compiled is None else compiled


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
         compiled: bool | None = None, sinks: int = 0) -> torch.Tensor:
    """FlexAttention over ``[batch, heads, seq, head_dim]``, causal or sliding-window (GQA allowed).

    Args:
        compiled: compile the kernel (default on a GPU). Compiled, FlexAttention is one fused kernel
            that skips fully masked blocks; eager, it materialises the scores: fine for short rows
            and CPU checks, hopeless at long lengths.
        sinks: with a window, the first ``sinks`` tokens stay visible to every query.
    """
    mask = block_mask(q.shape[-2], effective_window(window, q.shape[-2]), str(q.device), sinks)
    kernel = flex_kernel(compile_flex(q, compiled))
    return kernel(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Textbook causal (or windowed) attention: the ``[seq, seq]`` scores and probabilities materialised."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~dense_mask(q.shape[-2], window, q.device), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa(q, k, v, backend: str, window: int | None = None) -> torch.Tensor:
    """SDPA with one backend forced: causal through ``is_causal`` (the flash path), a window as dense mask."""
    if backend not in SDPA_BACKENDS:
        raise RecipeError(f"unknown SDPA backend {backend!r}; choose from {sorted(SDPA_BACKENDS)}")
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        if window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(q.shape[-2], window, q.device))


def flash_attn_installed() -> bool:
    """True if the flash-attn package imports."""
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


def attend(implementation: str, q, k, v, window: int | None = None,
           compiled: bool | None = None) -> torch.Tensor:
    """One call by name: ``eager``, ``sdpa-<backend>``, ``flex-causal``/``-sliding``, ``flash-attn``.

    ``compiled`` applies to FlexAttention (see ``flex``); ``flash-attn`` is causal only.
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
    if implementation == "flash-attn":
        if window is not None:
            raise RecipeError("flash-attn is called causal only here; for a window use flex-sliding")
        return flash_attn_package(q, k, v)
    raise RecipeError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")


def available(hw: Hardware) -> list[str]:
    """Implementations that run on ``hw``: eager, its SDPA backends (fastest first), Flex, flash-attn."""
    sdpa_names = [f"sdpa-{b}" for b in SDPA_BACKENDS if b in hw.sdpa_backends]
    flash = ["flash-attn"] if hw.cuda and flash_attn_installed() else []
    return ["eager", *sdpa_names, "flex-causal", "flex-sliding", *flash]


def choose_backend(requested: str, hw: Hardware) -> str:
    """``requested`` if this device runs it; otherwise the fastest backend it has, with a warning."""
    if requested not in SDPA_BACKENDS:
        raise RecipeError(f"unknown SDPA backend {requested!r}; choose from {sorted(SDPA_BACKENDS)}")
    if requested in hw.sdpa_backends:
        return requested
    fallback = next(b for b in SDPA_BACKENDS if b in hw.sdpa_backends)  # the table is ordered fastest first
    reason = ("it needs an Ampere or newer GPU (compute capability >= 8.0) and fp16/bf16 inputs"
              if requested == "flash" else "this device/build has no kernel for it")
    warnings.warn(f"SDPA backend {requested!r} does not run on {hw.name}: {reason}; using {fallback!r}.",
                  stacklevel=2)
    return fallback


def random_qkv(batch: int, heads: int, seq: int, head_dim: int, device: torch.device, dtype: torch.dtype,
               seed: int = 0, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value ``[batch, heads, seq, head_dim]`` drawn from a seeded normal distribution."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=gen,
                             requires_grad=requires_grad) for _ in range(3))


def max_error_vs_eager(implementation: str, q, k, v, window: int | None = None) -> float:
    """Largest absolute difference between ``implementation`` and eager attention computed in fp32."""
    with torch.no_grad():
        reference = eager(q.float(), k.float(), v.float(), window)
        return (attend(implementation, q, k, v, window).float() - reference).abs().max().item()
