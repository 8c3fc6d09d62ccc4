"""Attention for long sequences: SDPA kernels, FlexAttention block masks, sliding windows.

- ``attend`` runs one attention call with a named implementation (eager, an SDPA backend, or
  FlexAttention with a causal or sliding-window block mask), so the notebook can time each one
  against sequence length.
- ``use_sliding_window(model, window)`` makes any transformers model attend through a compiled
  FlexAttention sliding window: each query sees itself and the ``window - 1`` tokens before it.
  Blocks of the mask that are all masked out are skipped, so the cost grows as ``L * window``
  instead of ``L**2 / 2``.
- ``as_mistral`` loads a Llama checkpoint as Mistral (the same weights plus the architecture's own
  ``sliding_window``), the reference our FlexAttention window is checked against.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .hardware import RecipeError, raise_recompile_limit

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
IMPLEMENTATIONS = ("eager", *(f"sdpa-{b}" for b in SDPA_BACKENDS), "flex-causal", "flex-sliding")


def check_window(window) -> None:
    """Refuse a window that is not a positive whole number of tokens."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise RecipeError(f"window={window!r}: a sliding window is a positive whole number of tokens")


def effective_window(window: int | None, seq_len: int) -> int | None:
    """``window``, or None (plain causal) with a warning when the window covers the whole sequence."""
    if window is None:
        return None
    check_window(window)
    if window >= seq_len:
        warnings.warn(f"window={window} covers the whole sequence of {seq_len} tokens, so it is plain causal "
                      f"attention: using the causal mask (pick a window below {seq_len} to save work)", stacklevel=3)
        return None
    return window


def causal(b, h, q_idx, kv_idx):
    """FlexAttention mask_mod: a query sees keys at or before it."""
    return q_idx >= kv_idx


def sliding_window(window: int, sinks: int = 0):
    """FlexAttention mask_mod: a query sees itself, the ``window - 1`` keys before it, and the first ``sinks`` keys.

    The sinks are StreamingLLM's attention sinks: a model trained with full attention parks much of
    its attention on the first tokens, and loses its footing when a window hides them.
    """
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))
    mask_mod.__name__ = f"sliding_window_{window}_sinks_{sinks}"
    return mask_mod


def dense_mask(seq_len: int, window: int | None, device=None, sinks: int = 0) -> torch.Tensor:
    """The boolean ``[seq_len, seq_len]`` mask (True = attend) equivalent to the block masks."""
    q = torch.arange(seq_len, device=device)[:, None]
    k = torch.arange(seq_len, device=device)[None, :]
    mask = q >= k
    return mask & ((q - k < window) | (k < sinks)) if window is not None else mask


@functools.lru_cache(maxsize=32)
def block_mask(seq_len: int, window: int | None, device: str, sinks: int = 0):
    """A FlexAttention block mask for causal (``window=None``) or sliding-window attention (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask
    mask_mod = causal if window is None else sliding_window(window, sinks)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


@functools.lru_cache(maxsize=None)
def _flex(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled:
        return flex_attention
    raise_recompile_limit()  # one compiled kernel per (length, mask); eager Flex would materialise the scores
    return torch.compile(flex_attention, dynamic=False)


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


def attention_flops(seq_len: int, heads: int, head_dim: int, window: int | None = None,
                    backward: bool = False) -> float:
    """Matmul FLOPs of causal (or windowed) attention: 4 * pairs * head_dim per head; backward costs 2.5x."""
    window = None if window is None or window >= seq_len else window
    pairs = seq_len * (seq_len + 1) / 2 if window is None else seq_len * window - window * (window - 1) / 2
    forward = 4 * pairs * head_dim * heads
    return forward * (3.5 if backward else 1.0)


def _sliding_attention_forward(window: int, compiled: bool | None, sinks: int):
    def forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        if query.shape[-2] != key.shape[-2]:
            raise RecipeError("the FlexAttention sliding window here scores whole sequences (training, evaluation); "
                              "for generation with a KV cache use the architecture's own sliding_window "
                              "(attention.as_mistral)")
        if dropout or kwargs.get("softcap") or kwargs.get("sinks") is not None:
            raise RecipeError("the sliding-window attention has no attention dropout, logit softcapping or "
                              "learned sinks; use the model's own attention for this architecture")
        short = window >= query.shape[-2]  # a row no longer than the window: plain causal
        out = _flex(_compile_for(query, compiled))(
            query, key, value, block_mask=block_mask(query.shape[-2], None if short else window, str(query.device),
                                                     sinks),
            scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    return forward


def _compile_for(q: torch.Tensor, compiled: bool | None) -> bool:
    """Whether to compile FlexAttention for ``q``: the caller's choice, else on a GPU."""
    return q.device.type == "cuda" if compiled is None else compiled


