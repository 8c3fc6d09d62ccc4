"""The training script's strategies: check a run's arguments, load the model, wrap it for the strategy.

``STRATEGIES``: one process (``single``), DDP, FSDP2 (resharding or not, CPU offload, over a 4-bit
base), DeepSpeed ZeRO-2/3, and naive model parallelism (one process, layers spread over the GPUs).
``args`` is the script's options (``parallel.run.parse_args``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core import checkpointing, models, speed, train
from ..core.errors import RecipeError
from ..core.hardware import detect
from ..memory import qlora
from . import ddp, fsdp2, model_parallel, zero
from .batches import check_divisible
from .context import Context

STRATEGIES = ("single", "ddp", "fsdp2", "fsdp2-no-reshard", "fsdp2-offload", "fsdp2-qlora",
              "deepspeed-zero2", "deepspeed-zero3", "naive-mp")


def check(args, world_size: int) -> dict | None:
    """Refuse inconsistent arguments before any model loads; returns the DeepSpeed config, if any."""
    check_divisible(args.global_batch, world_size, args.micro_batch)
    if args.warmup >= args.steps:
        raise RecipeError(f"--steps {args.steps} leaves nothing to measure after --warmup {args.warmup}")
    if args.strategy in ("single", "naive-mp") and world_size != 1:
        raise RecipeError(f"--strategy {args.strategy} runs one process; launch it with nproc=1 or plain "
                          f"python")
    if not args.strategy.startswith("deepspeed"):
        return None
    accum = args.global_batch // (world_size * args.micro_batch)
    stage = int(args.strategy[-1])
    if args.deepspeed_config:
        config = zero.load_deepspeed_config(args.deepspeed_config)
    else:
        config = zero.deepspeed_config(stage, args.micro_batch, accum, world_size, args.max_grad_norm,
                                       args.bf16)
    zero.check_deepspeed_config(config, args.micro_batch, accum, world_size)
    if config["zero_optimization"]["stage"] != stage:
        raise RecipeError(f"--strategy {args.strategy} but the DeepSpeed config sets zero_optimization.stage="
                          f"{config['zero_optimization']['stage']}")
    sizes = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": accum,
             "train_batch_size": args.global_batch}
    for key, value in sizes.items():
        config[key] = value  # fills "auto"
    return config


def load(args, device: torch.device) -> torch.nn.Module:
    """The model for the strategy, as a ``LossModel``: fp32 master weights, or an NF4 base + LoRA."""
    torch.manual_seed(args.seed)
    if args.strategy == "fsdp2-qlora":
        # NF4 values stored in bf16 words, so FSDP2 can shard them like any bf16 weight (it cannot
        # make a uint8 tensor a parameter); bitsandbytes restores the quantization state per layer.
        lm = qlora.qlora_model(args.model, r=args.lora_r, hw=detect(str(device)),
                               quant_storage=torch.bfloat16, base="bitsandbytes", compiled=False)
    else:
        where = "cpu" if args.strategy == "naive-mp" else str(device)
        lm = models.load_model(args.model, dtype=torch.float32, hw=detect(where))
    if args.checkpointing:
        checkpointing.enable_checkpointing(lm)
    if args.compile:
        speed.compile_layers(lm)
    return train.LossModel(lm, fused_head=args.loss == "fused")


def build(args, ctx: Context, ds_config: dict | None):
    """Load the model and wrap it for the strategy; returns (model, optimizer, (trainable, total) params).

    ``ds_config`` (from ``check``) is completed in place with the ZeRO-3 keys tuned for the model.
    """
    if ctx.is_main:
        models.resolve(args.model)  # materialise a random:<shape> once, before every rank reads it
    if dist.is_initialized():
        dist.barrier()
    model = load(args, ctx.device)
    counts = models.count_parameters(model.lm)  # before wrapping: 4-bit weights still know their size
    if args.strategy == "ddp":
        accum = args.global_batch // (ctx.world_size * args.micro_batch)
        model = ddp.wrap_ddp(model, ctx, micro_batches_per_step=accum)
    elif args.strategy.startswith("fsdp2"):
        model = fsdp2.shard_fsdp2(model, reshard_after_forward=args.strategy != "fsdp2-no-reshard",
                                  mixed_precision=args.bf16, cpu_offload=args.strategy == "fsdp2-offload")
    elif args.strategy == "naive-mp":
        if torch.cuda.device_count() < 2:
            raise RecipeError("--strategy naive-mp spreads the layers over the GPUs: it needs at least 2")
        model_parallel.split_across_devices(model.lm, [f"cuda:{i}" for i in range(torch.cuda.device_count())])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    if ds_config is not None:  # ZeRO-3's buckets and persistence fitted to the model (zero.tune)
        model, optimizer = zero.wrap_deepspeed(model, optimizer, zero.tune(ds_config, model))
    return model, optimizer, counts


def devices_of(args, ctx: Context) -> list[torch.device]:
    """The devices this rank's memory is read on (all GPUs for naive model parallelism)."""
    if args.strategy == "naive-mp":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [ctx.device]


def autocast_dtype(args) -> torch.dtype | None:
    """bf16 autocast where the engine does not cast itself (FSDP2's policy and DeepSpeed's bf16 mode do)."""
    return torch.bfloat16 if args.bf16 and args.strategy in ("single", "ddp", "naive-mp") else None
