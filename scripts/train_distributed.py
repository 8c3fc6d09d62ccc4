"""Train a causal LM on several processes (DDP, FSDP2, FSDP-QLoRA, DeepSpeed ZeRO) on a fixed, seeded global batch.

    torchrun --standalone --nproc-per-node 2 scripts/train_distributed.py --strategy fsdp2 --steps 4
    torchrun --standalone --nproc-per-node 2 scripts/train_distributed.py --strategy deepspeed-zero3 --bf16
    python scripts/train_distributed.py --strategy single        # the one-process reference
    python scripts/train_distributed.py --strategy naive-mp      # one process, layers spread over the GPUs

Every step's global batch (``--global-batch`` padded rows of random tokens, documents of random
length, so ranks hold different numbers of real tokens) is the same whatever the number of
processes; rank r trains on its slice of rows, ``--micro-batch`` rows at a time. Each rank prints
one ``RESULT {json}`` line (loss and gradient norm per step, memory, tokens/s) that
``recipes_lib.launcher.launch`` reads back; ``--save-params`` writes the final full weights.
Memory (CUDA only): the peak over the steps after ``--warmup``, the bytes allocated right after the
last backward (weights, gradients and optimizer state: the activations are gone), and the bytes of
the rank's weights and optimizer state, from which the notebook derives the breakdown.
The same script runs on CPU with gloo (CI) and on GPUs with NCCL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import recipes_lib
from recipes_lib.core import batches, checkpointing, models, train
from recipes_lib.core.errors import RecipeError
from recipes_lib.core.hardware import detect
from recipes_lib.measure import memory
from recipes_lib.memory import qlora
from recipes_lib.parallel import context, ddp, fsdp2, model_parallel, step, zero

recipes_lib.quiet()  # no weight-loading bars or known-harmless warnings in every rank's output

STRATEGIES = ("single", "ddp", "fsdp2", "fsdp2-no-reshard", "fsdp2-offload", "fsdp2-qlora",
              "deepspeed-zero2", "deepspeed-zero3", "naive-mp")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="local path, hub id or random:<shape>")
    parser.add_argument("--strategy", choices=STRATEGIES, default="fsdp2")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps, --warmup ones included")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of timing and memory")
    parser.add_argument("--global-batch", type=int, default=8, help="rows per optimizer step, all ranks together")
    parser.add_argument("--micro-batch", type=int, default=2, help="rows per forward/backward on one rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--full-rows", action="store_true", help="every row a whole seq-len document (speed runs)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (FSDP2 MixedPrecisionPolicy / autocast)")
    parser.add_argument("--loss", choices=("fused", "full"), default="fused",
                        help="fused: chunked LM head + cross-entropy, never the whole logits; full: model logits")
    parser.add_argument("--compile", action="store_true", help="torch.compile every decoder layer")
    parser.add_argument("--checkpointing", action="store_true", help="recompute each layer's activations")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank for --strategy fsdp2-qlora")
    parser.add_argument("--deepspeed-config", default=None, help="a DeepSpeed JSON config (default: built here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-params", default=None, help="rank 0 saves the final full state dict here")
    return parser.parse_args(argv)


def global_batches(args, vocab_size: int) -> list[dict]:
    """The padded global batch of every step: identical on every rank and for every world size."""
    min_len = args.seq_len if args.full_rows else max(2, args.seq_len // 4)

    def step_docs(step: int):  # seeded per step, so step s's batch does not depend on --steps
        return batches.random_documents(args.global_batch, vocab_size, min_len=min_len,
                                     max_len=args.seq_len, seed=args.seed * 1_000_003 + step)
    return [batches.pad_batch(step_docs(s), pad_id=0, pad_to=args.seq_len) for s in range(args.steps)]


def rank_micro_batches(batch: dict, rank: int, world_size: int, micro_batch: int) -> list[dict]:
    """This rank's contiguous slice of the global batch, cut into micro-batches."""
    rows = batch["input_ids"].shape[0]
    if rows % (world_size * micro_batch):
        raise RecipeError(f"--global-batch {rows} must be a multiple of processes x --micro-batch "
                          f"({world_size} x {micro_batch})")
    per_rank = rows // world_size
    start = rank * per_rank
    return [{k: v[i:i + micro_batch] for k, v in batch.items()} for i in range(start, start + per_rank, micro_batch)]


