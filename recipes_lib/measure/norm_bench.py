"""Time norm kernels and a model's training step, forward + backward: a ``timing.Timing`` (median, range)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core import train
from . import timing


def forward_backward_timing(fn: Callable, rows: int, hidden: int, device: torch.device, dtype: torch.dtype,
                            repeats: int = 20, warmup: int = 3) -> timing.Timing:
    """Time of ``fn``'s forward and backward on ``[rows, hidden]`` (gradients for x and weight)."""
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(rows, hidden, device=device, dtype=dtype)

    def step():
        x.grad = w.grad = b.grad = None
        fn(x, w, b).backward(grad)

    return timing.time_it(step, device, repeats, warmup)


def bytes_moved(rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Least bytes a fused forward + backward must move: read x, write y; read x and dy, write dx."""
    return 5 * rows * hidden * torch.tensor([], dtype=dtype).element_size()


def train_step_timing(model: torch.nn.Module, batch: int, seq_len: int, repeats: int = 5, warmup: int = 2,
                      autocast_dtype: torch.dtype | None = None) -> timing.Timing:
    """Time of one forward + backward of ``model`` on random tokens (the end-to-end cost of its norms):
    median and min-max.

    The step is the training loop's own ``accumulate_gradients`` (full logits, summed cross-entropy),
    without the optimizer update, so the norms' share of the step is not diluted.
    """
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len),
                        generator=torch.Generator().manual_seed(0))
    micro_batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    model.train()

    def step():
        train.accumulate_gradients(model, [micro_batch], autocast_dtype, fused_head=False,
                                   total_targets=batch * (seq_len - 1))
        model.zero_grad(set_to_none=True)

    return timing.time_it(step, device, repeats, warmup)
