"""A run's configuration: YAML sections validated into typed models before anything loads.

``load(path, overrides)`` reads the file, applies ``key=value`` overrides (a dotted path such as
``optim.lr=1e-4``, or a key name that only one section has, such as ``lr=1e-4``), and validates the
whole with pydantic. Every mistake becomes one ``RecipeError`` that names the key, what is allowed
and what to change: unknown keys (with the nearest valid one), wrong types, and impossible
combinations (offloaded AdamW with gradient clipping, QLoRA with parameter offload, activation
offload without checkpointing, QLoRA or fp16 under DeepSpeed, the long-context recipe without the
chunked loss or in several processes). ``reference_yaml()`` writes every
key with its default and its description: ``configs/reference.yaml`` is that file, and
``recipes train --help`` prints it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.errors import RecipeError
from .data import DataConfig

DEEPSPEED = {"zero2": 2, "zero3": 3}  # train.strategy -> DeepSpeed ZeRO stage


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    source: str = Field("data/tiny-llama", description="hub id, local folder, or random:<shape>")
    tokenizer: str | None = Field(None, description="tokenizer to use (default: the model's; for "
                                  "random:<shape>, the embedded data/tiny-llama one)")
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="full fine-tuning, LoRA adapters, or QLoRA (NF4 double-quant base + adapters)")
    lora_r: int = Field(16, ge=1, description="adapter rank (lora, qlora)")
    lora_alpha: int = Field(32, ge=1, description="adapter scale numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="adapter dropout (0 is faster)")
    nf4_base: Literal["auto", "bitsandbytes", "torch", "torchao"] = Field(
        "auto", description="qlora: who holds the 4-bit base: auto (torchao's NF4Tensor where model.compile: "
        "auto compiles the layers and torchao is installed, the fastest measured; else bitsandbytes), "
        "bitsandbytes' Linear4bit, our plain-PyTorch NF4 (fused by compile), or torchao's NF4Tensor")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile each decoder layer (regional compilation): auto compiles "
        "full fine-tuning and QLoRA on a bf16 GPU with train.strategy: single (the fastest steps "
        "measured, notebook 01), leaving LoRA, long_context, sliding_window, offload_activations, fp16/fp32 "
        "and other attention kernels eager; true or false decides")
    attention: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="attention implementation (sdpa picks PyTorch's flash/cuDNN kernels)")
    sliding_window: int | None = Field(None, ge=1,
                                       description="attend to the last N tokens only (FlexAttention)")
    checkpointing: bool = Field(False, description="activation checkpointing of decoder layers")
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every k-th layer (1 = all)")
    offload_activations: bool = Field(False, description="checkpointed layers' inputs in pinned host memory")
    long_context: bool = Field(False, description="long-context recipe for data.seq_len (ALST): RoPE "
                               "extended past the position limit, tiled MLP, layers checkpointed, "
                               "inputs offloaded")
    chunked_loss: bool = Field(True, description="fused chunked LM head + cross-entropy (no full logits)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the GPU has it, fp16 with loss scaling otherwise, fp32 on CPU")


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps, then cosine decay to 10%")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null for none")
    offload: bool = Field(False, description="AdamW state and step on the host (torchao; CUDA)")


class TrainConfig(_Section):
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    micro_batch: int = Field(4, ge=1, description="sequences per forward pass, per process")
    global_batch: int = Field(16, ge=1, description="sequences per optimizer step, over all processes")
    strategy: Literal["single", "ddp", "fsdp2", "zero2", "zero3"] = Field(
        "single", description="single (one process), ddp, fsdp2, or zero2/zero3 (DeepSpeed, Accelerate)")
    reshard: bool = Field(True, description="FSDP2: free gathered weights after forward (less memory)")
    cpu_offload: bool = Field(False, description="FSDP2: parameters, gradients and AdamW on the host")
    eval_every: int = Field(0, ge=0, description="validation loss every N steps (0: at the end only)")
    eval_batches: int = Field(8, ge=1, description="micro-batches per validation")
    seed: int = Field(0, description="model initialisation, data order, dropout")


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="save every N steps (0: at the end only)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are deleted")
    resume: bool = Field(False, description="continue from the output folder's latest checkpoint")


class LogConfig(_Section):
    every: int = Field(1, ge=1, description="log every N steps")
    tensorboard: bool = Field(True, description="TensorBoard event files in <output.dir>/tensorboard")
    progress: bool = Field(True, description="console progress bar with ETA")


class OutputConfig(_Section):
    dir: str = Field("runs/example", description="checkpoints, logs and the trained model go here")
    merge: bool = Field(False, description="also save the adapters merged into the base (safetensors)")


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        if self.optim.offload and self.optim.max_grad_norm is not None:
            raise ValueError("optim.offload keeps the gradients on the host, where clipping the device copy "
                             "does nothing: set optim.max_grad_norm: null, or optim.offload: false")
        if self.model.method == "qlora" and self.train.cpu_offload:
            raise ValueError("model.method: qlora with train.cpu_offload: FSDP2 cannot offload 4-bit weights "
                             "to the host: set train.cpu_offload: false (QLoRA's base is small already)")
        if self.train.cpu_offload and self.train.strategy != "fsdp2":
            raise ValueError(f"train.cpu_offload offloads FSDP2's parameters: set train.strategy: fsdp2 "
                             f"(it is {self.train.strategy!r}), or train.cpu_offload: false")
        if self.optim.offload and self.train.strategy != "single":
            raise ValueError(f"optim.offload (torchao's offloaded AdamW) runs in one process: with "
                             f"train.strategy: {self.train.strategy} set optim.offload: false (FSDP2 "
                             f"offloads parameters and optimizer state with train.cpu_offload: true)")
        if self.train.strategy in DEEPSPEED and self.model.method == "qlora":
            raise ValueError(f"model.method: qlora with train.strategy: {self.train.strategy}: DeepSpeed "
                             f"cannot partition bitsandbytes' 4-bit weights here: set train.strategy: "
                             f"fsdp2 (FSDP-QLoRA) or ddp, or model.method: lora")
        if self.train.strategy in DEEPSPEED and self.model.precision == "fp16":
            raise ValueError(f"model.precision: fp16 with train.strategy: {self.train.strategy}: the "
                             f"DeepSpeed strategies run bf16 or fp32 here: set model.precision: bf16, fp32 "
                             f"or auto")
        if self.model.nf4_base not in ("auto", "bitsandbytes") and self.model.method != "qlora":
            raise ValueError(f"model.nf4_base: {self.model.nf4_base} picks QLoRA's 4-bit base: set "
                             f"model.method: qlora (it is {self.model.method!r}), or leave nf4_base out")
        if self.model.nf4_base not in ("auto", "bitsandbytes") and self.train.strategy != "single":
            raise ValueError(f"model.nf4_base: {self.model.nf4_base} with train.strategy: "
                             f"{self.train.strategy}: only bitsandbytes' base is sharded or replicated "
                             f"here; set model.nf4_base: bitsandbytes, or train.strategy: single")
        if self.model.offload_activations and not self.model.checkpointing:
            raise ValueError("model.offload_activations moves the checkpointed layers' inputs: "
                             "set model.checkpointing: true")
        if self.model.long_context and not self.model.chunked_loss:
            raise ValueError("model.long_context computes the loss in chunks (the [tokens, vocab] logits of "
                             "a long sequence do not fit): set model.chunked_loss: true")
        if self.model.long_context and self.train.strategy != "single":
            raise ValueError(f"model.long_context is the one-GPU recipe: set train.strategy: single (it is "
                             f"{self.train.strategy!r}), or model.long_context: false")
        if self.train.global_batch % self.train.micro_batch:
            raise ValueError(f"train.global_batch={self.train.global_batch} is not a multiple of "
                             f"train.micro_batch={self.train.micro_batch}: change one of them")
        return self


SECTIONS = {name: field.annotation for name, field in RunConfig.model_fields.items()}
# Keys that may differ between a checkpoint and the run that resumes it (how long, how often, where).
# model.compile changes no weight or state; model.nf4_base is checked as the base the run held (checkpoint)
RESUMABLE = {"model.compile", "model.nf4_base", "train.max_steps", "train.eval_every", "checkpoint.every",
             "checkpoint.keep_last",
             "checkpoint.resume", "log.every", "log.tensorboard", "log.progress", "output.dir",
             "output.merge",
             "data.num_workers", "data.cache_dir"}


def keys() -> dict[str, tuple[Any, str]]:
    """Every key as ``section.name`` -> (default, description)."""
    return {f"{section}.{name}": (field.default, field.description or "")
            for section, model in SECTIONS.items() for name, field in model.model_fields.items()}


def _resolve_key(key: str) -> str:
    all_keys = keys()
    if key in all_keys:
        return key
    matches = [k for k in all_keys if k.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise RecipeError(f"{key!r} is in several sections: write one of {matches}")
    near = difflib.get_close_matches(key, [*all_keys, *(k.split(".", 1)[1] for k in all_keys)], n=3)
    raise RecipeError(f"unknown key {key!r}" + (f"; did you mean {' or '.join(near)}?" if near else "")
                      + " (recipes train --help lists every key)")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` with each ``key=value`` set; values are parsed as YAML (``null``, ``1e-4``, ``true``)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not key=value (e.g. lr=1e-4 or train.max_steps=500)")
        key, value = item.split("=", 1)
        section, name = _resolve_key(key.strip()).split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    return raw


def _message(error: pydantic.ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            section = item["loc"][0] if len(item["loc"]) > 1 else None
            pool = [k for k in keys() if section is None or k.startswith(f"{section}.")]
            near = difflib.get_close_matches(where, pool, n=1)
            lines.append(f"unknown key {where!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
        elif item["type"] == "value_error":
            lines.append(str(item["ctx"]["error"]))
        else:
            lines.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines) + "\n(recipes train --help lists every key)"


def validate(raw: dict) -> RunConfig:
    """The typed config of ``raw``, or one RecipeError listing every mistake."""
    try:
        return RunConfig.model_validate(raw)
    except pydantic.ValidationError as error:
        raise RecipeError(_message(error)) from None


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (None: the defaults), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"config {str(path)!r} does not exist (see configs/ for examples)")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a config is a mapping of sections (model:, data:, train: ...)")
    return validate(apply_overrides(raw, list(overrides)))


def _flat(dumped: dict) -> dict[str, Any]:
    """``{"section.name": value}`` of a dumped config."""
    return {f"{section}.{name}": value
            for section, fields in dumped.items() for name, value in fields.items()}


def differences(saved: dict, current: RunConfig) -> list[str]:
    """Keys whose values differ between a checkpoint's config and this run's (resumable keys aside)."""
    before, now = _flat(saved), _flat(current.model_dump())
    return [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in keys()
            if k not in RESUMABLE and before.get(k) != now[k]]


def reference_yaml() -> str:
    """Every key with its default and description, as a commented YAML file."""
    lines = ["# Every key of a `recipes train` config, with its default. Generated by",
             "# recipes_lib.app.config.reference_yaml(); a unit test keeps it in step with the code.", ""]
    for section, model in SECTIONS.items():
        lines.append(f"{section}:")
        for name, field in model.model_fields.items():
            value = yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {name}: {value}".ljust(40) + f"  # {field.description or ''}")
        lines.append("")
    return "\n".join(lines)
