"""A data-parallel training run on a fixed, seeded global batch: the training script's options and loop.

``main(parse_args(argv))`` runs in each ``torchrun`` worker (or alone, for ``single`` and
``naive-mp``): it joins the process group, builds the strategy (``strategies.build``), runs
``--steps`` optimizer steps of ``step.train_step`` on this rank's slice of every global batch, and
reports one result per rank (``context.report_result``): loss and gradient norm per step, memory,
tokens/s (at the median timed step, with its min-max over the timed steps, and each timed step's
seconds on this rank: ``step_speed``). Memory (CUDA only): the peak over the steps after ``--warmup``,
the bytes allocated right after the last backward (weights, gradients and optimizer state: the
activations are gone), and the bytes of the rank's weights and optimizer state. Step times come
from the ``timer`` the caller passes (``measure.timing.stepper``); progress goes to its ``on_step``.
``--timeline-steps`` more steps (after ``--timeline-warmup`` traced and thrown away) then run under
torch.profiler (``measure.timeline``): compute, communication and exposed communication per step,
outside every figure above.

Several runs, their options separated by ``--then`` (``parse_runs``), run one after another in the
same processes and process group: one start-up (python, torch, transformers, the rendezvous) for all.
Each rank then reports ``{"runs": [result, ...]}``; a run's ``RecipeError`` (every rank raises it
alike: its options' checks, or a strategy this machine cannot run, before any training step) becomes
that run's ``{"strategy", "error"}`` and the next run goes on.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from collections.abc import Callable

import torch

from ..core import models, train
from ..core.errors import RecipeError
from ..core.hardware import detect
from ..measure import memory, timeline
from ..measure.timing import Timing
from . import context, ddp, fsdp2, step, strategies
from .batches import global_batches, rank_micro_batches
from .runs import RUN_SEPARATOR

Clock = Callable[[Callable[[], object]], float]


def parse_args(argv=None) -> argparse.Namespace:
    """The training script's options (``scripts/train_distributed.py --help``)."""
    parser = argparse.ArgumentParser(description="Train a causal LM on several processes")
    add = parser.add_argument
    add("--model", default=models.DEFAULT_MODEL, help="local path, hub id or random:<shape>")
    add("--strategy", choices=strategies.STRATEGIES, default="fsdp2")
    add("--steps", type=int, default=4, help="optimizer steps, --warmup ones included")
    add("--warmup", type=int, default=1, help="first steps left out of timing and memory")
    add("--global-batch", type=int, default=8, help="rows per optimizer step, all ranks together")
    add("--micro-batch", type=int, default=2, help="rows per forward/backward on one rank")
    add("--seq-len", type=int, default=64)
    add("--full-rows", action="store_true", help="every row a whole seq-len document (speed runs)")
    add("--lr", type=float, default=1e-3)
    add("--max-grad-norm", type=float, default=1.0)
    add("--bf16", action="store_true", help="bf16 compute (FSDP2 MixedPrecisionPolicy / autocast)")
    add("--loss", choices=("fused", "full"), default="fused",
        help="fused: chunked LM head + cross-entropy, never the whole logits; full: model logits")
    add("--compile", action="store_true", help="torch.compile every decoder layer")
    add("--checkpointing", action="store_true", help="recompute each layer's activations")
    add("--lora-r", type=int, default=16, help="LoRA rank for --strategy fsdp2-qlora")
    add("--deepspeed-config", default=None, help="a DeepSpeed JSON config (default: built here)")
    add("--seed", type=int, default=0)
    add("--save-params", default=None, help="rank 0 saves the final full state dict here")
    add("--timeline-steps", type=int, default=0,
        help="then this many more steps under torch.profiler: compute, communication and exposed "
             "communication per step (measure.timeline); not in the losses, times or memory")
    add("--timeline-warmup", type=int, default=1,
        help="steps traced before the --timeline-steps and thrown away (tracing's first step costs most)")
    add("--trace", default=None, help="rank 0 writes the --timeline-steps' Chrome trace here")
    return parser.parse_args(argv)


