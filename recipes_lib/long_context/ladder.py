"""The long-context ladder: how long a sequence one training step can take, rung by rung.

A rung is a set of switches on one model: the attention implementation, activation checkpointing
(every k-th layer, optionally with the saved inputs offloaded to host memory) and the chunked
cross-entropy that never materialises the ``[tokens, vocab]`` logits. ``longest_trainable`` finds
each rung's longest sequence at batch 1 by doubling the length until a step runs out of memory,
then bisecting: running out of memory is a result, not a crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import checkpointing, models, train
from ..core.errors import RecipeError
from ..core.hardware import Hardware
from ..measure import memory


@dataclass(frozen=True)
class Rung:
    """One configuration of the ladder."""

    name: str
    attention: str = "sdpa"               # "eager" materialises the [seq, seq] scores; "sdpa" lets PyTorch pick flash/cuDNN
    checkpoint_every: int | None = None   # None: keep all activations; k: recompute every k-th layer
    chunked_loss: bool = False            # fused chunked LM head + cross-entropy instead of full logits
    offload_activations: bool = False     # checkpointed layers' saved inputs in pinned host memory


def apply(model, rung: Rung) -> None:
    """Switch ``model`` to ``rung``'s attention and checkpointing, in place."""
    model.set_attn_implementation(models.attention_implementation(rung.attention))
    if rung.checkpoint_every:
        checkpointing.enable_checkpointing(model, every=rung.checkpoint_every, offload=rung.offload_activations)
    elif rung.offload_activations:
        raise RecipeError("offload_activations moves the checkpointed layers' inputs: set checkpoint_every too")
    else:
        checkpointing.disable_checkpointing(model)
    model.train()


def random_batch(vocab_size: int, seq_len: int, device, seed: int = 0) -> dict:
    """One row of ``seq_len`` random tokens (memory and time do not depend on the values)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (1, seq_len), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids}


def train_step(model, optimizer, rung: Rung, seq_len: int, hw: Hardware,
               budget_bytes: int | None = None) -> dict:
    """One optimizer step at batch 1 and ``seq_len`` tokens: peak memory and time, or OOM.

    Args:
        budget_bytes: a memory budget; a step whose peak exceeds it counts as out of memory (how the
            CPU run, which never runs out, plays the game of a smaller device).
    """
    models.check_seq_len(model, seq_len)  # past the position limit RoPE would extrapolate silently
    batch = random_batch(model.config.vocab_size, seq_len, hw.device)
    states = list(model.parameters()) + list(model.buffers()) + memory.optimizer_tensors(optimizer)
    row = {"name": rung.name, "seq_len": seq_len, "oom": False, "peak_bytes": None, "seconds": None}
    memory.free_memory()
    try:
        start = time.perf_counter()
        with memory.peak_memory(hw.device, states) as peak:
            train.accumulate_gradients(model, [batch], hw.amp_dtype, fused_head=rung.chunked_loss)
            optimizer.step()
        train.sync(hw.device)
        row.update(seconds=time.perf_counter() - start, peak_bytes=peak["peak"])
    except Exception as error:  # noqa: BLE001 - only OOM becomes a result
        if not memory.is_oom(error):
            raise
        row["oom"] = True
    finally:
        optimizer.zero_grad(set_to_none=True)
        del batch
        memory.free_memory()
    if budget_bytes is not None and row["peak_bytes"] is not None and row["peak_bytes"] > budget_bytes:
        row["oom"] = True
    if not row["oom"]:
        row["tokens_per_s"] = seq_len / row["seconds"]
    return row


def longest_trainable(step: Callable[[int], dict], start: int, limit: int, refine: int = 2,
                      multiple: int = 1024) -> tuple[int | None, list[dict]]:
    """The longest length ``step`` trains without running out of memory, and every probe's row.

    Doubles from ``start`` up to ``limit`` (the model's position limit, probed last) until a step
    runs out of memory, then bisects ``refine`` times between the last fit and the first failure,
    on multiples of ``multiple``. Returns ``(None, rows)`` if even ``start`` does not fit.
    """
    if start < 1 or start > limit:
        raise RecipeError(f"start={start} must be in [1, limit={limit}]")
    lengths, length = [], start
    while length < limit:
        lengths.append(length)
        length *= 2
    lengths.append(limit)
    rows, best, failed = [], None, None
    for length in lengths:
        row = step(length)
        rows.append(row)
        if row["oom"]:
            failed = length
            break
        best = length
    if best is None or failed is None:
        return best, rows
    low, high = best, failed
    for _ in range(refine):
        middle = (low + high) // 2 // multiple * multiple
        if middle <= low:
            break
        row = step(middle)
        rows.append(row)
        low, high = (low, middle) if row["oom"] else (middle, high)
    return low, rows
