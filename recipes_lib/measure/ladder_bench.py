"""Measure one training step at batch 1 and a given length: peak memory and time, or OOM.

The long-context ladder (``long_context.ladder``) searches each rung's longest trainable length
with this step: one AdamW step of the one training loop (``core.train.optimizer_step``), timed by
the one timer, its peak by the one tracker, running out of memory a row (``oom_as_result``). Beside the
device's peak, a step on CUDA reports the pinned host memory it held (offloaded activations), and
every step that fits its model FLOPs utilisation (``flops.mfu``, None without a datasheet peak).
``step_time_split`` profiles the same step once and splits its time into attention, MLP, loss and offload
copies (``measure.step_split``); ``train_step(profile=True)`` splits the measured step itself, so a step of
minutes at the ladder's top is not run a second time to be profiled.
"""

from __future__ import annotations

import torch

from ..core import models, train
from ..core.hardware import Hardware
from . import flops, memory, step_split, timing


def random_batch(vocab_size: int, seq_len: int, device, seed: int = 0) -> dict:
    """One row of ``seq_len`` random tokens (memory and time do not depend on the values)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (1, seq_len), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids}


def train_step(model, optimizer, seq_len: int, hw: Hardware, fused_head: bool = False,
               budget_bytes: int | None = None, name: str = "", repeats: int = 1,
               profile: bool = False) -> dict:
    """One optimizer step at batch 1 and ``seq_len`` tokens: peak bytes, seconds and tokens/s, or OOM.

    The row also has ``host_bytes``: the pinned host memory the step held at its peak on CUDA (the
    offloaded activations, in the allocator's power-of-two blocks), None on a CPU, whose host memory is
    the device's (``peak_bytes`` counts it); and ``mfu``: model FLOPs (``flops.training_flops_per_token``,
    no recomputation) per second over ``hw.peak_flops``, None where that is unknown (a CPU).

    With ``repeats`` > 1, ``repeats`` more steps are timed after the measured one: ``seconds`` and
    ``tokens_per_s`` are then their median, with ``_min``/``_max`` over them.

    Args:
        fused_head: the chunked LM head + cross-entropy instead of the model's full logits.
        budget_bytes: a memory budget; a step whose peak exceeds it counts as out of memory (how the
            CPU run, which never runs out, plays the game of a smaller device).
        profile: run the measured step under torch.profiler and add its time split (``split``: a
            ``step_split.StepSplit``, as ``step_time_split`` gives); its time and peak are still measured
            (the profiler's own cost: a few ms per thousand operators, and CUPTI's set-up on a GPU).
    """
    models.check_seq_len(model, seq_len)  # past the position limit RoPE would extrapolate silently
    row = {"name": name, "seq_len": seq_len, "peak_bytes": None, "host_bytes": None, "seconds": None}
    row |= memory.oom_as_result(lambda: _measure(model, optimizer, seq_len, hw, fused_head, repeats, profile))
    if budget_bytes is not None and row["peak_bytes"] is not None and row["peak_bytes"] > budget_bytes:
        row["oom"] = True
    if not row["oom"]:
        row["tokens_per_s"] = seq_len / row["seconds"]
        row["tokens_per_s_min"] = seq_len / row["seconds_max"]
        row["tokens_per_s_max"] = seq_len / row["seconds_min"]
        per_token = flops.training_flops_per_token(model.config, seq_len)
        row["mfu"] = flops.mfu(row["tokens_per_s"], per_token, hw.peak_flops)
    return row


def _measure(model, optimizer, seq_len: int, hw: Hardware, fused_head: bool, repeats: int,
             profile: bool = False) -> dict:
    batch = random_batch(model.config.vocab_size, seq_len, hw.device)
    step = _one_step(model, optimizer, batch, hw, fused_head)
    states = list(model.parameters()) + list(model.buffers()) + memory.optimizer_tensors(optimizer)
    seconds = []

    def timed():  # timing.seconds waits for the device, as step_split.profile asks of a step
        seconds.append(timing.seconds(step, hw.device))

    try:
        with memory.peak_memory(hw.device, states) as peak, memory.host_peak_memory(hw.device) as host:
            split = {"split": step_split.profile(timed, hw.device)} if profile else timed() or {}
        took = timing.Timing.of(seconds)
        if repeats > 1:
            took = timing.time_it(step, hw.device, repeats, warmup=0)
    finally:
        optimizer.zero_grad(set_to_none=True)  # a step that ran out of memory leaves gradients behind
    return {"oom": False, "seconds": took.median, "seconds_min": took.low, "seconds_max": took.high,
            "peak_bytes": peak["peak"], "host_bytes": host.get("peak"), **split}


def _one_step(model, optimizer, batch: dict, hw: Hardware, fused_head: bool):
    def step():  # no clipping: the step the ladder has always measured
        train.optimizer_step(model, optimizer, [batch], hw.amp_dtype, max_grad_norm=None,
                             fused_head=fused_head)

    return step


def step_time_split(model, optimizer, seq_len: int, hw: Hardware, fused_head: bool = False,
                    warmup: int = 0) -> step_split.StepSplit | str:
    """``train_step``'s step at batch 1 and ``seq_len`` tokens, on ``model`` as it is set up, run once under
    torch.profiler: its time split into attention, MLP, loss, offload copies and other
    (``step_split.profile``; ``warmup`` steps first, thrown away). Out of memory is a result, as on the
    ladder: a sentence saying so in place of the split. The gradients are freed afterwards, and the
    device's cached blocks returned, whether it ran or raised."""
    models.check_seq_len(model, seq_len)
    step = _one_step(model, optimizer, random_batch(model.config.vocab_size, seq_len, hw.device), hw,
                     fused_head)
    try:
        return step_split.profile(lambda: (step(), train.sync(hw.device)), hw.device, warmup)
    except torch.OutOfMemoryError:
        return f"out of memory profiling one more step at {seq_len:,} tokens: no split"
    finally:
        optimizer.zero_grad(set_to_none=True)
        memory.free_memory()


