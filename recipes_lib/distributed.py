"""Data parallelism with PyTorch's own engines (DDP, FSDP2), inside a torchrun-launched worker.

Inside a ``torchrun`` worker: ``setup()``, ``shard_fsdp2(model)`` or ``wrap_ddp(model)``, then
``train_step`` per optimizer step, ``report_result(...)``, ``cleanup()``. A notebook starts the
workers with ``launcher.launch``.

Loss normalisation matches ``train.accumulate_gradients`` over the *global* batch: every rank
divides its summed loss by the target tokens of all ranks (one all-reduce of a count), and the
gradients are then *summed* over ranks, not averaged (FSDP2's and DDP's default is the mean). So
the gradient is sum_over_ranks(sum_local / total) = sum_all / total, the single-process gradient,
whatever number of real tokens each rank holds.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from . import launcher, losses, train
from .hardware import RecipeError

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """Where this worker sits: its rank among ``world_size`` processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(backend: str | None = None) -> Context:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise RecipeError(f"no torchrun environment ({', '.join(missing)} unset): start this script with "
                          f"`torchrun --nproc-per-node N script.py` or recipes_lib.launcher.launch")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    launcher.check_backend(backend)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup(barrier: bool = True) -> None:
    """Leave the process group (so the launcher's processes exit without a warning).

    Args:
        barrier: wait for every rank first; pass False after an error, when a peer may never arrive.
    """
    if dist.is_initialized():
        if barrier:
            # Ranks leave together: a worker once stayed alive after its last output while its peer had
            # exited (seen with the c10d rendezvous under CPU contention; cause not pinned down).
            dist.barrier()
        dist.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (each becomes one FSDP unit)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None) if hasattr(base, "get_decoder") else None
    if layers is None:
        raise RecipeError(f"{type(model).__name__}: no decoder layers found to shard")
    return list(layers)


def shard_fsdp2(model: torch.nn.Module, reshard_after_forward: bool = True, mixed_precision: bool = False,
                cpu_offload: bool = False) -> torch.nn.Module:
    """Shard every parameter across ranks with FSDP2's ``fully_shard``: each decoder layer, then the root.

    Args:
        reshard_after_forward: free the gathered layer after forward and gather again in backward
            (ZeRO-3-like); False keeps it until backward (ZeRO-2-like: more memory, less traffic).
        mixed_precision: compute in bf16 and reduce gradients in fp32 (weights stay fp32 shards).
        cpu_offload: keep parameter shards, gradients and optimizer state in host memory.
    """
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    kwargs = dict(reshard_after_forward=reshard_after_forward, mp_policy=policy)
    if cpu_offload:
        if not torch.cuda.is_available():
            raise RecipeError("cpu_offload=True moves shards off a GPU into host memory; "
                              "on CPU there is nothing to offload")
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    # The root unit holds the rest (embeddings, final norm, LM head; tied weights stay one parameter).
    # Not resharded after forward: its LM head is the first thing backward needs, right after forward.
    fully_shard(model, **(kwargs | {"reshard_after_forward": False}))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not mean (see the module docstring). Plain SUM collectives: gloo has no PREMUL_SUM,
            # which FSDP2 would otherwise use to apply a divide factor inside the reduction.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def _sum_allreduce_hook(process_group, bucket):
    return dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future().then(
        lambda fut: fut.value()[0])


def wrap_ddp(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """Replicate the model on every rank with DDP, gradients summed over ranks (see module docstring)."""
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return ddp


def all_ranks_sum(value: float, device: torch.device, dtype: torch.dtype = torch.float64) -> float:
    """Sum of ``value`` over all ranks (itself when there is no process group)."""
    if not dist.is_initialized():
        return value
    total = torch.tensor(value, dtype=dtype, device=device)
    dist.all_reduce(total)
    return total.item()


class StepResult(NamedTuple):
    loss: float
    grad_norm: float | None


def _ddp_sync(model: torch.nn.Module, last: bool):
    """DDP: all-reduce only in the step's last backward. Its reduction writes into ``.grad`` itself,
    so a summed reduction after every micro-batch would add the earlier micro-batches' already
    reduced gradients once per rank again. (FSDP2 reduce-scatters each micro-batch into separate
    sharded gradients, which is correct and keeps only a shard of the gradients between them.)"""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[dict],
               device: torch.device, autocast_dtype: torch.dtype | None = None,
               max_grad_norm: float | None = 1.0) -> StepResult:
    """One optimizer step over this rank's micro-batches: the global batch's loss per target token, and
    the global gradient's norm before clipping (None without clipping)."""
    local_targets = sum(losses.count_targets(mb["labels"]) for mb in micro_batches)
    total_targets = int(all_ranks_sum(local_targets, device, torch.int64))
    if total_targets == 0:
        raise ValueError("no target tokens in this step: every label is -100")
    local_loss = 0.0
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(device) for k, v in mb.items()}
        with _ddp_sync(model, last=i == len(micro_batches) - 1):
            with train._autocast(device, autocast_dtype):
                # The full model forward, not the fused-head path: that one calls the decoder directly,
                # and FSDP2's root unit (which gathers the embeddings and head) would never run.
                loss = train.loss_sum(model, mb, fused_head=False) / total_targets
            loss.backward()
        local_loss += loss.item()
    grad_norm = None
    if max_grad_norm is not None:
        # With FSDP2 the gradients are DTensor shards and clip_grad_norm_ reduces the norm across ranks.
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        grad_norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(all_ranks_sum(local_loss, device), grad_norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a whole tensor on the CPU (all ranks must call it: it gathers)."""
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


def local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (the local shard of a DTensor)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


STRATEGY_SHARDS = {"single": False, "ddp": False, "fsdp2": True, "fsdp2-no-reshard": True, "fsdp2-offload": True}


def predicted_state_bytes(n_params: int, strategy: str, world_size: int, weight_bytes: int = 4,
                          optimizer_states: int = 2) -> dict[str, int]:
    """Bytes of model state one rank holds between steps: fp32 master weights, gradients, and Adam's
    ``optimizer_states`` fp32 tensors per parameter (activations and gathered weights come on top).

    DDP and one process hold all of it on every rank; FSDP2 holds ``1/world_size`` of each (FSDP2 pads
    each parameter's first dimension to a multiple of ``world_size``, a rounding error here);
    ``fsdp2-offload`` holds the same shards in host memory, none on the GPU.
    """
    if strategy not in STRATEGY_SHARDS:
        raise RecipeError(f"strategy={strategy!r}; one of {', '.join(STRATEGY_SHARDS)}")
    share = 1 / world_size if STRATEGY_SHARDS[strategy] else 1.0
    per_param = {"parameters": weight_bytes, "gradients": weight_bytes, "optimizer": 4 * optimizer_states}
    state = {k: round(n_params * b * share) for k, b in per_param.items()}
    state["total"] = sum(state.values())
    state["on device"] = 0 if strategy == "fsdp2-offload" else state["total"]
    return state


def report_result(ctx: Context | None, **values) -> None:
    """Print one line the launcher parses: ``RESULT {"rank": r, ...}``."""
    print(launcher.RESULT_PREFIX + json.dumps({"rank": ctx.rank if ctx else 0, **values}), flush=True)
