"""``recipes train`` across ranks (``torchrun`` or ``accelerate launch ... -m recipes_lib train``): DDP, FSDP2
or DeepSpeed ZeRO-2/3 (``app.deepspeed_zero``), notebook 02's code.

Every rank builds the same stream of micro-batches and takes every ``world_size``-th one, so the data
position of a checkpoint is a count of global micro-batches and a resume on any number of ranks
continues where the run stopped. The step is ``parallel.step.train_step`` (loss normalised by the
target tokens of all ranks, gradients summed). DDP checkpoints are written by rank 0; FSDP2's with
``torch.distributed.checkpoint``, sharded, so they load on a different number of ranks; DeepSpeed's
with Accelerate's ``save_state``.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..core import train
from ..core.errors import RecipeError
from ..parallel import context, ddp, fsdp2, step
from . import deepspeed_zero, launch
from .config import DEEPSPEED, RunConfig


def setup(cfg: RunConfig) -> context.Context | None:
    """The process group for a ``ddp``/``fsdp2``/``zero2``/``zero3`` run (None for ``single``), after
    checking the launch (``torchrun``, or ``accelerate launch`` and its config file)."""
    launched = "WORLD_SIZE" in os.environ
    launch.check(cfg, os.environ)
    if cfg.train.strategy == "single":
        if launched and int(os.environ["WORLD_SIZE"]) > 1:
            raise RecipeError(f"train.strategy: single, but torchrun started {os.environ['WORLD_SIZE']} "
                              f"processes: set train.strategy: ddp, fsdp2, zero2 or zero3, or "
                              f"--nproc-per-node 1")
        return None
    if cfg.train.strategy in DEEPSPEED:
        deepspeed_zero.require_deepspeed(cfg.train.strategy)
    if not launched:
        raise RecipeError(f"train.strategy: {cfg.train.strategy} runs under torchrun or accelerate launch: "
                          f"torchrun --nproc-per-node N -m recipes_lib train CONFIG ... (README: Train your "
                          f"own model)")
    ctx = context.setup()
    per_step = cfg.train.micro_batch * ctx.world_size
    if cfg.train.global_batch % per_step:
        context.cleanup(barrier=False)
        raise RecipeError(f"train.global_batch={cfg.train.global_batch} is not a multiple of "
                          f"train.micro_batch x ranks = {cfg.train.micro_batch} x {ctx.world_size}: "
                          f"change one of them")
    return ctx


def wrap(lm: torch.nn.Module, cfg: RunConfig, ctx: context.Context, accum: int,
         autocast_dtype: torch.dtype | None) -> tuple[torch.nn.Module, torch.dtype | None]:
    """The model as a ``LossModel`` wrapped for the strategy, and the autocast dtype the step should use
    (FSDP2 casts through its own bf16 policy, DeepSpeed through its bf16 mode, instead of autocast).
    DeepSpeed's wrapping waits for the optimizer: ``engine``."""
    model = train.LossModel(lm, fused_head=cfg.model.chunked_loss)
    if cfg.train.strategy in DEEPSPEED:
        return model, None if autocast_dtype == torch.bfloat16 else autocast_dtype
    if cfg.train.strategy == "ddp":
        return ddp.wrap_ddp(model, ctx, micro_batches_per_step=accum), autocast_dtype
    mixed = autocast_dtype == torch.bfloat16
    sharded = fsdp2.shard_fsdp2(model, reshard_after_forward=cfg.train.reshard, mixed_precision=mixed,
                                cpu_offload=cfg.train.cpu_offload)
    return sharded, None if mixed else autocast_dtype


def engine(model: torch.nn.Module, optimizer, cfg: RunConfig, ctx: context.Context, accum: int,
           autocast_dtype: torch.dtype | None):
    """(model, optimizer), handed to DeepSpeed for ``zero2``/``zero3`` (with the DeepSpeed JSON an
    Accelerate config file names, if any); unchanged for the other strategies."""
    if cfg.train.strategy not in DEEPSPEED:
        return model, optimizer
    return deepspeed_zero.wrap(model, optimizer, cfg, ctx.world_size, accum, autocast_dtype,
                               launch.deepspeed_file(os.environ))


def rank_share(stream: Iterator[dict], ctx: context.Context) -> Iterator[dict]:
    """This rank's micro-batches of the global stream: every ``world_size``-th, from its rank."""
    return itertools.islice(stream, ctx.rank, None, ctx.world_size)


def step_fn(device: torch.device, autocast_dtype, max_grad_norm, grad_norms: list):
    """``(model, optimizer, micro_batches) -> loss`` for ``core.train.train``: notebook 02's step."""
    def one_step(model, optimizer, micro_batches):
        result = step.train_step(model, optimizer, micro_batches, device, autocast_dtype, max_grad_norm)
        if result.grad_norm is not None:
            grad_norms.append(torch.tensor(result.grad_norm))
        return result.loss
    return one_step


def inner(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside a wrapped ``LossModel``."""
    return (model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model).lm


def save_sharded(path: Path, model, optimizer) -> None:
    """FSDP2: the trained weights and the optimizer state with ``torch.distributed.checkpoint``
    (every rank writes its shards into ``path``)."""
    options = StateDictOptions(ignore_frozen_params=True)
    state = {"model": get_model_state_dict(model, options=options),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    dcp.save(state, checkpoint_id=str(path / "sharded"))


def load_sharded(path: Path, model, optimizer) -> None:
    options = StateDictOptions(ignore_frozen_params=True)
    state = {"model": get_model_state_dict(model, options=options),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    dcp.load(state, checkpoint_id=str(path / "sharded"))
    # the frozen base is not in the checkpoint (it comes from model.source): load the trained part only
    partial = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_model_state_dict(model, state["model"], options=partial)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


def full_trained_state(model, cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    """The trained weights of a sharded model (FSDP2, DeepSpeed) as whole CPU tensors, named as in the bare
    model (all ranks call it); None for the others, whose bare model holds them."""
    if cfg.train.strategy in DEEPSPEED:
        return deepspeed_zero.full_trained_state(model)
    if cfg.train.strategy != "fsdp2":
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    return {k.removeprefix("module.").removeprefix("lm."): v for k, v in state.items()}


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def publish(tmp: Path, final: Path, ctx: context.Context | None) -> None:
    """Rank 0 renames a fully written checkpoint folder into place, after every rank has written."""
    barrier()
    if ctx is None or ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
