"""``recipes train`` with ``train.strategy: zero2|zero3``: DeepSpeed ZeRO through Accelerate (notebook 02).

The DeepSpeed config is ``parallel.zero.deepspeed_config`` of the run (micro-batch, accumulation steps,
ranks, clipping, bf16), or the JSON that an Accelerate config file names (``deepspeed_config_file``)
with its ``"auto"`` values filled from the run and every other run-dependent value checked against
it; ZeRO-3's buckets and persistence are then fitted to the model (``zero.tune``). The model and the
run's own AdamW go to ``zero.wrap_deepspeed`` (Accelerate's ``prepare``), and ``parallel.step``
drives the engine as notebook 02 does. Checkpoints are Accelerate's ``save_state``/``load_state``
(DeepSpeed's ``save_checkpoint``: each rank writes its partitions of the trained weights and the
optimizer state), so they resume on the same number of ranks. The trained weights saved at the end
are gathered from ZeRO's fp32 master copies.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..core.errors import RecipeError
from ..parallel import zero
from .config import DEEPSPEED, RunConfig

FOLDER = "deepspeed"  # Accelerate's save_state folder inside a checkpoint
# The run's AdamW and schedule step every strategy alike (optim.*): a DeepSpeed JSON may not bring its own.
NOT_IN_FILE = ("optimizer", "scheduler", "fp16")


def require_deepspeed(strategy: str) -> None:
    """RecipeError unless DeepSpeed can be imported (checked before anything loads)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(f"train.strategy: {strategy} needs DeepSpeed: `pip install deepspeed` (a CUDA GPU "
                          f"for real runs; CPU with DS_ACCELERATOR=cpu), or set train.strategy: fsdp2, "
                          f"PyTorch's own equivalent")


def _fill(config: dict, key: str, value, setting: str) -> None:
    given = config.get(key, "auto")
    if given != "auto" and given != value:
        raise RecipeError(f"DeepSpeed config: {key}={given!r}, but this run uses {value!r} ({setting}): "
                          f"set it to {value!r} or \"auto\"")
    config[key] = value


def engine_config(cfg: RunConfig, world_size: int, accum: int, bf16: bool, model: torch.nn.Module,
                  config_file: str | None = None) -> dict:
    """The DeepSpeed config of this run: built, or read from ``config_file`` and completed; tuned for
    ``model`` (ZeRO-3)."""
    stage, micro = DEEPSPEED[cfg.train.strategy], cfg.train.micro_batch
    clip = cfg.optim.max_grad_norm or 0.0
    if config_file is None:
        return zero.tune(zero.deepspeed_config(stage, micro, accum, world_size, clip or None, bf16), model)
    config = zero.load_deepspeed_config(config_file)
    zero.check_deepspeed_config(config, micro, accum, world_size)
    if config["zero_optimization"]["stage"] != stage:
        raise RecipeError(f"{config_file} sets zero_optimization.stage="
                          f"{config['zero_optimization']['stage']}, but train.strategy is "
                          f"{cfg.train.strategy}: make them agree")
    brought = [key for key in NOT_IN_FILE if key in config]
    if brought:
        raise RecipeError(f"{config_file} has {brought}: recipes train steps its own AdamW and cosine "
                          f"schedule (optim.*) in bf16 or fp32 (model.precision): remove them from the file")
    _fill(config, "train_micro_batch_size_per_gpu", micro, "train.micro_batch")
    _fill(config, "gradient_accumulation_steps", accum, "train.global_batch / (micro_batch x ranks)")
    _fill(config, "train_batch_size", micro * accum * world_size, "train.global_batch")
    _fill(config, "gradient_clipping", clip, "optim.max_grad_norm; 0.0 is none")
    bf16_section = dict(config.get("bf16", {}))
    _fill(bf16_section, "enabled", bf16, "model.precision")
    config["bf16"] = bf16_section
    config |= {"zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    return zero.tune(config, model)


def wrap(model: torch.nn.Module, optimizer, cfg: RunConfig, world_size: int, accum: int,
         autocast_dtype: torch.dtype | None, config_file: str | None = None):
    """(engine, optimizer): the ``LossModel`` and its AdamW handed to DeepSpeed through Accelerate."""
    if autocast_dtype == torch.float16:
        raise RecipeError(f"train.strategy: {cfg.train.strategy} runs bf16 or fp32 here, and this GPU has no "
                          f"bf16: set model.precision: fp32, or train.strategy: ddp or fsdp2")
    config = engine_config(cfg, world_size, accum, autocast_dtype == torch.bfloat16, model, config_file)
    return zero.wrap_deepspeed(model, optimizer, config)


def save(path: Path, engine) -> None:
    """Every rank writes its ZeRO partitions of the trained weights and optimizer state into ``path``."""
    zero.accelerator_of(engine).save_state(str(path / FOLDER), exclude_frozen_parameters=True)


def load(path: Path, engine, saved_ranks: int) -> None:
    accelerator = zero.accelerator_of(engine)
    if accelerator.num_processes != saved_ranks:
        raise RecipeError(f"{path} holds DeepSpeed ZeRO partitions of {saved_ranks} ranks and this run has "
                          f"{accelerator.num_processes}: resume with {saved_ranks} processes (DeepSpeed's "
                          f"checkpoints do not reshard), or start a new run in another output.dir")
    accelerator.load_state(str(path / FOLDER), load_module_strict=False)  # the frozen base: model.source


def full_trained_state(engine) -> dict[str, torch.Tensor]:
    """The trained weights as whole fp32 CPU tensors from ZeRO's master copies, named as in the bare
    model (every rank calls it: ZeRO-3 gathers)."""
    from deepspeed.utils import safe_get_full_fp32_param  # DeepSpeed is optional: imported when it runs

    state = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            state[name.removeprefix("lm.")] = (param if full is None else full).detach().float().cpu()
    return state
