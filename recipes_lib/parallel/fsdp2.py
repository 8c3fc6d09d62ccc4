"""FSDP2: shard every parameter across ranks with ``fully_shard``; gather the full state back.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..core.errors import RecipeError
from ..core.models import decoder_layers
from . import zero


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


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a whole tensor on the CPU (all ranks must call it: it gathers)."""
    if zero.accelerator_of(model) is not None:
        raise RecipeError("full weights of a DeepSpeed run: its ZeRO partitions (and fp32 masters) are not "
                          "gathered here; save with accelerator.get_state_dict(model) instead")
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}
