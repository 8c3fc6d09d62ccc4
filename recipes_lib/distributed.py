"""Data parallelism with PyTorch's own engines (DDP, FSDP2), inside a torchrun-launched worker.

Inside a ``torchrun`` worker: ``setup()``, ``LossModel(model)``, then ``shard_fsdp2``, ``wrap_ddp``
or ``wrap_deepspeed``, ``train_step`` per optimizer step, ``report_result(...)``, ``cleanup()``. A
notebook starts the workers with ``launcher.launch``. ``split_across_devices`` is the naive model
parallelism baseline (one process, layers spread over GPUs).

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


DEEPSPEED_STAGES = (2, 3)


def deepspeed_config(stage: int, micro_batch: int, accum_steps: int, world_size: int,
                     max_grad_norm: float | None, bf16: bool) -> dict:
    """A DeepSpeed ZeRO config for ``stage`` 2 or 3 with the batch sizes this run uses."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": micro_batch * accum_steps * world_size,
        "gradient_clipping": max_grad_norm or 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
        # torch.optim.AdamW, the same optimizer every other strategy steps with (no JIT-built DeepSpeed ops)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def load_deepspeed_config(path: str) -> dict:
    """A DeepSpeed JSON config from ``path``, with a clear message if it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RecipeError(f"DeepSpeed config {path!r} not found") from None
    except json.JSONDecodeError as error:
        raise RecipeError(f"DeepSpeed config {path!r} is not valid JSON: {error}") from None


def check_deepspeed_config(config: dict, micro_batch: int, accum_steps: int, world_size: int) -> None:
    """RecipeError unless ``config`` is a ZeRO-2/3 config consistent with this run's batch sizes.

    DeepSpeed itself finds most of these only after loading the model on every rank, with a message
    that does not name the file's field; here they are caught before anything starts.
    """
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in DEEPSPEED_STAGES:
        raise RecipeError(f"DeepSpeed config: zero_optimization.stage={stage!r}; this recipe compares ZeRO "
                          f"stages {DEEPSPEED_STAGES} (2: shard gradients and optimizer state; 3: parameters too)")
    expected = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accum_steps,
                "train_batch_size": micro_batch * accum_steps * world_size}
    for key, value in expected.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise RecipeError(f"DeepSpeed config: {key}={given} but this run uses {value} (--micro-batch "
                              f"{micro_batch}, {accum_steps} accumulation steps, {world_size} processes); "
                              f"set it to {value} or \"auto\"")
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise RecipeError("DeepSpeed config: fp16 and bf16 are both enabled; enable one")


def wrap_deepspeed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """Hand ``model`` and ``optimizer`` to DeepSpeed through Accelerate; returns (model, optimizer)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise RecipeError("DeepSpeed is not installed: `pip install deepspeed` (it needs a CUDA GPU; "
                          "FSDP2 is PyTorch's own equivalent and needs nothing extra)") from None
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    config = {k: v for k, v in config.items()}
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    accelerator = Accelerator(deepspeed_plugin=plugin,
                              mixed_precision="bf16" if config.get("bf16", {}).get("enabled") else "no")
    model, optimizer = accelerator.prepare(model, optimizer)
    model._recipes_accelerator = accelerator
    return model, optimizer


