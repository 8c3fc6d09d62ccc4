"""The one generation benchmark: prefill and decode tokens/s, measured the same way for every model.

``benchmark`` fills a static KV cache with a random prompt of ``prompt_len`` tokens (prefill), then
greedily decodes ``new_tokens`` tokens one at a time. On a GPU the one-token step is compiled with
``torch.compile(mode="reduce-overhead")`` (Inductor kernels replayed as a CUDA graph), so the host
launches one graph per token and decode is bound by the GPU, not by Python; ``transformers``'
``generate`` loop adds per-token host work (logits processors, stopping checks) that hides the
difference between a bf16 and an int8 model. Times are CUDA events on a GPU, ``perf_counter`` on
CPU, after warm-up, median of ``repeats`` with their min-max (``*_tokens_per_s_min`` / ``_max``: at the
slowest and the fastest timed call); ``speed_ratio`` gives two rows' ratio with its range, for
``bench.describe_ratio``. Prefill runs eagerly (one forward over the prompt).
``tune=True`` compiles the step with Inductor's coordinate-descent tuning of its kernels' launch
parameters (what torchao and gpt-fast recommend for decode): faster small-batch decode kernels for a
longer compile. Compare models under the same ``tune``.
"""

from __future__ import annotations

import contextlib

import torch

from ..core.hardware import Hardware, raise_recompile_limit
from ..inference.generate import decode_step, static_cache
from . import bench, memory, timing
from .report import report


@torch.no_grad()
def benchmark(model, hw: Hardware, batch: int, prompt_len: int, new_tokens: int, compile: bool | None = None,
              repeats: int = 5, warmup: int = 2, name: str = "", seed: int = 0, tune: bool = False) -> dict:
    """Prefill and greedy-decode tokens/s of ``model`` (see the module docstring for the protocol).

    Args:
        compile: compile the decode step with CUDA graphs; None means yes on a GPU, no on CPU.
            Models whose kernels torch.compile cannot trace (bitsandbytes) pass False.
        repeats: timed prefills and timed decodes; the median of each is reported, with its min-max.
        tune: compile with Inductor's coordinate-descent tuning (ignored without ``compile``).
    """
    model.eval()
    device = next(model.parameters()).device
    compile = device.type == "cuda" if compile is None else compile
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator).to(device)
    cache = static_cache(model, prompt_len + new_tokens)
    step = decode_step
    if compile:
        raise_recompile_limit()
        step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    prefill_positions = torch.arange(prompt_len, device=device)
    decode_positions = [torch.tensor([prompt_len + i], device=device) for i in range(new_tokens)]

    def prefill() -> torch.Tensor:
        return decode_step(model, prompt, prefill_positions, cache)

    def fresh_prefill() -> torch.Tensor:
        cache.reset()  # recent transformers count the filled length inside the cache
        return prefill()

    def decode(first: torch.Tensor) -> torch.Tensor:
        token = first
        for position in decode_positions:
            token = step(model, token, position, cache)
            if compile:
                token = token.clone()  # the CUDA graph's output buffer is overwritten by the next replay
        return token

    tune = bool(tune and compile)
    if compile and warmup < 1:
        raise ValueError("a compiled benchmark needs warmup >= 1: the first decode compiles the step")
    tuning = contextlib.nullcontext()
    if tune:
        import torch._inductor.config as inductor_config

        tuning = inductor_config.patch(coordinate_descent_tuning=True)
    with tuning:  # the step compiles during warm-up; later calls replay it
        for _ in range(warmup):
            decode(fresh_prefill())
    prefill_s, decode_s = [], []
    for _ in range(repeats):
        first = None

        def run_prefill():
            nonlocal first
            first = prefill()

        cache.reset()  # outside the timed region
        prefill_s.append(timing.seconds(run_prefill, device))
        decode_s.append(timing.seconds(lambda: decode(first), device))
    prefill_t, decode_t = timing.Timing.of(prefill_s), timing.Timing.of(decode_s)
    return {"name": name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "compiled": compile, "tuned": tune, "repeats": repeats,
            "prefill_s": prefill_t.median, "decode_s": decode_t.median,
            **phase_rates("prefill", prefill_t, batch * prompt_len),
            **phase_rates("decode", decode_t, batch * new_tokens),
            "ms_per_decode_step": 1e3 * decode_t.median / new_tokens}


def phase_rates(phase: str, took: timing.Timing, tokens: int) -> dict:
    """``{phase}_tokens_per_s`` at the median call, ``_min`` at the slowest, ``_max`` at the fastest."""
    return {f"{phase}_{key}": value for key, value in took.per_second(tokens).items()}


