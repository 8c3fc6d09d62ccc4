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

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from . import launcher, losses, measure, train
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
    # With NCCL, gloo too for tensors on the CPU (FSDP2's CPU offload reduces the gradient norm there).
    pg_backend = "cpu:gloo,cuda:nccl" if backend == "nccl" else backend
    dist.init_process_group(pg_backend, device_id=device if device.type == "cuda" else None)
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


class LossModel(torch.nn.Module):
    """A causal LM whose forward returns the summed next-token loss of a micro-batch.

    With ``fused_head`` the loss is the fused chunked LM head + cross-entropy, which never holds the
    ``[tokens, vocab]`` logits. Making the loss part of the module that FSDP2, DDP or DeepSpeed wrap
    is what lets FSDP2's root unit gather the embeddings and LM head for it: calling the decoder
    directly from outside would bypass the root's hooks.
    """

    def __init__(self, lm: torch.nn.Module, fused_head: bool = True):
        super().__init__()
        self.lm = lm
        self.fused_head = fused_head

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "position_ids": position_ids}
        return train.loss_sum(self.lm, {k: v for k, v in batch.items() if v is not None}, fused_head=self.fused_head)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DDP / DeepSpeed / ``LossModel`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or (model.lm if isinstance(model, LossModel) else None)
        if inner is None:
            return model
        model = inner


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (each becomes one FSDP unit)."""
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
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


def compile_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` each decoder layer (fuses its norms, RoPE, SwiGLU and residual adds).

    Call it before ``shard_fsdp2``, as torchtitan does: FSDP2's all-gathers stay outside the
    compiled code, and the identical layers share one compiled graph.
    """
    for layer in decoder_layers(model):
        layer.compile()


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
            with train._autocast(device, autocast_dtype):
                loss = model(**mb) / total_targets
            # The engine itself, not accelerator.backward (which also steps): the boundary is set
            # explicitly on every micro-batch, and the gradients can be measured before the step.
            engine = accelerator.deepspeed_engine_wrapped.engine
            engine.set_gradient_accumulation_boundary(is_boundary=last)
            engine.backward(loss * scale)
        else:
            with _ddp_sync(model, last):
                with train._autocast(device, autocast_dtype):
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


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a whole tensor on the CPU (all ranks must call it: it gathers)."""
    if getattr(model, "_recipes_accelerator", None) is not None:
        raise RecipeError("full weights of a DeepSpeed run: its ZeRO partitions (and fp32 masters) are not "
                          "gathered here; save with accelerator.get_state_dict(model) instead")
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


def local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (the local shard of a DTensor)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def param_bytes(model: torch.nn.Module, device: torch.device | None = None) -> int:
    """Bytes of the weights this rank holds (its shard under FSDP2 and ZeRO-3), optionally on one device."""
    tensors = [getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p for p in model.parameters()]
    return local_bytes(t for t in tensors if t is not None and (device is None or t.device == device))