def parse_runs(argv=None) -> list[argparse.Namespace]:
    """The options of each run, for several runs separated by ``--then`` (each with its own options)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    segments: list[list[str]] = [[]]
    for arg in argv:
        if arg == RUN_SEPARATOR:
            segments.append([])
        else:
            segments[-1].append(arg)
    return [parse_args(segment) for segment in segments]


def train_rank(args, ctx: context.Context, timer: Callable[[torch.device], Clock] | None = None,
               on_step: Callable[[int, float, float | None, int], None] | None = None
               ) -> tuple[dict, torch.nn.Module]:
    """Build the strategy, train ``args.steps`` steps; returns this rank's result and the trained model.

    Args:
        timer: ``device -> clock`` (``measure.timing.stepper``) that times each step; None: no times.
        on_step: ``(step_index, loss, seconds, tokens) -> None`` after every step, on the main rank.
    """
    ds_config = strategies.check(args, ctx.world_size)
    model, optimizer, (trainable, n_params) = strategies.build(args, ctx, ds_config)
    vocab = models.unwrap(model).config.vocab_size
    devices = strategies.devices_of(args, ctx)
    mem = memory.DeviceMemory(devices)
    clock = timer(devices[0]) if timer else None
    autocast = strategies.autocast_dtype(args)
    losses, grad_norms, step_seconds, step_tokens = [], [], [], []
    profiled_steps = args.timeline_warmup + args.timeline_steps if args.timeline_steps else 0
    every_step = global_batches(args.steps + profiled_steps, args.global_batch, args.seq_len, vocab,
                                args.seed, args.full_rows)

    def one_step(batch, probe=None, results=None):  # a step ends when every device is done
        micro = rank_micro_batches(batch, ctx.rank, ctx.world_size, args.micro_batch)
        result = step.train_step(model, optimizer, micro, devices[0], autocast, args.max_grad_norm,
                                 after_backward=probe)
        for d in devices:
            train.sync(d)
        if results is not None:
            results.append(result)

    for index, batch in enumerate(every_step[:args.steps]):
        if index == args.warmup and mem.on_gpu:
            mem.reset_peaks()
        probe = mem.read_after_backward if mem.on_gpu and index >= args.warmup else None
        results = []

        def measured_step(batch=batch, probe=probe, results=results):
            one_step(batch, probe, results)

        if clock is not None:
            step_seconds.append(clock(measured_step))
        else:
            measured_step()
        losses.append(results[0].loss)
        grad_norms.append(results[0].grad_norm)
        step_tokens.append(int(batch["attention_mask"].sum()))
        if on_step is not None and ctx.is_main:
            on_step(index, losses[-1], step_seconds[-1] if clock else None, step_tokens[-1])
    peaks = mem.peaks()
    profiled = iter(every_step[args.steps:])
    trace = args.trace if ctx.is_main else None
    steps_timeline = None
    if args.timeline_steps:
        steps_timeline = timeline.summary(timeline.profile_steps(
            lambda: one_step(next(profiled)), args.timeline_steps, devices[0], trace, args.timeline_warmup))
        steps_timeline["trace"] = trace
    per_device = len(devices) > 1  # naive model parallelism: each GPU's own share
    # On the rank's accelerator only (FSDP2's CPU offload keeps its shards in host memory).
    where = devices[0] if mem.on_gpu and not per_device else None
    tokens = statistics.median(step_tokens[args.warmup:])
    speed = step_speed(Timing.of(step_seconds, skip=args.warmup) if clock else None, tokens)
    return dict(
        strategy=args.strategy, world_size=ctx.world_size, device=str(ctx.device), losses=losses,
        grad_norms=grad_norms, param_bytes=memory.param_bytes(model, where),
        optimizer_bytes=memory.optimizer_bytes(optimizer, where),
        after_backward_bytes=mem.after_backward if mem.on_gpu else None,
        peak_bytes=peaks[0], device_peaks=peaks if per_device else None,
        device_param_bytes=[memory.param_bytes(model, d) for d in devices] if per_device else None,
        device_optimizer_bytes=([memory.optimizer_bytes(optimizer, d) for d in devices]
                                if per_device else None),
        **speed, tokens_per_step=tokens, n_params=n_params, trainable_params=trainable,
        # the baseline's engine settings: DDP's options, or the DeepSpeed config as DeepSpeed got it
        engine_config=ddp.settings(model) or ds_config,
        bf16=args.bf16, compiled=args.compile, loss=args.loss, micro_batch=args.micro_batch,
        global_batch=args.global_batch, seq_len=args.seq_len, timeline=steps_timeline,
    ), model


def step_speed(steps: Timing | None, tokens: float) -> dict:
    """A rank's timed steps (after warm-up) as result keys: each step's seconds, their median and
    min-max, and tokens/s of the global batch (all ranks) at the median step and at the slowest and
    fastest ones (``tokens_per_s_min`` / ``_max``, as ``measure.bench.speed_ratio`` reads them)."""
    if steps is None:
        return dict.fromkeys(("step_times", "step_seconds", "step_seconds_min", "step_seconds_max",
                              "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max"))
    return dict(step_times=list(steps.samples), step_seconds=steps.median, step_seconds_min=steps.low,
                step_seconds_max=steps.high, **steps.per_second(tokens))


def main(args: argparse.Namespace | list[argparse.Namespace],
         timer: Callable[[torch.device], Clock] | None = None,
         progress: Callable[[argparse.Namespace], Callable] | None = None) -> dict:
    """Train in this process (a torchrun worker, or alone) and report the result; returns it.

    Args:
        args: one run's options, or a list of several runs' (``parse_runs``; module docstring).
        progress: ``args -> on_step`` (``train_rank``) for each run; None: no progress.
    """
    in_torchrun = "RANK" in os.environ
    ctx = context.setup() if in_torchrun else context.Context(0, 1, 0, detect().device)
    try:
        if isinstance(args, list):
            result = {"runs": [_one_of_runs(a, ctx, timer, progress, f"{i + 1}/{len(args)}")
                               for i, a in enumerate(args)]}
        else:
            result = _train_and_save(args, ctx, timer, progress)
        context.report_result(ctx, **result)
    except BaseException:
        context.cleanup(barrier=False)
        raise
    context.cleanup()
    return result


def _train_and_save(args, ctx: context.Context, timer, progress) -> dict:
    result, model = train_rank(args, ctx, timer, progress(args) if progress else None)
    # Gathering every weight to the CPU takes seconds at 1B parameters: only for --save-params.
    state = fsdp2.full_state_dict(model) if args.save_params else None
    if args.save_params and ctx.is_main:
        torch.save(state, args.save_params)
    return result


def _one_of_runs(args, ctx: context.Context, timer, progress, which: str) -> dict:
    """One run of several; a RecipeError becomes its ``error`` (module docstring)."""
    if ctx.is_main:
        print(f"run {which}: --strategy {args.strategy}", flush=True)
    try:
        return _train_and_save(args, ctx, timer, progress)
    except RecipeError as error:
        return {"strategy": args.strategy, "error": f"RecipeError: {error}"}
    finally:  # the next run starts from a clean slate: nothing of this one's model stays allocated
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
