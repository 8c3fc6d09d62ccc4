"""DDP: replicate the model, sum gradients across ranks (one all-reduce per optimizer step).

Wrapped as PyTorch's docs advise for speed and memory (``ddp_kwargs``):

- ``gradient_as_bucket_view=True``: each ``.grad`` is a view into DDP's all-reduce bucket, so the
  gradients are held once, not twice (the default copies them from ``.grad`` into the buckets). The
  views last only while the gradients are zeroed in place, not set to None (``grads_are_bucket_views``
  tells ``step.train_step`` which one to do): a ``.grad`` set to None comes back in the next backward
  as a fresh tensor, a second copy until the last micro-batch's reduction copies it into the bucket.
- ``static_graph=True`` where it is valid: the same parameters are used, in the same order, in
  every iteration (a causal LM's training step has no control flow that changes between steps), so
  DDP skips its per-iteration graph search and supports reentrant activation checkpointing. It is
  not valid with gradient accumulation through ``no_sync`` (``sync_on_last``): in PyTorch up to at
  least 2.13 the first backward under ``no_sync`` fails an internal assert, and with that assert
  lifted DDP stops all-reducing from the second step on (pytorch/pytorch#143580, #187732;
  huggingface/accelerate#3679). ``ddp_kwargs`` sets it only for steps known to have one micro-batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .context import Context


def ddp_kwargs(micro_batches_per_step: int | None) -> dict:
    """DDP's options for steps of ``micro_batches_per_step`` micro-batches per rank (None: not known, so
    no static graph; module docstring)."""
    return {"gradient_as_bucket_view": True, "static_graph": micro_batches_per_step == 1}


def _sum_allreduce_hook(process_group, bucket):
    return dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future().then(
        lambda fut: fut.value()[0])


def wrap_ddp(model: torch.nn.Module, ctx: Context, micro_batches_per_step: int | None = None,
             **overrides) -> torch.nn.Module:
    """Replicate the model on every rank with DDP, gradients summed over ranks (see module docstring).

    ``overrides`` replace ``ddp_kwargs``' options (``gradient_as_bucket_view=False``, DDP's default,
    for a comparison).
    """
    kwargs = ddp_kwargs(micro_batches_per_step) | overrides
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **kwargs)
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return ddp


def grads_are_bucket_views(model: torch.nn.Module) -> bool:
    """True for a DDP model whose ``.grad`` are views into its buckets: zero them in place, not to None."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel) and model.gradient_as_bucket_view


def settings(model: torch.nn.Module) -> dict | None:
    """The options a DDP model runs with (``ddp_kwargs``' keys, read back from it); None for other models."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    return {"gradient_as_bucket_view": model.gradient_as_bucket_view, "static_graph": model.static_graph}


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
