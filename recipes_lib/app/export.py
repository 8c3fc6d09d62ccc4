"""``recipes export axolotl CONFIG.yaml``: the same run as an Axolotl config.

``axolotl(cfg, gpus)`` maps every key of a validated ``RunConfig`` (README: the mapping table) and
returns ``(axolotl_config, warnings)``. A key with no Axolotl equivalent is never dropped silently:
when its value is not the default it gets a warning saying what Axolotl does instead; at its default
it is still named, in one note. The keys written are checked against Axolotl's own schema field names
(``data/axolotl_config_keys.txt``, listed from axolotl's ``AxolotlInputConfig`` by
``scripts/axolotl_keys.py``, which also validates a written file with that pydantic schema).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from transformers import AutoConfig

from ..core import models
from ..core.errors import RecipeError
from . import data
from .config import RunConfig, keys

KEYS_FILE = models.REPO_ROOT / "data" / "axolotl_config_keys.txt"
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash_attention_2",
             "flex_attention": "flex_attention"}
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# ZeRO configs inline (Axolotl takes a dict or a path); "auto" lets Accelerate fill batch sizes and clipping.
_DS_COMMON = {"bf16": {"enabled": "auto"}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}
DEEPSPEED = {
    "zero2": {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}},
    "zero3": {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                    "stage3_gather_16bit_weights_on_model_save": True}},
}
# Every key of a run config -> its Axolotl key(s) (README's mapping table is ``mapping_markdown()``).
MAPPING = {
    "model.source": "`base_model`", "model.tokenizer": "`tokenizer_config`",
    "model.method": "`adapter: lora` / `adapter: qlora` + `load_in_4bit: true` (NF4, double quantization); "
                    "full: no adapter",
    "model.lora_r": "`lora_r`", "model.lora_alpha": "`lora_alpha`", "model.lora_dropout": "`lora_dropout`",
    "model.attention": "`attn_implementation`", "model.checkpointing": "`gradient_checkpointing: true`, "
                       "`gradient_checkpointing_kwargs: {use_reentrant: false}`",
    "model.offload_activations": "`activation_offloading: hidden_states`",
    "model.chunked_loss": "`chunked_cross_entropy`",
    "model.compile": "`torch_compile` (Axolotl compiles the whole model; ours compiles each decoder layer)",
    "model.precision": "`bf16: auto` / `bf16: true` / `fp16: true` / both false",
    "data.source": "`datasets[0].path` (+ `ds_type` for a local file)", "data.split": "`datasets[0].split`",
    "data.format": "`datasets[0].type`: `{field_instruction, field_output, format}` / `chat_template` / "
                   "`completion`",
    "data.prompt_column": "`field_instruction`", "data.response_column": "`field_output`",
    "data.messages_column": "`field_messages`", "data.text_column": "`field`",
    "data.train_on_prompt": "`train_on_inputs` (chat: `roles_to_train`)",
    "data.packing": "`sample_packing` (+ `pad_to_sequence_len`)", "data.seq_len": "`sequence_len`",
    "data.validation_fraction": "`val_set_size`", "data.max_examples": "`datasets[0].split: train[:N]`",
    "data.seed": "`seed` (one seed in Axolotl: a warning when it differs from train.seed)",
    "data.cache_dir": "`dataset_prepared_path`", "data.num_workers": "`dataloader_num_workers`",
    "data.pin_memory": "`dataloader_pin_memory`",
    "optim.lr": "`learning_rate`", "optim.weight_decay": "`weight_decay`",
    "optim.warmup_steps": "`warmup_steps`, `lr_scheduler: cosine`, `cosine_min_lr_ratio: 0.1`",
    "optim.max_grad_norm": "`max_grad_norm` (null: 0, no clipping)", "train.max_steps": "`max_steps`",
    "train.micro_batch": "`micro_batch_size`",
    "train.global_batch": "`gradient_accumulation_steps` = global_batch / (micro_batch x --gpus)",
    "train.strategy": "fsdp2: `fsdp_version: 2` + `fsdp_config`; zero2/zero3: `deepspeed` (inline JSON); "
                      "single/ddp: nothing (Axolotl runs DDP on several GPUs)",
    "train.reshard": "`fsdp_config.reshard_after_forward`",
    "train.cpu_offload": "`fsdp_config.offload_params`",
    "train.eval_every": "`eval_steps` (0: not written)", "train.seed": "`seed`",
    "checkpoint.every": "`save_steps` (0: not written)", "checkpoint.keep_last": "`save_total_limit`",
    "checkpoint.resume": "`auto_resume_from_checkpoints`", "log.every": "`logging_steps`",
    "log.tensorboard": "`use_tensorboard`", "output.dir": "`output_dir`",
}
# Keys with no Axolotl equivalent, and what Axolotl does instead.
UNMAPPED = {
    "model.sliding_window": "Axolotl has no sliding-window switch for Llama-family models",
    "model.checkpoint_every": "Axolotl checkpoints every decoder layer",
    "model.nf4_base": "Axolotl's QLoRA base is bitsandbytes' (load_in_4bit), which it writes (auto picks "
                      "torchao's on a bf16 GPU)",
    "model.long_context": "write Axolotl's own switches: `tiled_mlp: true`, `gradient_checkpointing: true`, "
                          "`activation_offloading: true`, and `rope_scaling` past the position limit",
    "optim.offload": "Axolotl has no torchao offloaded AdamW; DeepSpeed ZeRO's offload_optimizer is nearest",
    "train.eval_batches": "Axolotl evaluates the whole validation split",
    "log.progress": "Axolotl always shows the Trainer's progress bar",
    "output.merge": "Axolotl merges adapters after training: axolotl merge-lora CONFIG --lora-model-dir DIR",
}


def mapping_markdown() -> str:
    """The mapping table, one row per key of a run config, as the README shows it."""
    rows = ["| `recipes train` key | Axolotl |", "| --- | --- |"]
    rows += [f"| `{key}` | {MAPPING.get(key) or 'no equivalent (a warning): ' + UNMAPPED[key]} |"
             for key in keys()]
    return "\n".join(rows)


def layer_class(source: str) -> str | None:
    """The decoder layer's class name for FSDP's wrap policy (LlamaForCausalLM -> LlamaDecoderLayer)."""
    try:
        if source.startswith("random:"):  # the shape's file: materialising its weights is not needed here
            shape = json.loads((models.SHAPES_DIR / f"{source.removeprefix('random:')}.json").read_text())
            arch = shape.get("architectures", [None])[0]
        else:
            arch = (AutoConfig.from_pretrained(models.resolve(source)).architectures or [None])[0]
    except Exception:  # an unreachable hub id or a random:<shape> not yet materialised: leave it to Axolotl
        return None
    return arch.replace("ForCausalLM", "DecoderLayer") if arch and arch.endswith("ForCausalLM") else None


def dataset(d: data.DataConfig) -> dict:
    """Axolotl's ``datasets`` entry for our data section."""
    split = d.split if d.max_examples is None else f"{d.split}[:{d.max_examples}]"
    entry = {"path": d.source, "split": split}
    suffix = Path(d.source).suffix.lower()
    if suffix in FILE_TYPES:
        entry["ds_type"] = FILE_TYPES[suffix]
    if d.format == "prompt_response":  # "<prompt> <response>", as recipes train joins them
        entry["type"] = {"field_instruction": d.prompt_column, "field_output": d.response_column,
                         "format": "{instruction} ", "no_input_format": "{instruction} "}
    elif d.format == "chat":
        roles = ["system", "user", "assistant"] if d.train_on_prompt else ["assistant"]
        entry |= {"type": "chat_template", "field_messages": d.messages_column,
                  "chat_template": "tokenizer_default", "roles_to_train": roles}
    else:
        entry |= {"type": "completion", "field": d.text_column}
    return entry


