"""DDP: replicate the model, sum gradients across ranks (one all-reduce per optimizer step).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .context import Context


def _sum_allreduce_hook(process_group, bucket):
    return dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future().then(
        lambda fut: fut.value()[0])


def wrap_ddp(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """Replicate the model on every rank with DDP, gradients summed over ranks (see module docstring)."""
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return ddp


def sync_on_last(model: torch.nn.Module, last: bool):
    """DDP: all-reduce only in the step's last backward (``no_sync`` before it); nothing for other models.

    DDP's reduction writes into ``.grad`` itself, so a summed reduction after every micro-batch would
    add the earlier micro-batches' already reduced gradients once per rank again. (FSDP2
    reduce-scatters each micro-batch into separate sharded gradients, which is correct and keeps only
    a shard of the gradients between them.)
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()