def summary_table(rows: list[dict], baseline: int):
    """``long_context.ladder.climb``'s summary rows as a pandas table, one row per rung: its longest length
    and whether that is the search's limit, then one step there: peak device memory (GiB), pinned host
    memory (GiB, "-" where none was read), seconds, tokens/s and MFU (%, "-" without a datasheet peak), and
    the length over the ``baseline``-th rung's."""
    import pandas as pd

    def cell(value, scale=1.0, digits=2):
        return "-" if value is None else round(value * scale, digits)

    def gib(value):
        return cell(value, 2**-30, 3)

    base = rows[baseline]["longest"] or 1
    records = [{"rung": r["name"], "longest": r["longest"], "at limit": r["at limit"],
                "peak GiB": gib(r["peak_bytes"]), "host GiB": gib(r.get("host_bytes")),
                "step s": cell(r["seconds"]), "tokens/s": cell(r["tokens_per_s"], digits=0),
                "MFU %": cell(r.get("mfu"), 100, 1), "x baseline": round((r["longest"] or 0) / base, 2)}
               for r in rows]
    return pd.DataFrame(records).set_index("rung")


def checkpointing_table(rows: list[dict], names: list[str]):
    """``train_step`` rows of several checkpointing settings (``name``) and lengths as a pandas table: peak
    GiB, tokens/s and its min-max per length, one row per setting in the order of ``names``."""
    import pandas as pd

    table = pd.DataFrame(rows).assign(peak_GiB=lambda t: t["peak_bytes"] / memory.GiB)
    table["tokens/s range"] = [f"{r.get('tokens_per_s_min', 0):,.0f}-{r.get('tokens_per_s_max', 0):,.0f}"
                               for r in rows]
    shown = ["peak_GiB", "tokens_per_s", "tokens/s range"]
    return table.pivot(index="name", columns="seq_len", values=shown).loc[names].round(2)