def _move(obj, device: torch.device):
    """``obj`` with every tensor in it (tuples, lists, dicts) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def split_across_devices(model: torch.nn.Module, devices: Sequence[torch.device | str]) -> list[str]:
    """Naive model parallelism: consecutive decoder layers on each device, everything else on the first.

    A pre-forward hook on each layer (and on the final norm) moves its inputs to its own device, so
    one micro-batch runs through the GPUs in turn: only one of them works at any moment, and the
    hidden states cross between them twice per boundary (forward and backward). Returns the layers'
    devices.
    """
    devices = [torch.device(d) for d in devices]
    layers = decoder_layers(model)
    per_device = -(-len(layers) // len(devices))
    model.to(devices[0])
    placed = []
    for index, layer in enumerate(layers):
        device = devices[index // per_device]
        layer.to(device)
        placed.append(str(device))
    decoder = unwrap(model)
    decoder = decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder
    for module in [*layers, *(m for m in decoder.children() if not isinstance(m, torch.nn.ModuleList))]:
        device = next(module.parameters(), torch.empty(0, device=devices[0])).device
        module.register_forward_pre_hook(
            lambda _, args, kwargs, device=device: (_move(args, device), _move(kwargs, device)), with_kwargs=True)
    return placed


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
    local_loss = 0.0
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        last = i == len(micro_batches) - 1
        if accelerator is not None:
            with train._autocast(device, autocast_dtype):
                loss = model(**mb) / total_targets
            if last:  # Accelerate's backward would also step; apart, the gradients can be measured first
                engine = accelerator.deepspeed_engine_wrapped.engine
                engine.set_gradient_accumulation_boundary(is_boundary=True)
                engine.backward(loss * scale)
            else:
                accelerator.gradient_state._set_sync_gradients(False)
                accelerator.backward(loss * scale)
        else:
            with _ddp_sync(model, last):
                with train._autocast(device, autocast_dtype):
                    loss = model(**mb) / total_targets
                loss.backward()
        local_loss += loss.item()
    if after_backward is not None:
        after_backward()
    grad_norm = None
    if accelerator is not None:  # DeepSpeed clips, steps and zeroes the gradients itself
        accelerator.deepspeed_engine_wrapped.engine.step()
        accelerator.gradient_state._set_sync_gradients(True)
        norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
    else:
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


def _on(t: torch.Tensor, device: torch.device | None) -> bool:
    return device is None or t.device == device


def param_bytes(model: torch.nn.Module, device: torch.device | None = None) -> int:
    """Bytes of the weights this rank holds (its shard under FSDP2 and ZeRO-3), optionally on one device."""
    tensors = [getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p for p in model.parameters()]
    return local_bytes(t for t in tensors if t is not None and _on(t, device))


def optimizer_bytes(optimizer, device: torch.device | None = None) -> int:
    """Bytes of this rank's optimizer state: AdamW's moments, and DeepSpeed's fp32 master partitions."""
    tensors, level = [], optimizer
    while level is not None:
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-2, ZeRO-3
            tensors += list(getattr(level, name, None) or [])
        if isinstance(getattr(level, "state", None), dict) and getattr(level, "optimizer", None) is None:
            tensors += [v for s in level.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        level = getattr(level, "optimizer", None)
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.numel() and local.data_ptr() not in seen and _on(local, device):
            seen.add(local.data_ptr())
            total += local.nbytes
    return total


def memory_breakdown(result: dict, device_index: int | None = None):
    """A rank's (or one GPU's) peak split into weights, gradients, optimizer state and activations.

    From a training script's result: gradients are what was allocated right after the last backward
    beyond weights and optimizer state (with DDP, its all-reduce buckets too); activations (and
    temporaries, FSDP2's gathered layers among them) are the peak beyond that. With several GPUs per
    rank (naive model parallelism) ``device_index`` picks one, by default the fullest. None without
    CUDA readings.
    """
    from .measure import MemoryBreakdown

    i = device_index
    if i is None and result.get("device_peaks"):  # naive model parallelism: the fullest GPU
        i = max(range(len(result["device_peaks"])), key=result["device_peaks"].__getitem__)
    peak = result["peak_bytes"] if i is None else result["device_peaks"][i]
    if peak is None or not result.get("after_backward_bytes"):
        return None
    after = result["after_backward_bytes"][i or 0]
    params = result["param_bytes"] if i is None else result["device_param_bytes"][i]
    opt = result["optimizer_bytes"] if i is None else result["device_optimizer_bytes"][i]
    grads = max(after - params - opt, 0)
    return MemoryBreakdown(params, grads, opt, max(peak - params - grads - opt, 0), peak)


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
    "fsdp2-qlora": ((4, 4, 8), (True, True, True)),  # with trainable= and frozen_bytes_per_param=
    "naive-mp": ((4, 4, 8), (False, False, False)),  # per GPU: times naive_mp_share
}
STRATEGY_SHARDS = {k: all(sharded) for k, (_, sharded) in STATE_LAYOUT.items()}


def naive_mp_share(config, n_devices: int) -> float:
    """Share of a model's parameters on the fullest GPU of ``split_across_devices``: the first, which
    holds the embeddings, the final norm and the LM head beside its ``ceil(layers / n_devices)`` layers."""
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = d * (config.num_attention_heads * head_dim) * 2 + 2 * d * kv + 3 * d * config.intermediate_size + 2 * d
    embed = config.vocab_size * d * (1 if config.tie_word_embeddings else 2) + d
    first = embed + per_layer * -(-layers // n_devices)
    return first / (embed + per_layer * layers)


def predicted_state_bytes(n_params: int, strategy: str, world_size: int, trainable: int | None = None,
                          frozen_bytes_per_param: float = 0.0) -> dict[str, int]:
    """Bytes of model state one rank holds: weights, gradients and AdamW state (``STATE_LAYOUT``).

    Activations and FSDP2's gathered layers come on top. ``fsdp2-offload`` holds its shards in host
    memory, none on the GPU. With a frozen base (``trainable`` < ``n_params``, as in QLoRA) only the
    trainable parameters have gradients and optimizer state, and the frozen ones take
    ``frozen_bytes_per_param`` each (0.5 + scales for NF4), sharded like the rest.
    """
    if strategy not in STATE_LAYOUT:
        raise RecipeError(f"strategy={strategy!r}; one of {', '.join(STATE_LAYOUT)}")
    (weight, grad, opt), sharded = STATE_LAYOUT[strategy]
    shares = [1 / world_size if s else 1.0 for s in sharded]
    trainable = n_params if trainable is None else trainable
    frozen = n_params - trainable
    state = {"parameters": round((trainable * weight + frozen * frozen_bytes_per_param) * shares[0]),
             "gradients": round(trainable * grad * shares[1]), "optimizer": round(trainable * opt * shares[2])}
    state["total"] = sum(state.values())
    state["on device"] = 0 if strategy == "fsdp2-offload" else state["total"]
    return state


def report_result(ctx: Context | None, **values) -> None:
    """Print one line the launcher parses: ``RESULT {"rank": r, ...}``."""
    print(launcher.RESULT_PREFIX + json.dumps({"rank": ctx.rank if ctx else 0, **values}), flush=True)
