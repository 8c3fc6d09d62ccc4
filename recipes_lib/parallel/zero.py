"""DeepSpeed ZeRO-2/3 through Accelerate: the config, its checks, and wrapping a model and optimizer.

DeepSpeed is imported only by ``wrap_deepspeed``, so the config checks run (and CI tests them) where
DeepSpeed is not installed. ``step.train_step`` drives the wrapped model like the others.
"""

from __future__ import annotations

import json

import torch

from ..core.errors import RecipeError

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
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization"), dict):
        raise RecipeError("DeepSpeed config: a JSON object with a \"zero_optimization\": {\"stage\": 2 or 3} "
                          "section is needed")
    stage = config["zero_optimization"].get("stage")
    if stage not in DEEPSPEED_STAGES:
        raise RecipeError(f"DeepSpeed config: zero_optimization.stage={stage!r}; this recipe compares ZeRO "
                          f"stages {DEEPSPEED_STAGES} (2: shard gradients and optimizer state; 3: parameters "
                          f"too)")
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

    plugin = DeepSpeedPlugin(hf_ds_config=dict(config))  # a copy: the caller's dict stays as it was
    accelerator = Accelerator(deepspeed_plugin=plugin,
                              mixed_precision="bf16" if config.get("bf16", {}).get("enabled") else "no")
    model, optimizer = accelerator.prepare(model, optimizer)
    model._recipes_accelerator = accelerator
    return model, optimizer


def accelerator_of(model: torch.nn.Module):
    """The Accelerate ``Accelerator`` that ``wrap_deepspeed`` handed ``model`` to; None for other models."""
    return getattr(model, "_recipes_accelerator", None)