def check_args(args, world_size: int) -> dict | None:
    """Refuse inconsistent arguments before any model loads; returns the DeepSpeed config, if any."""
    if args.global_batch % (world_size * args.micro_batch):
        raise RecipeError(f"--global-batch {args.global_batch} must be a multiple of processes x --micro-batch "
                          f"({world_size} x {args.micro_batch})")
    if args.warmup >= args.steps:
        raise RecipeError(f"--steps {args.steps} leaves nothing to measure after --warmup {args.warmup}")
    if args.strategy in ("single", "naive-mp") and world_size != 1:
        raise RecipeError(f"--strategy {args.strategy} runs one process; launch it with nproc=1 or plain python")
    if not args.strategy.startswith("deepspeed"):
        return None
    accum = args.global_batch // (world_size * args.micro_batch)
    stage = int(args.strategy[-1])
    config = (zero.load_deepspeed_config(args.deepspeed_config) if args.deepspeed_config else
              zero.deepspeed_config(stage, args.micro_batch, accum, world_size, args.max_grad_norm, args.bf16))
    zero.check_deepspeed_config(config, args.micro_batch, accum, world_size)
    if config["zero_optimization"]["stage"] != stage:
        raise RecipeError(f"--strategy {args.strategy} but the DeepSpeed config sets zero_optimization.stage="
                          f"{config['zero_optimization']['stage']}")
    for key, value in {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": accum,
                       "train_batch_size": args.global_batch}.items():
        config[key] = value  # fills "auto"
    return config


def load(args, device: torch.device) -> torch.nn.Module:
    """The model for the strategy, as a ``LossModel``: fp32 master weights, or an NF4 base + LoRA."""
    torch.manual_seed(args.seed)
    if args.strategy == "fsdp2-qlora":
        # NF4 values stored in bf16 words, so FSDP2 can shard them like any bf16 weight (it cannot
        # make a uint8 tensor a parameter); bitsandbytes restores the quantization state per layer.
        lm = qlora.qlora_model(args.model, r=args.lora_r, hw=detect(str(device)), quant_storage=torch.bfloat16)
    else:
        where = "cpu" if args.strategy == "naive-mp" else str(device)
        lm = models.load_model(args.model, dtype=torch.float32, hw=detect(where))
    if args.checkpointing:
        checkpointing.enable_checkpointing(lm)
    if args.compile:
        fsdp2.compile_layers(lm)
    return train.LossModel(lm, fused_head=args.loss == "fused")


def build(args, ctx: context.Context, ds_config: dict | None):
    """Load the model and wrap it for the strategy; returns (model, optimizer, (trainable, total) parameters)."""
    if ctx.is_main:
        models.resolve(args.model)  # materialise a random:<shape> once, before every rank reads it
    if dist.is_initialized():
        dist.barrier()
    model = load(args, ctx.device)
    counts = models.count_parameters(model.lm)  # before wrapping: 4-bit weights still know their size
    if args.strategy == "ddp":
        model = ddp.wrap_ddp(model, ctx)
    elif args.strategy.startswith("fsdp2"):
        model = fsdp2.shard_fsdp2(model, reshard_after_forward=args.strategy != "fsdp2-no-reshard",
                                        mixed_precision=args.bf16, cpu_offload=args.strategy == "fsdp2-offload")
    elif args.strategy == "naive-mp":
        if torch.cuda.device_count() < 2:
            raise RecipeError("--strategy naive-mp spreads the layers over the GPUs: it needs at least 2")
        model_parallel.split_across_devices(model.lm, [f"cuda:{i}" for i in range(torch.cuda.device_count())])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    if ds_config is not None:
        model, optimizer = zero.wrap_deepspeed(model, optimizer, ds_config)
    return model, optimizer, counts


def devices_of(args, ctx) -> list[torch.device]:
    """The devices this rank's memory is read on (all GPUs for naive model parallelism)."""
    if args.strategy == "naive-mp":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [ctx.device]


