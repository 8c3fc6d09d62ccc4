"""What ``accelerate launch`` says about a run, checked against the run's config.

``accelerate launch --config_file configs/accelerate/X.yaml -m recipes_lib train CONFIG`` starts the
processes as ``torchrun`` does and hands its file's settings down in environment variables. The
recipes config decides what the processes do. Where the Accelerate file asks for something too
(DeepSpeed or FSDP, FSDP's version, resharding, offload and checkpointing, the mixed precision), it
must agree with the recipes config: a setting that would be silently ignored is refused with one
message naming both keys. A DeepSpeed run takes its DeepSpeed JSON from the file's
``deepspeed_config_file`` (``deepspeed_file``); the file's inline DeepSpeed keys (``zero_stage``,
``gradient_accumulation_steps`` ...) are refused, as Accelerate itself refuses them next to a
config that the script builds.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.errors import RecipeError
from .config import DEEPSPEED, RunConfig

# Inline keys of an Accelerate file's deepspeed_config that Accelerate will not combine with a
# DeepSpeed config the script passes (accelerate.utils.DeepSpeedPlugin._deepspeed_config_checks).
INLINE_DEEPSPEED_KEYS = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage",
                         "offload_optimizer_device", "offload_param_device", "offload_param_nvme_path",
                         "offload_optimizer_nvme_path", "zero3_save_16bit_model", "mixed_precision")
HOW = "(configs/accelerate/ has files that fit the configs in configs/)"


def launched_by_accelerate(env: Mapping[str, str]) -> bool:
    return "ACCELERATE_MIXED_PRECISION" in env  # every `accelerate launch` sets it


def deepspeed_file(env: Mapping[str, str]) -> str | None:
    """The DeepSpeed JSON that the Accelerate file names (``deepspeed_config_file``), if any."""
    return env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None


def check(cfg: RunConfig, env: Mapping[str, str]) -> None:
    """RecipeError where the Accelerate launch (its environment ``env``) contradicts ``cfg``."""
    if not launched_by_accelerate(env):
        return
    strategy = cfg.train.strategy
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true" and strategy not in DEEPSPEED:
        raise RecipeError(f"the Accelerate config file says distributed_type: DEEPSPEED, but train.strategy "
                          f"is {strategy!r}: set train.strategy: zero2 or zero3, or launch with another file "
                          f"{HOW}")
    if env.get("ACCELERATE_USE_FSDP") == "true":
        _check_fsdp(cfg, env)
    if strategy in DEEPSPEED and env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        given = env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")
        fields = [f for f in given if f in INLINE_DEEPSPEED_KEYS]
        if fields:
            raise RecipeError(f"the Accelerate config file sets {', '.join(fields)}; recipes train builds "
                              f"the DeepSpeed config from its own config (train.*, optim.max_grad_norm, "
                              f"model.precision) and the JSON named by deepspeed_config_file: remove them "
                              f"from the Accelerate file {HOW}")
    _check_precision(cfg, env.get("ACCELERATE_MIXED_PRECISION", "no"))


def _check_fsdp(cfg: RunConfig, env: Mapping[str, str]) -> None:
    if cfg.train.strategy != "fsdp2":
        raise RecipeError(f"the Accelerate config file says distributed_type: FSDP, but train.strategy is "
                          f"{cfg.train.strategy!r}: set train.strategy: fsdp2, or launch with another file "
                          f"{HOW}")
    if env.get("FSDP_VERSION") != "2":
        raise RecipeError(f"the Accelerate config file says fsdp_version: {env.get('FSDP_VERSION')}; recipes "
                          f"train shards with FSDP2 (fully_shard): set fsdp_config.fsdp_version: 2")
    # Accelerate's defaults: reshard after forward, no offload, no checkpointing. A file that asks for
    # another value asks for something the recipes config must say as well.
    asks = {"fsdp_reshard_after_forward": (env.get("FSDP_RESHARD_AFTER_FORWARD", "true") == "false",
                                           not cfg.train.reshard, "train.reshard: false"),
            "fsdp_offload_params": (env.get("FSDP_OFFLOAD_PARAMS", "false") == "true",
                                    cfg.train.cpu_offload, "train.cpu_offload: true"),
            "fsdp_activation_checkpointing": (env.get("FSDP_ACTIVATION_CHECKPOINTING", "false") == "true",
                                              cfg.model.checkpointing, "model.checkpointing: true")}
    for key, (asked, done, setting) in asks.items():
        if asked and not done:
            raise RecipeError(f"the Accelerate config file sets fsdp_config.{key} to its non-default value, "
                              f"which the recipes config does not do: set {setting} in the recipes config, "
                              f"or remove {key} from the Accelerate file")


def _check_precision(cfg: RunConfig, accelerate_precision: str) -> None:
    wanted = cfg.model.precision
    if accelerate_precision == "no" or wanted == "auto" or accelerate_precision == wanted:
        return
    raise RecipeError(f"the Accelerate config file says mixed_precision: {accelerate_precision}, the recipes "
                      f"config model.precision: {wanted}: model.precision decides, so remove mixed_precision "
                      f"from the Accelerate file or set model.precision: {accelerate_precision}")
