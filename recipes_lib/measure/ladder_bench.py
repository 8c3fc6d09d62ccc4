"""Measure one training step at batch 1 and a given length: peak memory and time, or OOM.

The long-context ladder (``long_context.ladder``) searches each rung's longest trainable length
with this step: one AdamW step of the one training loop (``core.train.optimizer_step``), timed by
the one timer, its peak by the one tracker, running out of memory a row (``oom_as_result``).
"""

from __future__ import annotations

import torch

from ..core import models, train
from ..core.hardware import Hardware
from . import memory, timing


def random_batch(vocab_size: int, seq_len: int, device, seed: int = 0) -> dict:
    """One row of ``seq_len`` random tokens (memory and time do not depend on the values)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (1, seq_len), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids}


def train_step(model, optimizer, seq_len: int, hw: Hardware, fused_head: bool = False,
               budget_bytes: int | None = None, name: str = "", repeats: int = 1) -> dict:
    """One optimizer step at batch 1 and ``seq_len`` tokens: peak bytes, seconds and tokens/s, or OOM.

    With ``repeats`` > 1, ``repeats`` more steps are timed after the measured one: ``seconds`` and
    ``tokens_per_s`` are then their median, with ``_min``/``_max`` over them.

    Args:
        fused_head: the chunked LM head + cross-entropy instead of the model's full logits.
        budget_bytes: a memory budget; a step whose peak exceeds it counts as out of memory (how the
            CPU run, which never runs out, plays the game of a smaller device).
    """
    models.check_seq_len(model, seq_len)  # past the position limit RoPE would extrapolate silently
    row = {"name": name, "seq_len": seq_len, "peak_bytes": None, "seconds": None}
    row |= memory.oom_as_result(lambda: _measure(model, optimizer, seq_len, hw, fused_head, repeats))
    if budget_bytes is not None and row["peak_bytes"] is not None and row["peak_bytes"] > budget_bytes:
        row["oom"] = True
    if not row["oom"]:
        row["tokens_per_s"] = seq_len / row["seconds"]
        row["tokens_per_s_min"] = seq_len / row["seconds_max"]
        row["tokens_per_s_max"] = seq_len / row["seconds_min"]
    return row


def _measure(model, optimizer, seq_len: int, hw: Hardware, fused_head: bool, repeats: int) -> dict:
    batch = random_batch(model.config.vocab_size, seq_len, hw.device)
    states = list(model.parameters()) + list(model.buffers()) + memory.optimizer_tensors(optimizer)

    def step():  # no clipping: the step the ladder has always measured
        train.optimizer_step(model, optimizer, [batch], hw.amp_dtype, max_grad_norm=None,
                             fused_head=fused_head)

    try:
        with memory.peak_memory(hw.device, states) as peak:
            took = timing.Timing.of([timing.seconds(step, hw.device)])
        if repeats > 1:
            took = timing.time_it(step, hw.device, repeats, warmup=0)
    finally:
        optimizer.zero_grad(set_to_none=True)  # a step that ran out of memory leaves gradients behind
    return {"oom": False, "seconds": took.median, "seconds_min": took.low, "seconds_max": took.high,
            "peak_bytes": peak["peak"]}