def run(args) -> dict:
    """Train and return this rank's result (also printed as a RESULT line)."""
    in_torchrun = "RANK" in os.environ
    ctx = context.setup() if in_torchrun else context.Context(0, 1, 0, detect().device)
    try:
        ds_config = check_args(args, ctx.world_size)
        model, optimizer, (trainable, n_params) = build(args, ctx, ds_config)
        vocab = models.unwrap(model).config.vocab_size
        autocast = torch.bfloat16 if args.bf16 and args.strategy in ("single", "ddp", "naive-mp") else None
        devices = devices_of(args, ctx)
        on_gpu = devices[0].type == "cuda"
        after_backward_bytes = [0] * len(devices)

        def after_backward():  # gradients alive, activations gone
            for i, d in enumerate(devices):
                after_backward_bytes[i] = max(after_backward_bytes[i], torch.cuda.memory_allocated(d))

        step_losses, grad_norms, step_seconds, step_tokens = [], [], [], []
        peaks = [None] * len(devices)
        for index, batch in enumerate(global_batches(args, vocab)):
            if index == args.warmup and on_gpu:  # warm-up done: optimizer state exists, kernels chosen
                for d in devices:
                    torch.cuda.synchronize(d)
                    torch.cuda.reset_peak_memory_stats(d)
            micro = rank_micro_batches(batch, ctx.rank, ctx.world_size, args.micro_batch)
            start = time.perf_counter()
            result = step.train_step(model, optimizer, micro, devices[0], autocast, args.max_grad_norm,
                                          after_backward=after_backward if on_gpu and index >= args.warmup else None)
            for d in devices:
                if d.type == "cuda":
                    torch.cuda.synchronize(d)
            step_seconds.append(time.perf_counter() - start)
            step_losses.append(result.loss)
            grad_norms.append(result.grad_norm)
            step_tokens.append(int(batch["attention_mask"].sum()))
            if ctx.is_main:  # live progress, one line per step
                print(f"step {len(step_losses)}/{args.steps} | loss {result.loss:.4f} | "
                      f"{step_seconds[-1]:.2f} s | {step_tokens[-1] / step_seconds[-1]:,.0f} tokens/s", flush=True)
        if on_gpu:
            peaks = [torch.cuda.max_memory_allocated(d) for d in devices]
        per_device = len(devices) > 1  # naive model parallelism: each GPU's own share
        device_params = [memory.param_bytes(model, d) for d in devices] if per_device else None
        device_optimizer = [memory.optimizer_bytes(optimizer, d) for d in devices] if per_device else None
        # Gathering every weight to the CPU takes seconds at 1B parameters: only for --save-params.
        state = fsdp2.full_state_dict(model) if args.save_params else None
        seconds = statistics.median(step_seconds[args.warmup:])
        result = dict(
            strategy=args.strategy, world_size=ctx.world_size, device=str(ctx.device), losses=step_losses,
            grad_norms=grad_norms,
            # On the rank's accelerator only (FSDP2's CPU offload keeps its shards in host memory).
            param_bytes=memory.param_bytes(model, devices[0] if on_gpu and not per_device else None),
            optimizer_bytes=memory.optimizer_bytes(optimizer, devices[0] if on_gpu and not per_device else None),
            after_backward_bytes=after_backward_bytes if on_gpu else None,
            peak_bytes=peaks[0], device_peaks=peaks if per_device else None,
            device_param_bytes=device_params, device_optimizer_bytes=device_optimizer,
            step_seconds=seconds,
            tokens_per_s=statistics.median(step_tokens[args.warmup:]) / seconds,  # global batch, all ranks
            tokens_per_step=statistics.median(step_tokens[args.warmup:]),
            n_params=n_params, trainable_params=trainable,
            bf16=args.bf16, compiled=args.compile, loss=args.loss, micro_batch=args.micro_batch,
            global_batch=args.global_batch, seq_len=args.seq_len,
        )
        if args.save_params and ctx.is_main:
            torch.save(state, args.save_params)
        context.report_result(ctx, **result)
    except BaseException:
        context.cleanup(barrier=False)
        raise
    context.cleanup()
    return result


if __name__ == "__main__":
    run(parse_args())
