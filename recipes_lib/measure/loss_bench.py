"""The loss step's peak memory: full logits + cross-entropy against the chunked fused loss."""

from __future__ import annotations

import torch

from ..core import losses
from ..core.hardware import Hardware
from . import memory


def loss_step_peak(hw: Hardware, tokens: int, vocab: int, hidden: int, chunked: bool) -> int:
    """Peak bytes of one loss forward + backward above its inputs (hidden states, LM head, labels).

    Inputs are random, in the device's weight dtype; the head's gradient, which training needs either
    way, counts in both. ``chunked`` uses ``losses.linear_cross_entropy`` (no ``[tokens, vocab]`` logits).
    """
    gen = torch.Generator(device=hw.device).manual_seed(0)
    h = torch.randn(1, tokens, hidden, device=hw.device, dtype=hw.model_dtype, generator=gen).requires_grad_()
    w = torch.randn(vocab, hidden, device=hw.device, dtype=hw.model_dtype, generator=gen) * 0.02
    w.requires_grad_()
    y = torch.randint(vocab, (1, tokens), device=hw.device, generator=gen)
    memory.free_memory()
    with memory.peak_memory(hw.device, [h, w, y]) as peak:
        loss = losses.linear_cross_entropy(h, w, y) if chunked else losses.cross_entropy_sum(h @ w.T, y)
        loss.backward()
    inputs = memory.tensor_bytes([h, w, y])
    del h, w, y, loss
    memory.free_memory()
    return peak["peak"] - inputs