def axolotl(cfg: RunConfig, gpus: int = 1) -> tuple[dict, list[str]]:
    """(the Axolotl config, messages) for ``cfg`` trained on ``gpus`` GPUs; each message starts with
    ``warning:`` (a setting Axolotl will not reproduce) or ``note:``."""
    m, d, o, t, c, lg = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.checkpoint, cfg.log
    if gpus < 1:
        raise RecipeError(f"--gpus={gpus}: give the number of GPUs the Axolotl run will use (1 or more)")
    if t.global_batch % (t.micro_batch * gpus):
        raise RecipeError(f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch="
                          f"{t.micro_batch} x --gpus={gpus}: Axolotl's batch is micro_batch_size x "
                          f"gradient_accumulation_steps x GPUs; change one of them")
    warnings = []
    out: dict = {"base_model": m.source}
    if m.source.startswith("random:"):
        warnings.append(f"warning: model.source={m.source}: random weights are this project's own; set "
                        "base_model to a hub id or a model folder")
    if m.tokenizer:
        out["tokenizer_config"] = m.tokenizer
    if m.method != "full":
        out |= {"adapter": m.method, "lora_r": m.lora_r, "lora_alpha": m.lora_alpha,
                "lora_dropout": m.lora_dropout, "lora_target_linear": True}
    if m.method == "qlora":  # Axolotl's QLoRA: NF4, double quantization, bf16 storage, as ours
        out["load_in_4bit"] = True
    out["attn_implementation"] = ATTENTION[m.attention]
    if m.checkpointing:
        out |= {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if m.offload_activations:
            out["activation_offloading"] = "hidden_states"
    out["chunked_cross_entropy"] = m.chunked_loss
    if m.compile is True:
        out["torch_compile"] = True
    elif m.compile == "auto":
        warnings.append("note: model.compile: auto compiles the decoder layers on a bf16 GPU (full "
                        "fine-tuning, QLoRA); the export leaves Axolotl's torch_compile at its default, off: "
                        "set it true to compile (Axolotl compiles the whole model)")
    out |= {"auto": {"bf16": "auto"}, "bf16": {"bf16": True}, "fp16": {"fp16": True, "bf16": False},
            "fp32": {"bf16": False, "fp16": False}}[m.precision]
    out |= {"datasets": [dataset(d)], "val_set_size": d.validation_fraction, "sequence_len": d.seq_len,
            "sample_packing": d.packing, "train_on_inputs": d.train_on_prompt,
            "dataloader_num_workers": d.num_workers, "dataloader_pin_memory": d.pin_memory}
    if d.packing:
        out["pad_to_sequence_len"] = True
    if d.cache_dir:
        out["dataset_prepared_path"] = d.cache_dir
    if d.seed != t.seed:
        warnings.append(f"warning: data.seed={d.seed} differs from train.seed={t.seed}: Axolotl has one seed "
                        "(train.seed written), so its validation split differs from this run's")
    out |= {"max_steps": t.max_steps, "micro_batch_size": t.micro_batch,
            "gradient_accumulation_steps": t.global_batch // (t.micro_batch * gpus), "seed": t.seed,
            "optimizer": "adamw_torch_fused", "learning_rate": o.lr, "weight_decay": o.weight_decay,
            "lr_scheduler": "cosine", "cosine_min_lr_ratio": 0.1, "warmup_steps": o.warmup_steps,
            "max_grad_norm": 0.0 if o.max_grad_norm is None else o.max_grad_norm}
    out |= _distributed(cfg, warnings)
    if t.eval_every:
        out["eval_steps"] = t.eval_every
    if c.every:
        out["save_steps"] = c.every
    out |= {"save_total_limit": c.keep_last, "auto_resume_from_checkpoints": c.resume,
            "logging_steps": lg.every, "use_tensorboard": lg.tensorboard, "output_dir": cfg.output.dir}
    return out, warnings + _unmapped(cfg)


def _distributed(cfg: RunConfig, warnings: list[str]) -> dict:
    t = cfg.train
    if t.strategy in DEEPSPEED:
        return {"deepspeed": DEEPSPEED[t.strategy] | _DS_COMMON}
    if t.strategy != "fsdp2":
        return {}  # single and DDP: Axolotl runs DDP by itself when launched on several GPUs
    fsdp = {"offload_params": t.cpu_offload, "reshard_after_forward": t.reshard,
            "cpu_ram_efficient_loading": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "FULL_STATE_DICT"}
    layer = layer_class(cfg.model.source)
    if layer is None:
        warnings.append(f"warning: fsdp_config.transformer_layer_cls_to_wrap is not set: the decoder layer "
                        f"class of {cfg.model.source} could not be read here; add it (LlamaDecoderLayer...)")
    else:
        fsdp["transformer_layer_cls_to_wrap"] = layer
    return {"fsdp_version": 2, "fsdp_config": fsdp}


def _unmapped(cfg: RunConfig) -> list[str]:
    """A warning per unmapped key set away from its default; one note naming those left at it."""
    dumped = cfg.model_dump()
    found, quiet = [], []
    for key, why in UNMAPPED.items():
        section, name = key.split(".")
        value, default = dumped[section][name], keys()[key][0]
        reproduced = key == "model.nf4_base" and value == "bitsandbytes"  # Axolotl's own base
        (found.append(f"warning: {key}={value!r} has no Axolotl equivalent: {why}")
         if value != default and not reproduced else quiet.append(key))
    if quiet:
        found.append(f"note: not exported, at their defaults and without an Axolotl key: {', '.join(quiet)}")
    return found


def schema_keys() -> set[str]:
    """Axolotl's top-level config keys (``data/axolotl_config_keys.txt``)."""
    return {line.strip() for line in KEYS_FILE.read_text().splitlines() if line.strip() and line[0] != "#"}


def check_keys(exported: dict) -> None:
    """RecipeError naming any exported key that Axolotl's schema does not have."""
    unknown = sorted(set(exported) - schema_keys())
    if unknown:
        raise RecipeError(f"keys not in Axolotl's config schema: {unknown}: the mapping is out of date")


def check_columns(d: data.DataConfig) -> None:
    """For a local dataset, RecipeError if a column the format reads is missing (the hub is not asked)."""
    if not Path(d.source).expanduser().exists():
        return
    table = data.load_table(d)
    needed = {"prompt_response": [("prompt_column", d.prompt_column), ("response_column", d.response_column)],
              "chat": [("messages_column", d.messages_column)], "text": [("text_column", d.text_column)]}
    for key, column in needed[d.format]:
        if column not in table.column_names:
            raise RecipeError(f"column '{column}' is not in {d.source} (format: {d.format}); its columns are "
                              f"{table.column_names}: set data.{key} to one of them")


def write(cfg: RunConfig, path: str | Path, gpus: int = 1, source: str = "") -> list[str]:
    """Write the Axolotl config of ``cfg`` to ``path``; returns the warnings (also written in its header)."""
    check_columns(cfg.data)
    exported, warnings = axolotl(cfg, gpus)
    check_keys(exported)
    header = [f"# Axolotl config exported by `recipes export axolotl {source}` (--gpus {gpus}).",
              "# Run it with: axolotl train THIS_FILE   (README: the mapping table)"]
    header += [f"# {w}" for w in warnings]
    Path(path).write_text("\n".join(header) + "\n" + yaml.safe_dump(exported, sort_keys=False))
    return warnings
