"""Measure one training configuration: peak memory with its breakdown, tokens/s and MFU, or OOM.

A configuration is a model factory, an optimizer factory and a batch shape. ``run`` builds it,
trains a few warm-up steps, times ``steps`` more, and measures the peak of one full optimizer step
(on CPU under the allocation tracker, which would distort the timing if it were on throughout).
Running out of memory is a result (``oom=True``), not a crash, and the memory is freed either way. So is
any error of a configuration marked ``may_fail`` (a candidate the installed stack may not support):
``oom=True`` there too (nothing was measured), with ``failed`` saying what went wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..core import models, train
from ..core.hardware import Hardware
from . import flops, memory, timeline, timing
from .memory import GiB
from .report import report


@dataclass
class Config:
    """A rung of a ladder: what to build and how to batch it."""

    name: str
    model_fn: Callable[[], torch.nn.Module]
    optimizer_fn: Callable[[torch.nn.Module], object]
    micro_batch: int
    accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    fused_head: bool = True  # False: the model's own logits + cross-entropy, as plain transformers does
    step_fn: train.StepFn | None = None  # replaces our optimizer step (``train.plain_step``: the reference)
    loss_fn: train.LossFn | None = None  # ``(model, micro_batch) -> summed loss`` in place of ours
    may_fail: bool = False  # a candidate on a stack it may not support: an error becomes a row saying so


def run(config: Config, batches_fn: Callable[[int], Iterator[dict]], hw: Hardware, steps: int = 3,
        warmup: int = 1, seq_len: int | None = None, flops_per_token: Callable | None = None,
        profile: int = 0) -> dict:
    """Build, warm up, time and measure ``config``; returns a row dict (see module docstring).

    Args:
        batches_fn: ``micro_batch -> iterator of micro-batches``.
        flops_per_token: ``(model) -> FLOPs per trained token`` for MFU; None skips MFU.
        profile: run this many more steps under torch.profiler (after one thrown away) and add
            ``busy_pct``, the share of the step the device computes (the rest: launch overhead, Python,
            waits; a host-bound step's time swings with the host), and ``profiled_step_s``, the profiled
            steps' median: profiling slows the host, so compare it with ``step_s`` before trusting it.
    """
    try:
        row = memory.oom_as_result(lambda: _run(config, batches_fn, hw, steps, warmup, flops_per_token,
                                                profile))
    except Exception as error:  # OOM is a row already; other errors only for candidates allowed to fail
        if not config.may_fail:
            raise
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        row = {"oom": True, "failed": f"{type(error).__name__}: {first_line}"}
    row.update(name=config.name, micro_batch=config.micro_batch, accum_steps=config.accum_steps,
               seq_len=seq_len)
    return row


def _run(config: Config, batches_fn, hw: Hardware, steps: int, warmup: int, flops_per_token, profile) -> dict:
    model = config.model_fn()
    optimizer = config.optimizer_fn(model)
    try:
        return _measure(config, model, optimizer, batches_fn, hw, steps, warmup, flops_per_token, profile)
    finally:  # an offloading optimizer's hooks (or a dequantization cache) would keep the model alive
        getattr(optimizer, "release", lambda: None)()


def _measure(config: Config, model, optimizer, batches_fn, hw: Hardware, steps: int, warmup: int,
             flops_per_token, profile) -> dict:
    batches = batches_fn(config.micro_batch)
    kwargs = dict(accum_steps=config.accum_steps, autocast_dtype=hw.amp_dtype,
                  max_grad_norm=config.max_grad_norm, fused_head=config.fused_head, progress=False,
                  step_fn=config.step_fn, loss_fn=config.loss_fn)
    train.train(model, optimizer, batches, steps=warmup, **kwargs)
    timed = train.train(model, optimizer, batches, steps=steps, clock=timing.stepper(hw.device), **kwargs)
    baseline = list(model.parameters()) + list(model.buffers()) + memory.optimizer_tensors(optimizer)
    with memory.peak_memory(hw.device, baseline) as peak:
        train.train(model, optimizer, batches, steps=1, **kwargs)
    split = memory.breakdown(model, optimizer, peak["peak"], hw.device)
    step_time = timing.Timing.of(timed.step_seconds)  # warm-up steps already ran separately
    tokens_per_s = timed.tokens_per_step / step_time.median
    trainable, _ = models.count_parameters(model)
    fpt = flops_per_token(model) if flops_per_token else None
    row = {"name": config.name, "oom": False, "memory": split, "tokens_per_s": tokens_per_s,
           "step_s": step_time.median, "step_s_min": step_time.low, "step_s_max": step_time.high,
           "tokens_per_s_min": timed.tokens_per_step / step_time.high,
           "tokens_per_s_max": timed.tokens_per_step / step_time.low, "loss": timed.losses[-1],
           "trainable_params": trainable, "mfu": flops.mfu(tokens_per_s, fpt, hw.peak_flops) if fpt else None,
           "model_flops_per_s": tokens_per_s * fpt if fpt else None}
    if profile:
        row.update(_profile(lambda: train.train(model, optimizer, batches, steps=1, **kwargs), hw, profile))
    return row


def _profile(step: Callable[[], object], hw: Hardware, steps: int) -> dict:
    """``run``'s ``busy_pct`` and ``profiled_step_s``: ``steps`` of ``step`` under torch.profiler. The
    profile is an aid: if the profiler fails, the row says why (``profile_error``) and keeps its timing."""
    try:
        events = timeline.trace_events(lambda: (step(), train.sync(hw.device)), steps, hw.device, warmup=1)
        if hw.cuda and not any(e.get("cat") == "kernel" for e in events):
            raise RuntimeError("the GPU trace has no kernels (CUPTI tracing unavailable?)")
        traced = timeline.summary(timeline.step_timelines(events))
    except Exception as error:  # noqa: BLE001 - the timing stands; the row says why there is no profile
        return {"busy_pct": None, "profile_error": f"{type(error).__name__}: {error}"[:200]}
    return {"busy_pct": 100 * traced["compute_ms"] / traced["step_ms"],
            "profiled_step_s": traced["step_ms"] / 1e3}


def flops_counter(config, seq_len: int) -> Callable[[torch.nn.Module], float]:
    """``(model) -> training FLOPs per token`` for ``run``'s MFU: frozen weights 4N, trainable ones 6N."""
    def per_token(model: torch.nn.Module) -> float:
        trainable, total = models.count_parameters(model)
        return flops.training_flops_per_token(config, seq_len, trainable / total)
    return per_token


def fits(*rows: dict) -> bool:
    """False if any row ran out of memory: comparisons with it are skipped, not crashed."""
    return all(not r["oom"] for r in rows)


def rate(row: dict) -> float:
    """A row's median tokens/s, 0 for a row that ran out of memory (a key for ``max`` and sorting)."""
    return 0.0 if row["oom"] else row["tokens_per_s"]


def show(row: dict) -> dict:
    """Print a row in the one report format (peak, states, activations, tokens/s and range); returns it."""
    if row["oom"]:
        report(row["name"], **({"failed": row["failed"]} if row.get("failed") else {"peak": "OOM"}))
        return row
    m = row["memory"]
    report(row["name"], **{"peak GiB": m.peak / GiB, "states GiB": m.states / GiB,
                           "activations GiB": m.activations / GiB, "tokens/s": row["tokens_per_s"],
                           "tokens/s range": spread(row)})
    return row


def spread(row: dict) -> str:
    """A row's tokens/s range over its timed steps, ``"min-max"``."""
    return f"{row['tokens_per_s_min']:,.0f}-{row['tokens_per_s_max']:,.0f}"


def speed_ratio(row: dict, reference: dict) -> tuple[float, float, float]:
    """``row``'s tokens/s over ``reference``'s: the ratio of medians, and its extremes over the timed
    steps (slowest of ``row`` over fastest of ``reference``, and the other way round)."""
    return (row["tokens_per_s"] / reference["tokens_per_s"],
            row["tokens_per_s_min"] / reference["tokens_per_s_max"],
            row["tokens_per_s_max"] / reference["tokens_per_s_min"])


def describe_ratio(ratio: float, low: float, high: float) -> str:
    """``"1.17x [1.10-1.25]"``, or ``"no measurable difference (...)"`` when the spread takes in 1.0."""
    text = f"{ratio:.2f}x [{low:.2f}-{high:.2f}]"
    return f"no measurable difference ({text})" if low <= 1.0 <= high else text


def report_fastest(label: str, rows: list[dict], prefix: str, reference: dict) -> tuple[dict, tuple | None]:
    """Print the fastest of ``rows`` whose name starts with ``prefix``, with its MFU and its ratio to each
    row without the prefix that fits; return it and its ``speed_ratio`` to ``reference``.

    Where it or ``reference`` did not run (out of memory or failed: on a small GPU, every such row), it
    says so and returns that row with None for the ratio: there is nothing to compare.
    """
    fastest = max((r for r in rows if r["name"].startswith(prefix)), key=rate)  # an OOM row only if all are
    if not fits(fastest, reference):
        gone = [f"every {prefix!r} row"] * fastest["oom"] + [reference["name"]] * reference["oom"]
        print(f"{label}: nothing to compare on this device: {' and '.join(gone)} ran out of memory "
              "(or failed)")
        return fastest, None
    report(f"{label}: {fastest['name']}", **{"MFU % datasheet": 100 * (fastest.get("mfu") or 0)}, **{
        f"vs {r['name']}": describe_ratio(*speed_ratio(fastest, r)) for r in rows
        if not r["name"].startswith(prefix) and fits(r)})
    return fastest, speed_ratio(fastest, reference)


def check_states(row: dict, predicted: dict[str, float], tolerance: float = 0.05) -> bool:
    """Print predicted against measured weights, gradients and optimizer state; True if all agree.

    Agreement: within ``tolerance`` of the prediction plus 1 MiB (allocator rounding, small buffers).
    """
    agree = True
    for part in ("parameters", "gradients", "optimizer"):
        measured = getattr(row["memory"], part)
        match = abs(measured - predicted[part]) <= tolerance * predicted[part] + 2**20
        report(f"{row['name']}: {part}",
               **{"predicted GiB": predicted[part] / GiB, "measured GiB": measured / GiB, "match": match})
        agree = agree and match
    return agree


def table(rows: list[dict], reference: str | None = None, matmul_peak: float | None = None):
    """A pandas table of rows: GiB per part, tokens/s with its range, MFU, peak relative to ``reference``.

    MFU is shown against the datasheet's dense bf16 peak and, given ``matmul_peak`` (FLOP/s measured by
    ``timing.matmul_peak``), against what a large matmul really reaches on this device, side by side.
    """
    import pandas as pd

    ref = next((r for r in rows if r["name"] == reference and not r["oom"]), None)
    records = []
    for r in rows:
        rec = {"configuration": r["name"], "micro-batch x accum": f"{r['micro_batch']} x {r['accum_steps']}"}
        if r["oom"]:
            rec["peak (GiB)"] = "failed: " + r["failed"] if r.get("failed") else "OOM"
        else:
            rec.update({f"{k} (GiB)": round(v, 3) for k, v in r["memory"].gib().items()})
            rec["tokens/s"] = round(r["tokens_per_s"], 1)
            rec["tokens/s range"] = spread(r)
            if r.get("mfu") is not None:
                rec["MFU (% datasheet)"] = round(100 * r["mfu"], 1)
            if matmul_peak and r.get("model_flops_per_s"):
                rec["MFU (% measured matmul)"] = round(100 * r["model_flops_per_s"] / matmul_peak, 1)
            if r.get("busy_pct") is not None:
                rec["device busy (%)"] = round(r["busy_pct"], 1)
                rec["profiled step (s)"] = round(r["profiled_step_s"], 3)
            if ref is not None:
                rec["peak vs " + reference] = f"{r['memory'].peak / ref['memory'].peak:.1%}"
        records.append(rec)
    return pd.DataFrame(records).set_index("configuration")


def to_json(row: dict) -> dict:
    """A row with its memory breakdown as plain numbers, for ``results/`` files."""
    out = {k: v for k, v in row.items() if k != "memory"}
    if not row.get("oom"):
        out["memory_bytes"] = {k: int(v) for k, v in vars(row["memory"]).items()}
    return out
