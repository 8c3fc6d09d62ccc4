"""Attention masks: causal and sliding-window (with attention sinks), as FlexAttention block masks
and as dense boolean masks.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..core.errors import RecipeError


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
                      f"attention: using the causal mask (pick a window below {seq_len} to save work)",
                      stacklevel=3)
        return None
    return window


def causal(b, h, q_idx, kv_idx):
    """FlexAttention mask_mod: a query sees keys at or before it."""
    return q_idx >= kv_idx


def sliding_window(window: int, sinks: int = 0):
    """FlexAttention mask_mod: a query sees itself, the ``window - 1`` keys before it and the ``sinks`` first.

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