def _check_rows(module, args, kwargs):
    """Refuse what the windowed attention cannot see: left padding and packed rows."""
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and mask.dim() == 2 and not bool((mask.cummin(dim=-1).values == mask).all()):
        raise RecipeError("the sliding-window attention takes unpadded or right-padded rows: this attention_mask "
                          "has padding before real tokens (left padding). Pad on the right, or pass no mask.")
    if positions is not None:
        expected = torch.arange(positions.shape[-1], device=positions.device)
        if not bool((positions == expected).all()):
            raise RecipeError("the sliding-window attention does not separate packed documents: pass rows whose "
                              "position_ids are 0, 1, 2, ... (or none)")


def use_sliding_window(model, window: int, compiled: bool | None = None, sinks: int = 0):
    """Make ``model`` attend through a FlexAttention sliding window of ``window`` tokens (in place).

    Args:
        compiled: see ``flex``; pass False when row lengths vary a lot (each length compiles anew).
        sinks: keep the first ``sinks`` tokens visible to every query (StreamingLLM's attention sinks).
    """
    from transformers import AttentionInterface
    check_window(window)
    name = f"recipes_sliding_{window}_sinks_{sinks}_{'auto' if compiled is None else int(compiled)}"
    AttentionInterface.register(name, _sliding_attention_forward(window, compiled, sinks))
    model.set_attn_implementation(name)
    if not getattr(model, "_recipes_rows_checked", False):  # transformers hands custom attention no mask
        model.register_forward_pre_hook(_check_rows, with_kwargs=True)
        model._recipes_rows_checked = True
    return model


def as_mistral(name: str, sliding_window: int | None, **kwargs):
    """Load a Llama checkpoint as Mistral, whose architecture has its own ``sliding_window``.

    Mistral is Llama plus a sliding window, with the same parameter names, so the weights load as
    they are. transformers builds the windowed mask itself (for SDPA, eager, flex and generation).
    """
    from transformers import AutoConfig, MistralConfig, MistralForCausalLM

    from .models import resolve
    path = resolve(name)
    llama = AutoConfig.from_pretrained(path)
    if llama.model_type not in ("llama", "mistral"):
        raise RecipeError(f"as_mistral loads Llama-architecture checkpoints; {name!r} is {llama.model_type!r}")
    fields = {k: v for k, v in llama.to_dict().items() if k not in ("model_type", "architectures", "sliding_window")}
    config = MistralConfig(**fields, sliding_window=sliding_window)
    return MistralForCausalLM.from_pretrained(path, config=config, **kwargs)


def time_attention(implementation: str, seq_len: int, heads: int, head_dim: int, hw, window: int | None = None,
                   backward: bool = True, repeats: int = 5) -> dict:
    """Median time and peak extra memory of one attention call (forward, or forward+backward), or OOM.

    Inputs are ``[1, heads, seq_len, head_dim]`` in the device's weight dtype; the peak excludes them.
    FlexAttention is timed compiled (on CPU too, where it has no backward); on CPU its peak is not
    measured (None): the allocation tracker cannot run inside it.
    """
    from . import measure
    row = {"implementation": implementation, "seq_len": seq_len, "window": window, "oom": False}
    measure.free_memory()
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

        seconds = measure.median_seconds(call, hw.device, repeats=repeats, warmup=1)
        inputs = [t for t in (q, k, v, grad) if t is not None]
        peak_bytes = None
        if hw.cuda or not implementation.startswith("flex"):  # the CPU tracker cannot see inside FlexAttention
            with measure.peak_memory(hw.device, inputs) as peak:
                call()
            peak_bytes = peak["peak"] - measure.tensor_bytes(inputs)
        flops = attention_flops(seq_len, heads, head_dim, window if implementation != "flex-causal" else None,
                                backward)
        row.update(seconds=seconds, peak_bytes=peak_bytes,
                   tflops=flops / seconds / 1e12)
    except Exception as error:  # noqa: BLE001 - only OOM becomes a result
        if not measure.is_oom(error):
            raise
        row["oom"] = True
    finally:
        q = k = v = grad = None
        measure.free_memory()
    return row
