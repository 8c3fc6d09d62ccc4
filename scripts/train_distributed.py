"""Train a causal LM data-parallel (DDP or FSDP2) on a fixed, seeded global batch; report per rank.

    torchrun --standalone --nproc-per-node 2 scripts/train_distributed.py --strategy fsdp2 --steps 4
    python scripts/train_distributed.py --strategy single        # the one-process reference

Every step's global batch (``--global-batch`` padded rows of random tokens, documents of random
length, so ranks hold different numbers of real tokens) is the same whatever the number of
processes; rank r trains on its slice of rows, ``--micro-batch`` rows at a time. Each rank prints
one ``RESULT {json}`` line (loss per step, parameter checksum, memory, tokens/s) that
``recipes_lib.distributed.launch`` reads back; ``--save-params`` writes the final full weights.
The same script runs on CPU with gloo (CI) and on GPUs with NCCL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.distributed as dist

import recipes_lib
from recipes_lib import data, distributed, measure, models
from recipes_lib.hardware import RecipeError, detect

recipes_lib.quiet()  # no weight-loading bars or known-harmless warnings in every rank's output

STRATEGIES = ("single", "ddp", "fsdp2", "fsdp2-no-reshard", "fsdp2-offload")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="local path, hub id or random:<shape>")
    parser.add_argument("--strategy", choices=STRATEGIES, default="fsdp2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8, help="rows per optimizer step, all ranks together")
    parser.add_argument("--micro-batch", type=int, default=2, help="rows per forward/backward on one rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (FSDP2 MixedPrecisionPolicy / autocast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-params", default=None, help="rank 0 saves the final full state dict here")
    return parser.parse_args(argv)


def global_batches(args, vocab_size: int) -> list[dict]:
    """The padded global batch of every step: identical on every rank and for every world size."""
    def step_docs(step: int):  # seeded per step, so step s's batch does not depend on --steps
        return data.random_documents(args.global_batch, vocab_size, min_len=max(2, args.seq_len // 4),
                                     max_len=args.seq_len, seed=args.seed * 1_000_003 + step)
    return [data.pad_batch(step_docs(s), pad_id=0, pad_to=args.seq_len) for s in range(args.steps)]


def rank_micro_batches(batch: dict, rank: int, world_size: int, micro_batch: int) -> list[dict]:
    """This rank's contiguous slice of the global batch, cut into micro-batches."""
    rows = batch["input_ids"].shape[0]
    if rows % (world_size * micro_batch):
        raise RecipeError(f"--global-batch {rows} must be a multiple of processes x --micro-batch "
                          f"({world_size} x {micro_batch})")
    per_rank = rows // world_size
    start = rank * per_rank
    return [{k: v[i:i + micro_batch] for k, v in batch.items()} for i in range(start, start + per_rank, micro_batch)]


def build(args, ctx: distributed.Context) -> torch.nn.Module:
    """Load the model in fp32 (the master weights) and wrap it for the strategy."""
    if ctx.is_main:
        models.resolve(args.model)  # materialise a random:<shape> once, before every rank reads it
    if dist.is_initialized():
        dist.barrier()
    torch.manual_seed(args.seed)
    model = models.load_model(args.model, dtype=torch.float32, hw=detect(str(ctx.device)))
    if args.strategy == "ddp":
        return distributed.wrap_ddp(model, ctx)
    if args.strategy.startswith("fsdp2"):
        return distributed.shard_fsdp2(model, reshard_after_forward=args.strategy != "fsdp2-no-reshard",
                                       mixed_precision=args.bf16, cpu_offload=args.strategy == "fsdp2-offload")
    if ctx.world_size != 1:
        raise RecipeError("--strategy single runs one process; launch it with nproc=1 or plain python")
    return model


def run(args) -> dict:
    """Train and return this rank's result (also printed as a RESULT line)."""
    in_torchrun = "RANK" in os.environ
    ctx = distributed.setup() if in_torchrun else distributed.Context(0, 1, 0, detect().device)
    try:
        model = build(args, ctx)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        vocab = (model.module if hasattr(model, "module") else model).config.vocab_size
        autocast = torch.bfloat16 if args.bf16 and args.strategy in ("single", "ddp") else None
        step_losses, grad_norms, step_seconds, step_tokens = [], [], [], []
        # No CPU peak under FSDP2: measure.peak_memory's CPU tracker fails on its parameters ("access the
        # data pointer on an invalid python storage"; FSDP2 frees gathered weights by resizing storages).
        no_peak = ctx.device.type == "cpu" and args.strategy.startswith("fsdp2")
        with contextlib.nullcontext({}) if no_peak else measure.peak_memory(ctx.device, model.parameters()) as peak:
            for batch in global_batches(args, vocab):
                micro = rank_micro_batches(batch, ctx.rank, ctx.world_size, args.micro_batch)
                start = time.perf_counter()
                step = distributed.train_step(model, optimizer, micro, ctx.device, autocast, args.max_grad_norm)
                step_losses.append(step.loss)
                grad_norms.append(step.grad_norm)
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                step_seconds.append(time.perf_counter() - start)
                step_tokens.append(int(batch["attention_mask"].sum()))
                if ctx.is_main:  # live progress, one line per step
                    print(f"step {len(step_losses)}/{args.steps} | loss {step.loss:.4f} | "
                          f"{step_seconds[-1]:.2f} s | {step_tokens[-1] / step_seconds[-1]:,.0f} tokens/s", flush=True)
        state = distributed.full_state_dict(model)
        opt_state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        seconds = statistics.median(step_seconds[1:] or step_seconds)
        result = dict(
            strategy=args.strategy, world_size=ctx.world_size, device=str(ctx.device), losses=step_losses,
            grad_norms=grad_norms,
            checksum=float(sum(v.double().sum() for v in state.values())),
            param_bytes=distributed.local_bytes(model.parameters()),
            optimizer_bytes=distributed.local_bytes(opt_state),
            peak_bytes=peak.get("peak"),
            tokens_per_s=statistics.median(step_tokens) / seconds,  # global batch tokens, all ranks together
        )
        if args.save_params and ctx.is_main:
            torch.save(state, args.save_params)
        distributed.report_result(ctx, **result)
    except BaseException:
        distributed.cleanup(barrier=False)
        raise
    distributed.cleanup()
    return result


if __name__ == "__main__":
    run(parse_args())
