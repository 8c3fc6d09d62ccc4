"""fp16 loss scaling, the path of GPUs without bf16 (a T4): the scaler, and which steps it skipped.

fp16 holds values up to 65,504 and loses gradients below about 6e-8, so the loss is multiplied by a
scale (2**16 to start) before the backward pass and the gradients divided by it before the step.
``torch.amp.GradScaler`` skips a step whose gradients hold inf/NaN and halves the scale; it grows the
scale again after 2,000 clean steps. A skip is visible only as the scale falling, so ``StepWatch``
reads the scale before each step and compares it afterwards. Two cases need care:

- at a scale of 0 (2**16 halved 150 times) the scale no longer falls, but every step is still
  skipped: counted as skipped;
- a step that overflows at a scale of 1 or less overflows with no enlarging at all: the fp16 forward or
  backward itself makes inf/NaN, and training has likely stalled. ``StepWatch`` warns once, as the scale
  falls below 1, saying what to change.
"""

from __future__ import annotations

import warnings

import torch


def scaler_for(device: torch.device, autocast_dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast on ``device``; None for bf16, fp32 or no autocast (nothing to scale)."""
    return torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None


class StepWatch:
    """Call ``before()`` ahead of each optimizer step and ``skipped(index)`` after it."""

    def __init__(self, scaler: torch.amp.GradScaler | None):
        self.scaler, self.scale = scaler, None

    def before(self) -> None:
        if self.scaler is not None:
            self.scale = self.scaler.get_scale()  # a host sync, on the fp16 path only

    def skipped(self, index: int) -> bool:
        """Whether the scaler skipped the step just taken (step ``index``); warns once when fp16 overflows
        at a scale of 1 or less."""
        if self.scaler is None:
            return False
        now = self.scaler.get_scale()
        if self.scale >= 1.0 > now:
            warnings.warn(f"fp16 loss scaling: step {index} overflowed at a scale of {self.scale:g}, which "
                          "no longer enlarges the loss, so the fp16 forward or backward itself makes inf/NaN "
                          "and training has likely stalled (the scale now falls below 1). Lower the learning "
                          "rate, train in bf16 where the GPU has it, or pass autocast_dtype=None (fp32).",
                          RuntimeWarning, stacklevel=3)
        return now < self.scale or self.scale == 0.0