def rates(row: dict, phase: str = "decode") -> dict:
    """A row's ``phase`` tokens/s (median, min, max) under the keys ``bench.speed_ratio``/``spread`` read."""
    return {key: row[f"{phase}_{key}"] for key in ("tokens_per_s", "tokens_per_s_min", "tokens_per_s_max")}


def speed_ratio(row: dict, reference: dict, phase: str = "decode") -> tuple[float, float, float]:
    """``row``'s ``phase`` tokens/s over ``reference``'s, with its range (``bench.speed_ratio``)."""
    return bench.speed_ratio(rates(row, phase), rates(reference, phase))


def describe(row: dict) -> str:
    """The protocol of one measurement, in words (for the notebooks' captions)."""
    how = "torch.compile + CUDA graph decode step" if row["compiled"] else "eager decode step"
    if row.get("tuned"):
        how += " (coordinate-descent tuned)"
    return (f"batch {row['batch']}, prompt {row['prompt_len']} tokens, {row['new_tokens']} new tokens, "
            f"static KV cache, {how}, median of {row['repeats']} after warm-up (min-max shown)")


def report_row(row: dict) -> dict:
    """Print one benchmark row in the one report format; returns it."""
    report(row["name"], **{"batch": row["batch"], "prompt": row["prompt_len"], "new": row["new_tokens"],
                           "prefill tok/s": row["prefill_tokens_per_s"],
                           "decode tok/s": row["decode_tokens_per_s"],
                           "decode min-max": bench.spread(rates(row)), "ms/step": row["ms_per_decode_step"],
                           "graph": row["compiled"], "tuned": row["tuned"]})
    return row


def sweep(model, hw: Hardware, batches: list[int], prompt_len: int, new_tokens: int, repeats: int,
          compile: bool | None = None, name: str = "") -> list[dict]:
    """``benchmark`` at each batch size (batch 1 tuned); rows printed, with the model's ``weight_bytes``."""
    weights = memory.tensor_bytes([*model.parameters(), *model.buffers()])
    return [report_row({**benchmark(model, hw, batch, prompt_len, new_tokens, compile=compile,
                                    repeats=repeats, warmup=1 if compile is False else 2, name=name,
                                    tune=batch == 1),
                        "weight_bytes": weights}) for batch in batches]


def table(rows: list[dict]) -> list[dict]:
    """Benchmark rows as table records: method, batch, weights, prefill and decode tokens/s (median and
    min-max), protocol."""
    return [{"method": r["name"], "batch": r["batch"],
             "weights (GiB)": round(r.get("weight_bytes", 0) / memory.GiB, 3),
             "prefill tok/s": round(r["prefill_tokens_per_s"]),
             "prefill min-max": bench.spread(rates(r, "prefill")),
             "decode tok/s": round(r["decode_tokens_per_s"], 1),
             "decode min-max": bench.spread(rates(r)),
             "CUDA graph": r["compiled"], "tuned": r["tuned"]} for r in rows]


def slower(rows: list[dict], baselines: list[dict], below: float = 0.95) -> list[str]:
    """Where a row's prefill or decode tokens/s falls under ``below`` times its baseline row's, in words."""
    return [f"slower than its baseline: {r['name']} {phase} at batch {r['batch']}: "
            f"{r[f'{phase}_tokens_per_s'] / b[f'{phase}_tokens_per_s']:.2f}x"
            for r, b in zip(rows, baselines) for phase in ("prefill", "decode")
            if r[f"{phase}_tokens_per_s"] / b[f"{phase}_tokens_per_s"] < below]


def step_split(deep: dict, shallow: dict, depths: tuple[int, int]) -> dict:
    """A decode step as a fixed part plus a part per layer, from two depths' ms per step; and the
    depth at which the step would take half the deep model's time."""
    per_layer = (deep["ms_per_decode_step"] - shallow["ms_per_decode_step"]) / (depths[0] - depths[1])
    fixed = deep["ms_per_decode_step"] - depths[0] * per_layer
    return {"fixed_ms": fixed, "ms_per_layer": per_layer,
            "layers_for_2x": (deep["ms_per_decode_step"] / 2 - fixed) / per_layer}


def benchmark_each(models: dict, hw: Hardware, prompt_len: int, new_tokens: int, **kwargs) -> dict:
    """``benchmark`` at batch 1 of each model of ``models`` (name -> model), printed (``report_row``); the
    models are dropped from the dict as they are done, and the compiled steps and CUDA-graph pools with
    them (``torch._dynamo.reset``), so that what the caller runs next has the memory back."""
    rows = {}
    for name in list(models):
        model = models.pop(name)
        rows[name] = report_row(benchmark(model, hw, 1, prompt_len, new_tokens, name=name, **kwargs))
        del model
        torch._dynamo.reset()
        memory.free_memory()
    return rows
