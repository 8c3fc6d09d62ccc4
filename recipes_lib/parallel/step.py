"""One data-parallel optimizer step through the one training loop (``train.accumulate_gradients``).

Inside a ``torchrun`` worker: ``context.setup()``, ``LossModel(model)``, then ``fsdp2.shard_fsdp2``,
``ddp.wrap_ddp`` or ``zero.wrap_deepspeed``, ``train_step`` per optimizer step,
``context.report_result(...)``, ``context.cleanup()``. ``parallel.run`` does all of it for the
training script.

Loss normalisation matches ``train.accumulate_gradients`` over the *global* batch: every rank
divides its summed loss by the target tokens of all ranks (one all-reduce of a count), and the
gradients are then *summed* over ranks, not averaged (FSDP2's and DDP's default is the mean). So
the gradient is sum_over_ranks(sum_local / total) = sum_all / total, the single-process gradient,
whatever number of real tokens each rank holds.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..core import losses, train
from . import zero
from .context import all_ranks_sum
from .ddp import grads_are_bucket_views, sync_on_last


class StepResult(NamedTuple):
    loss: float
    grad_norm: float | None


def _wrapped_loss(model: torch.nn.Module, micro_batch: dict) -> torch.Tensor:
    """The summed loss a ``LossModel`` (bare or wrapped) computes in its forward."""
    return model(**micro_batch)


def deepspeed_backward(engine, micro_batches: int, scale: float) -> Callable[[torch.Tensor], None]:
    """``loss -> None`` for ``accumulate_gradients``: DeepSpeed's engine backward of ``loss * scale``,
    with the accumulation boundary set on every micro-batch (the last one is the boundary)."""
    calls = itertools.count(1)

    def backward(loss: torch.Tensor) -> None:
        # The engine itself, not accelerator.backward (which also steps): the boundary is set
        # explicitly on every micro-batch, and the gradients can be measured before the step.
        engine.set_gradient_accumulation_boundary(is_boundary=next(calls) == micro_batches)
        engine.backward(loss * scale)
    return backward


def train_step(model: torch.nn.Module, optimizer, micro_batches: Sequence[dict],
               device: torch.device, autocast_dtype: torch.dtype | None = None,
               max_grad_norm: float | None = 1.0, after_backward=None) -> StepResult:
    """One optimizer step over this rank's micro-batches: the global batch's loss per target token, and
    the global gradient's norm before clipping (None without clipping).

    ``model`` is a ``LossModel``, bare or wrapped by FSDP2, DDP or DeepSpeed (``wrap_deepspeed``).
    ``after_backward()``, if given, is called after the last backward, before the optimizer step
    (where the gradients are alive and the activations gone: the memory breakdown reads it).
    """
    local_targets = sum(losses.count_targets(mb["labels"]) for mb in micro_batches)
    total_targets = int(all_ranks_sum(local_targets, device, torch.int64))
    accelerator = zero.accelerator_of(model)
    backward = None
    if accelerator is not None:
        # DeepSpeed's backward divides the loss by its accumulation steps and averages gradients over
        # ranks; scaling by both gives the same summed, globally token-normalised gradient as the others.
        scale = len(micro_batches) * (dist.get_world_size() if dist.is_initialized() else 1)
        backward = deepspeed_backward(accelerator.deepspeed_engine_wrapped.engine, len(micro_batches), scale)
    local_loss = train.accumulate_gradients(
        model, micro_batches, autocast_dtype, loss_fn=_wrapped_loss, total_targets=total_targets,
        backward=backward, micro_context=functools.partial(sync_on_last, model), device=device)
    if after_backward is not None:
        after_backward()
    grad_norm = None
    if accelerator is not None:  # DeepSpeed clips, steps and zeroes the gradients itself
        accelerator.deepspeed_engine_wrapped.engine.step()
        norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
    else:
        if max_grad_norm is not None:
            # With FSDP2 the gradients are DTensor shards and clip_grad_norm_ reduces the norm across ranks.
            trainable = [p for p in model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            grad_norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
        optimizer.step()
        # DDP's bucket views are zeroed in place: set to None, they would come back as fresh tensors
        # (a second copy of the gradients) in the next step's accumulating micro-batches.
        optimizer.zero_grad(set_to_none=not grads_are_bucket_views(model))
    return StepResult(all_ranks_sum(local_loss.item(), device), grad_norm)