def optimizer_bytes(optimizer, device: torch.device | None = None) -> int:
    """Bytes of this rank's optimizer state: AdamW's moments, and DeepSpeed's fp32 master partitions."""
    tensors, level = [], optimizer
    while level is not None:
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-2, ZeRO-3
            tensors += list(getattr(level, name, None) or [])
        if isinstance(getattr(level, "state", None), dict) and getattr(level, "optimizer", None) is None:
            tensors += [v for s in level.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        level = getattr(level, "optimizer", None)
    return measure.tensor_bytes((t.to_local() if isinstance(t, DTensor) else t for t in tensors), device)


def memory_breakdown(result: dict, device_index: int | None = None):
    """A rank's (or one GPU's) peak split into weights, gradients, optimizer state and activations.

    From a training script's result: gradients are what was allocated right after the last backward
    beyond weights and optimizer state (with DDP, its all-reduce buckets too); activations (and
    temporaries, FSDP2's gathered layers among them) are the peak beyond that. With several GPUs per
    rank (naive model parallelism) ``device_index`` picks one, by default the fullest. None without
    CUDA readings.
    """
    i = device_index if result.get("device_peaks") else None
    if i is None and result.get("device_peaks"):  # naive model parallelism: the fullest GPU
        i = max(range(len(result["device_peaks"])), key=result["device_peaks"].__getitem__)
    peak = result["peak_bytes"] if i is None else result["device_peaks"][i]
    if peak is None or not result.get("after_backward_bytes"):
        return None
    after = result["after_backward_bytes"][i or 0]
    params = result["param_bytes"] if i is None else result["device_param_bytes"][i]
    opt = result["optimizer_bytes"] if i is None else result["device_optimizer_bytes"][i]
    grads = max(after - params - opt, 0)
    return measure.MemoryBreakdown(params, grads, opt, max(peak - params - grads - opt, 0), peak)


# Bytes per parameter of (weights, gradients, optimizer state) one rank holds, and whether each is
# sharded over the ranks. fp32 master weights throughout: bf16 compute is autocast (one process,
# DDP) or FSDP2's MixedPrecisionPolicy (bf16 all-gathers, fp32 shards); DeepSpeed's bf16 mode keeps
# bf16 weights in the model and the fp32 master copy inside its optimizer (ZeRO paper: 2 + 2 + 12).
STATE_LAYOUT = {
    "single": ((4, 4, 8), (False, False, False)),
    # DDP's default (gradient_as_bucket_view=False) keeps a second copy of the gradients in its
    # all-reduce buckets: 4 + 4 bytes of gradients per parameter.
    "ddp": ((4, 8, 8), (False, False, False)),
    "fsdp2": ((4, 4, 8), (True, True, True)),
    "fsdp2-no-reshard": ((4, 4, 8), (True, True, True)),
    "fsdp2-offload": ((4, 4, 8), (True, True, True)),
    # Measured on 2 H200s (DeepSpeed 0.19.8, bf16): ZeRO-2 keeps its gradient partitions in bf16, ZeRO-3 in fp32.
    "deepspeed-zero2": ((2, 2, 12), (False, True, True)),
    "deepspeed-zero3": ((2, 4, 12), (True, True, True)),
    "naive-mp": ((4, 4, 8), (False, False, False)),  # per GPU: times naive_mp_share
}


def predicted_state_bytes(n_params: int, strategy: str, world_size: int) -> dict[str, int]:
    """Bytes of model state one rank holds: weights, gradients and AdamW state (``STATE_LAYOUT``).

    Activations and FSDP2's gathered layers come on top. ``fsdp2-offload`` holds its shards in host
    memory, none on the GPU. QLoRA's state: ``qlora.predicted_state_bytes``, divided by the ranks.
    """
    if strategy not in STATE_LAYOUT:
        raise RecipeError(f"strategy={strategy!r}; one of {', '.join(STATE_LAYOUT)}")
    (weight, grad, opt), sharded = STATE_LAYOUT[strategy]
    shares = [1 / world_size if s else 1.0 for s in sharded]
    state = {"parameters": round(n_params * weight * shares[0]), "gradients": round(n_params * grad * shares[1]),
             "optimizer": round(n_params * opt * shares[2])}
    state["total"] = sum(state.values())
    state["on device"] = 0 if strategy == "fsdp2-offload" else state["total"]
    return state


def predicted_run_state(result: dict, config, lora_r: int = 16) -> dict[str, float]:
    """Predicted weights, gradients and AdamW state on one GPU for a ``run`` result of the training script.

    Picks the model for the result's strategy: ``predicted_state_bytes`` for the full-weight
    strategies, the first (fullest) GPU's share for naive model parallelism, and QLoRA's count
    (``qlora.predicted_state_bytes``, 4-bit linears, the rest in the compute dtype) over the ranks for
    FSDP-QLoRA. ``config`` is the model's config (QLoRA and naive model parallelism count by layer).
    The GPUs a naive model-parallel run spread over: ``result["gpus"]`` if set, else one per entry
    of its ``device_peaks``.
    """
    from . import model_parallel, qlora  # model_parallel imports this module; qlora imports peft

    gpus = result.get("gpus") or len(result.get("device_peaks") or ()) or 1
    strategy, world = result["strategy"], max(result["world_size"], gpus)
    if strategy == "naive-mp":
        share = model_parallel.naive_mp_share(config, world)
        return {k: v * share for k, v in predicted_state_bytes(result["n_params"], "naive-mp", 1).items()}
    if strategy != "fsdp2-qlora":
        return predicted_state_bytes(result["n_params"], strategy, world)
    weight_bytes = 2 if result.get("bf16") else 4  # embeddings and norms stay in the model's dtype
    state = {k: v / world for k, v in qlora.predicted_state_bytes(config, lora_r, weight_bytes).items()}
    return state | {"total": sum(state.values()), "on device": sum(state.values())}


def report_result(ctx: Context | None, **values) -> None:
    """Print one line the launcher parses: ``RESULT {"rank": r, ...}``; under ``launcher.launch``
    also write it to the run's result folder (``launcher.RESULT_DIR_ENV``).

    One write of the whole line: ranks sharing a stdout (torchrun without ``--tee``) then cannot
    interleave inside it (``print`` writes the text and the newline separately). The file is what the
    launcher trusts: torchrun's ``--tee`` reader can drop a worker's last line when the worker exits
    right after writing it (it checks "finished" after reading end-of-file, without reading again).
    """
    line = json.dumps({"rank": ctx.rank if ctx else 0, **values})
    sys.stdout.write(launcher.RESULT_PREFIX + line + "\n")
    sys.stdout.flush()
    folder = os.environ.get(launcher.RESULT_DIR_ENV)
    if folder and os.path.isdir(folder):  # another node of a multi-node run has no such folder
        launcher.write_result(folder, line)
