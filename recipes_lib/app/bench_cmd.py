"""``recipes bench --technique NAME [--model ... --seq-len ...]``: one recipe against its plain reference.

The sizes follow the notebooks' profiles (``techniques.PROFILES``: the embedded model at 128 tokens on
a CPU, a Llama-3.2-1B shape at 2048 on a GPU); the options override them. The two rows print as one
table: memory split into weights, gradients, optimizer state and activations (the rest of the peak),
tokens/s at the median timed step with the slowest-fastest range, MFU against the datasheet peak
(none for a CPU), then the ratio of the two with its range (``bench.describe_ratio``) and the peaks'.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core import hardware
from ..core.errors import RecipeError
from ..measure import bench
from ..measure.memory import GiB
from . import bench_runs, preflight, techniques
from .techniques import Settings, Technique


def settings(t: Technique, hw: hardware.Hardware, model: str | None = None, seq_len: int | None = None,
             micro_batch: int | None = None, steps: int | None = None, nproc: int | None = None) -> Settings:
    """The profile's sizes for this machine, with the options given (None: the profile's)."""
    profile = techniques.PROFILES["gpu" if hw.cuda else "cpu"]
    chosen = {"model": model or t.default_model or profile["model"], "seq_len": seq_len or profile["seq_len"],
              "micro_batch": micro_batch or profile["micro_batch"], "steps": steps or profile["steps"]}
    for key in ("seq_len", "micro_batch", "steps"):
        if chosen[key] < 1:
            raise RecipeError(f"--{key.replace('_', '-')}={chosen[key]}: give a positive number")
    if chosen["seq_len"] < 16:
        raise RecipeError(f"--seq-len={chosen['seq_len']} is too short to measure: use 16 tokens or more")
    preflight.local_model(chosen["model"], "--model")
    try:
        bench_runs.model_config(chosen["model"])
    except Exception as error:  # RecipeError (no such folder) or transformers' errors: one message
        raise RecipeError(f"--model {chosen['model']!r} does not load: {error}") from None
    prompt_len = min(profile["prompt_len"], chosen["seq_len"])
    return Settings(hw, chosen["model"], chosen["seq_len"], chosen["micro_batch"], chosen["steps"],
                    profile["lora_r"], prompt_len, profile["new_tokens"],
                    torch.cuda.device_count() if nproc is None else nproc)


def run(name: str, hw: hardware.Hardware | None = None, **options) -> dict:
    """Measure technique ``name`` and its reference; returns ``{"technique", "settings", "rows"}``."""
    t = techniques.get(name)
    hw = hw or hardware.detect()
    s = settings(t, hw, **options)
    rows = bench_runs.measure(t, s)
    return {"technique": t, "settings": s, "rows": rows}


def _unit(rows: list[dict]) -> tuple[float, str]:
    peaks = [r["memory"].peak for r in rows if not r.get("oom") and r.get("memory") is not None]
    return (GiB, "GiB") if peaks and max(peaks) >= GiB else (2**20, "MiB")


def table(rows: list[dict]) -> str:
    """The rows, one a line: memory split, peak, tokens/s and its range, MFU, and any extra column."""
    unit, name = _unit(rows)
    extra = list(dict.fromkeys(k for r in rows for k in r.get("columns", {})))
    width = max(len(r["name"]) for r in rows) + 2
    head = ["weights", "grads", "optimizer", "activations", f"peak {name}", "tokens/s", "min-max", "MFU %",
            *extra]
    widths = [max(13, len(h) + 2) for h in head]
    lines = [f"{'configuration':<{width}}" + "".join(f"{h:>{w}}" for h, w in zip(head, widths))]
    for r in rows:
        if r.get("oom"):
            lines.append(f"{r['name']:<{width}}" + f"{'OOM':>13}")
            continue
        m = r.get("memory")
        parts = ("parameters", "gradients", "optimizer", "activations", "peak")
        cells = [getattr(m, k) / unit for k in parts] if m is not None else ["-"] * 5
        cells += [r["tokens_per_s"], bench.spread(r), 100 * r["mfu"] if r.get("mfu") is not None else "-"]
        cells += [r.get("columns", {}).get(k, "-") for k in extra]
        lines.append(f"{r['name']:<{width}}" + "".join(_cell(c, w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def _cell(value, width: int) -> str:
    if isinstance(value, float):
        return f"{value:>{width},.1f}" if abs(value) >= 100 else f"{value:>{width}.3g}"
    return f"{value!s:>{width}}"


def summary(result: dict) -> str:
    """The header, the table, then the technique over its reference: speed with its range, and peak."""
    t, s, (ref, tech) = result["technique"], result["settings"], result["rows"]
    device = f"{s.nproc} x {s.hw.name}" if t.kind == "multi-gpu" else s.hw.name
    lines = [f"{t.name} (notebook {t.notebook}): {t.what}, against {t.reference}",
             f"model {s.model} | {s.micro_batch} x {s.seq_len} tokens | {s.steps} timed steps | {device}"
             f" | tokens/s: {t.rate}",
             table(result["rows"])]
    if bench.fits(ref, tech):
        parts = [f"tokens/s {bench.describe_ratio(*bench.speed_ratio(tech, ref))}"]
        if ref.get("memory") is not None and tech.get("memory") is not None:
            parts.append(f"peak memory {tech['memory'].peak / ref['memory'].peak:.1%} of the reference's")
        lines.append(f"{tech['name']} vs {ref['name']}: " + " | ".join(parts))
    else:
        lines.append("one of the two ran out of memory: no ratio")
    return "\n".join(lines + techniques.notes(t, s))


def to_json(result: dict) -> dict:
    """The result with plain numbers, for ``--json``."""
    s = result["settings"]
    return {"technique": result["technique"].name, "model": s.model, "seq_len": s.seq_len,
            "micro_batch": s.micro_batch, "steps": s.steps, "device": s.hw.name,
            "rows": [{k: (vars(v) if k == "memory" and v is not None else v) for k, v in r.items()}
                     for r in result["rows"]]}


def main(args) -> int:
    """The ``recipes bench`` subcommand."""
    if args.list:
        print(techniques.listing())
        return 0
    if not args.technique:
        raise RecipeError("name a technique: recipes bench --technique NAME "
                          "(recipes bench --list names them)")
    result = run(args.technique, model=args.model, seq_len=args.seq_len, micro_batch=args.micro_batch,
                 steps=args.steps, nproc=args.nproc)
    print(summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(result), indent=1) + "\n")
    return 0
