"""DeepSpeed ZeRO-2/3 through Accelerate: the config, its checks, and wrapping a model and optimizer.

DeepSpeed is imported only by ``wrap_deepspeed``, so the config checks run (and CI tests them) where
DeepSpeed is not installed. ``step.train_step`` drives the wrapped model like the others.

ZeRO-3 is tuned for the model it wraps (``zero3_tuning``), as DeepSpeed's configuration docs advise
for a model this size, so that it is compared with FSDP2 on equal terms:

- ``stage3_param_persistence_threshold`` / ``stage3_model_persistence_threshold``: DeepSpeed keeps
  gathered (never partitions) each parameter of at most the first many elements, in
  ``named_parameters`` order, while the persisted total stays within the second. The first is the
  input embedding's size, the second that plus the one-dimensional parameters (the norms): so the
  embedding, which a causal LM lists first and which is also its tied LM head, stays gathered like
  FSDP2's root unit (the fused loss reads the head's weight outside the head's own forward: a
  partitioned weight there is gathered on demand, un-prefetched, every micro-batch), and the norms
  stay gathered as DeepSpeed's default threshold does; no decoder-layer matrix fits in what is left.
  An untied LM head, listed last, stays partitioned.
- ``stage3_prefetch_bucket_size``: two decoder layers, so the next layer's all-gather is issued
  while the current one computes (FSDP2 prefetches one layer ahead); ``reduce_bucket_size``: one
  decoder layer, one reduce-scatter per layer as FSDP2; ``overlap_comm`` and
  ``contiguous_gradients`` on.
"""

from __future__ import annotations

import json

import torch

from ..core.errors import RecipeError
from ..core.models import decoder_layers, unwrap

DEEPSPEED_STAGES = (2, 3)


def deepspeed_config(stage: int, micro_batch: int, accum_steps: int, world_size: int,
                     max_grad_norm: float | None, bf16: bool) -> dict:
    """A DeepSpeed ZeRO config for ``stage`` 2 or 3 with the batch sizes this run uses.

    ZeRO-2: DeepSpeed's documented buckets of 5e8 elements, communication overlapped. ZeRO-3: its
    buckets and persistence depend on the model's shapes: ``tune`` fills them in once it is loaded.
    """
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 2:
        zero |= {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": micro_batch * accum_steps * world_size,
        "gradient_clipping": max_grad_norm or 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # torch.optim.AdamW, the same optimizer every other strategy steps with (no JIT-built DeepSpeed ops)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def zero3_tuning(model: torch.nn.Module, layers_prefetched: int = 2) -> dict:
    """The ZeRO-3 ``zero_optimization`` keys tuned for ``model`` (module docstring); shapes only, so a
    model on the meta device will do."""
    embedding = unwrap(model).get_input_embeddings().weight.numel()
    small = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    layer = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    return {"overlap_comm": True, "contiguous_gradients": True,
            "stage3_param_persistence_threshold": embedding,
            "stage3_model_persistence_threshold": embedding + small,
            "stage3_prefetch_bucket_size": layers_prefetched * layer,
            "reduce_bucket_size": layer}


def tune(config: dict, model: torch.nn.Module) -> dict:
    """``config`` with ``zero3_tuning(model)`` filled in where a ZeRO-3 config leaves a key out or "auto"
    (a key the config sets keeps its value); other stages unchanged. Changes ``config`` and returns it."""
    zero = config["zero_optimization"]
    if zero.get("stage") == 3:
        for key, value in zero3_tuning(model).items():
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    return config


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
