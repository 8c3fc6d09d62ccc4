"""The loss step, side by side: full logits, our chunked fused loss, and the maintained fused kernels.

One loss forward + backward over ``[tokens, hidden]`` hidden states and a ``[vocab, hidden]`` head:
its peak memory above those inputs (the head's gradient, which training needs either way, included)
and its time, the median of several calls with their spread. A library that is not installed, or has
no kernel for this device, gives a row that says so instead of a number.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core import losses
from ..core.errors import RecipeError
from ..core.hardware import Hardware
from . import memory, timing

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "full logits (fp32 cross-entropy)": lambda h, w, y: losses.cross_entropy_sum(h @ w.T, y),
    "chunked, ours (1024 tokens)": losses.linear_cross_entropy,
    "Liger Kernel fused linear CE": losses.liger_linear_cross_entropy,
    "Cut Cross-Entropy (Apple)": losses.cce_linear_cross_entropy,
}


def _inputs(hw: Hardware, tokens: int, vocab: int, hidden: int):
    gen = torch.Generator(device=hw.device).manual_seed(0)
    h = torch.randn(1, tokens, hidden, device=hw.device, dtype=hw.model_dtype, generator=gen).requires_grad_()
    w = torch.randn(vocab, hidden, device=hw.device, dtype=hw.model_dtype, generator=gen) * 0.02
    y = torch.randint(vocab, (1, tokens), device=hw.device, generator=gen)
    return h, w.requires_grad_(), y


def loss_step(hw: Hardware, tokens: int, vocab: int, hidden: int, name: str, repeats: int = 5) -> dict:
    """One loss implementation of ``LOSSES``: ``{"loss", "peak_bytes", "timing"}``, or ``{"loss",
    "unavailable": why}`` when its library is missing or has no kernel here. Running out of memory
    is a row too (``oom``)."""
    row = {"loss": name, "peak_bytes": None, "timing": None}
    h, w, y = _inputs(hw, tokens, vocab, hidden)

    def step():
        h.grad = w.grad = None
        LOSSES[name](h, w, y).backward()

    def measure():
        with memory.peak_memory(hw.device, [h, w, y]) as peak:
            step()  # also the warm-up (Triton kernels compile on their first call)
        return {"oom": False, "peak_bytes": peak["peak"] - memory.tensor_bytes([h, w, y]),
                "timing": timing.time_it(step, hw.device, repeats, warmup=1)}

    try:
        row |= memory.oom_as_result(measure)
    except RecipeError as why:
        row["unavailable"] = str(why)
    return row  # the inputs go with this frame; the next measurement frees the cache first


def loss_step_peak(hw: Hardware, tokens: int, vocab: int, hidden: int, chunked: bool) -> int:
    """Peak bytes above the inputs of the full-logits loss step, or of our chunked one."""
    names = list(LOSSES)
    return loss_step(hw, tokens, vocab, hidden, names[1] if chunked else names[0], repeats=1)["peak_bytes"]
