"""Data parallelism with PyTorch's own engines (DDP, FSDP2) inside a torchrun-launched worker, and its memory.

Inside a ``torchrun`` worker: ``setup()``, ``LossModel(model)``, then ``shard_fsdp2``, ``wrap_ddp``
or ``zero.wrap_deepspeed``, ``train_step`` per optimizer step, ``report_result(...)``, ``cleanup()``.
A notebook starts the workers with ``launcher.launch``. The rank's memory is read with
``param_bytes`` / ``optimizer_bytes``, split by ``memory_breakdown`` and predicted by
``predicted_state_bytes``.

Loss normalisation matches ``train.accumulate_gradients`` over the *global* batch: every rank
divides its summed loss by the target tokens of all ranks (one all-reduce of a count), and the
gradients are then *summed* over ranks, not averaged (FSDP2's and DDP's default is the mean). So
the gradient is sum_over_ranks(sum_local / total) = sum_all / total, the single-process gradient,
whatever number of real tokens each rank holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..core import losses, train
from .context import all_ranks_sum
from .ddp import _ddp_sync


class StepResult(NamedTuple):
    loss: float
    grad_norm: float | None


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
    if total_targets == 0:
        raise ValueError("no target tokens in this step: every label is -100")
    accelerator = getattr(model, "_recipes_accelerator", None)
    # DeepSpeed's backward divides the loss by its accumulation steps and averages gradients over
    # ranks; scaling by both gives the same summed, globally token-normalised gradient as the others.
    scale = len(micro_batches) * (dist.get_world_size() if dist.is_initialized() else 1) if accelerator else 1
    # Summed on the device: a .item() per micro-batch would stall the host until the GPU catches up,
    # leaving the GPU idle while the next forward's kernels (and FSDP2's prefetching all-gathers) are queued.
    local_loss = torch.zeros((), device=device, dtype=torch.float32)
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        last = i == len(micro_batches) - 1
        if accelerator is not None:
            with train.autocast(device, autocast_dtype):
                loss = model(**mb) / total_targets
            # The engine itself, not accelerator.backward (which also steps): the boundary is set
            # explicitly on every micro-batch, and the gradients can be measured before the step.
            engine = accelerator.deepspeed_engine_wrapped.engine
            engine.set_gradient_accumulation_boundary(is_boundary=last)
            engine.backward(loss * scale)
        else:
            with _ddp_sync(model, last):
                with train.autocast(device, autocast_dtype):
                    loss = model(**mb) / total_targets
                loss.backward()
        local_loss += loss.detach().float()
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
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
            grad_norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepResult(all_ranks_sum(local_loss.item(), device), grad_norm)


