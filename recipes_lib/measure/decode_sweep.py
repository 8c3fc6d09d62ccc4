"""The decode size sweep (issue 20): where int8 and int4 weight-only pay, as a curve over model size.

For each Llama shape (random weights) x weight format x batch, ``run`` builds the model, quantizes it,
times it with ``decode.benchmark`` (a compiled CUDA-graph static-cache step on a GPU, eager on CPU) and
returns rows with decode tokens/s (median, min-max), the format's memory-bandwidth floor
(``decode_floor``, at the copy bandwidth measured once), the % of that floor reached, and the speed-up
over bf16 of the same shape and batch with its range. What cannot run becomes a row whose ``skipped``
says why (not enough GPU memory, no int4 kernel here). ``depth_fractions`` also times each shape cut
to fewer layers, so ``analyse`` can fit ``decode_cost`` models (fixed + per-layer cost per format) and
choose a student for the largest shape.

    python -m recipes_lib.measure.decode_sweep --shapes llama-3.1-8b --depth-fractions 1 0.5 --out r.json
    python -m recipes_lib.measure.decode_sweep --merge a.json b.json --out all.json   # analyse only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..core import hardware
from ..core.errors import RecipeError
from ..core.hardware import Hardware
from ..inference import quantize
from . import bench, decode, decode_floor, memory, timing
from .decode_fits import analyse, shape_config
from .report import report

SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")
GiB = 2**30


def build(config, hw: Hardware, seed: int = 0):
    """A model of ``config`` with random weights, made on ``hw``'s device in its weight dtype."""
    torch.manual_seed(seed)
    with torch.device(hw.device):
        model = AutoModelForCausalLM.from_config(config, dtype=hw.model_dtype, attn_implementation="sdpa")
    return model.eval()


def quantize_as(model, fmt: str, group_size: int = 128, int8_backend: str = "auto"):
    """``model`` in weight format ``fmt`` (quantized in place); returns (model, backend)."""
    if fmt == "bf16":
        return model, "none"
    if fmt == "int8":
        return quantize.int8_weight_only(model, int8_backend)
    if fmt == "int4":
        return quantize.int4_weight_only(model, group_size)
    raise RecipeError(f"format {fmt!r}; choose from {decode_floor.FORMATS}")


def memory_shortfall(config, batch: int, prompt_len: int, new_tokens: int, hw: Hardware) -> str | None:
    """Why ``config`` would not fit the GPU's free memory at ``batch`` (None if it fits, or on CPU):
    its weights in the model dtype (quantization starts from them), the KV cache, the prefill's logits."""
    if not hw.cuda:
        return None
    size = torch.finfo(hw.model_dtype).bits // 8
    n_kv, head_dim = decode_floor.kv_heads_dim(config)
    need = (decode_floor.parameter_count(config) * size
            + batch * (prompt_len + new_tokens) * config.num_hidden_layers * 2 * n_kv * head_dim * size
            + batch * prompt_len * (config.vocab_size + 4 * config.intermediate_size) * size + GiB)
    free = torch.cuda.mem_get_info(hw.device)[0]
    return None if need <= free else f"needs about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"


def _failure(error: Exception) -> str:
    """An error in one line (its type and the first 200 characters of its message), for a skipped row."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def measure_format(shape: str, config, fmt: str, batches: list[int], hw: Hardware, bandwidth: float,
                   prompt_len: int, new_tokens: int, repeats: int, compile: bool | None, tune: bool,
                   group_size: int, int8_backend: str = "auto", keep_going: bool | None = None) -> list[dict]:
    """The rows of one shape in one format, a row per batch (skipped rows say why).

    ``keep_going`` (default: on a GPU) turns any other error of building, quantizing, compiling or timing
    into skipped rows that name it, so that one kernel that fails (a torchao or Inductor error) does not
    end a sweep of many compiled steps; on CPU (CI) such an error is raised, as a bug should be.
    """
    keep_going = hw.cuda if keep_going is None else keep_going
    row = _row_maker(shape, config, fmt, hw, bandwidth, decode_floor.mean_context(prompt_len, new_tokens),
                     group_size)
    short = memory_shortfall(config, max(batches), prompt_len, new_tokens, hw)
    if short:
        return [row(b, skipped=f"does not fit GPU memory: {short}") for b in batches]
    rows, model = [], None
    try:
        model, backend = quantize_as(build(config, hw), fmt, group_size, int8_backend)
        weights = memory.tensor_bytes([*model.parameters(), *model.buffers()])
        for batch in batches:
            try:
                measured = decode.benchmark(model, hw, batch, prompt_len, new_tokens, compile=compile,
                                            repeats=repeats, warmup=1 if compile is False else 2,
                                            name=f"{shape} {fmt}", tune=tune and batch == 1)
            except torch.OutOfMemoryError:
                rows.append(row(batch, skipped="out of GPU memory while decoding"))
                continue
            except Exception as error:
                if not keep_going:
                    raise
                rows.append(row(batch, skipped=f"failed while compiling or decoding: {_failure(error)}"))
                continue
            rows.append(_measured_row(row(batch, backend=backend, weight_bytes=weights), measured))
    except RecipeError as error:  # no kernel for this format here
        rows = [row(b, skipped=str(error)) for b in batches]
    except torch.OutOfMemoryError:
        rows = [row(b, skipped="out of GPU memory while building or quantizing") for b in batches]
    except Exception as error:
        if not keep_going:
            raise
        rows = [row(b, skipped=f"failed while building or quantizing: {_failure(error)}") for b in batches]
    finally:
        model = None
        if hw.cuda:
            torch._dynamo.reset()  # drops the compiled steps and their CUDA-graph memory pools
        memory.free_memory()
    return rows


def add_speedups(rows: list[dict]) -> list[dict]:
    """Each row's decode speed-up over the bf16 row of the same shape, depth and batch, with its range
    (``speedup_vs_bf16``, ``speedup_min``, ``speedup_max``; None without a bf16 row; 1.0 for bf16 rows)."""
    key = lambda r: (r["shape"], r["layers"], r["batch"])  # noqa: E731
    bf16 = {key(r): r for r in rows if r["format"] == "bf16" and not r["skipped"]}
    for r in rows:
        ref = bf16.get(key(r))
        ratio = ((None,) * 3 if r["skipped"] or ref is None else (1.0, None, None) if r["format"] == "bf16"
                 else decode.speed_ratio(r, ref))  # a bf16 row is its own reference: no range
        r.update(zip(("speedup_vs_bf16", "speedup_min", "speedup_max"), ratio))
    return rows


def _row_maker(shape: str, config, fmt: str, hw: Hardware, bandwidth: float, context: float, group_size: int):
    """``row(batch, **fields)``: a row of ``shape`` (cut to ``config``'s depth) in ``fmt``, with its floor."""
    size = torch.finfo(hw.model_dtype).bits // 8
    base = {"shape": shape, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "format": fmt, "weight_dtype": str(hw.model_dtype),
            "parameters": decode_floor.parameter_count(config)}

    def row(batch: int, **fields) -> dict:
        floor = decode_floor.floor_tokens_per_s(config, batch, context, fmt, bandwidth, group_size, size)
        return {**base, "batch": batch, "floor_tokens_per_s": floor, "skipped": None, **fields}

    return row


def _measured_row(row: dict, measured: dict) -> dict:
    measured = {**row, **measured}
    measured["pct_of_floor"] = 100 * measured["decode_tokens_per_s"] / measured["floor_tokens_per_s"]
    return decode.report_row(measured)


def reusable(given, batches, prompt_len: int, new_tokens: int, compiled: bool, tune: bool) -> bool:
    """Whether ``given`` rows (``decode.benchmark``'s, one per batch) were measured as the sweep would
    measure them: the same batches, prompt, new tokens, CUDA graph or not, and tuning (batch 1 only)."""
    how = [(r["batch"], r["prompt_len"], r["new_tokens"], bool(r["compiled"]), bool(r["tuned"]))
           for r in given]
    return how == [(b, prompt_len, new_tokens, compiled, compiled and tune and b == 1) for b in batches]


def depths_of(config, fractions) -> list[int]:
    """Layer counts ``fractions`` of ``config``'s depth (at least one layer), without repeats."""
    return list(dict.fromkeys(max(1, round(config.num_hidden_layers * f)) for f in fractions))


def run(shapes=SHAPES, formats=decode_floor.FORMATS, batches=(1, 16), prompt_len: int = 512,
        new_tokens: int = 64, repeats: int = 5, hw: Hardware | None = None, bandwidth: float | None = None,
        depth_fractions=(1.0,), compile: bool | None = None, tune: bool = True,
        group_size: int = 128, int8_backend: str = "auto", keep_going: bool | None = None,
        given: dict | None = None, budget_s: float | None = None) -> dict:
    """Every shape x depth x format x batch (see the module docstring); returns the rows and how.

    Formats are measured in turn (every shape's bf16, then every shape's int8, ...), the rows then sorted
    by shape, depth, format and batch.

    Args:
        keep_going: see ``measure_format`` (default: on a GPU, a failing format becomes skipped rows).
        given: ``{(shape, format): (backend, rows)}``, full-depth rows measured elsewhere with
            ``decode.benchmark`` (notebook 03's section 1): used in place of measuring them again where
            ``reusable`` (same batches, prompt, new tokens, CUDA graph and tuning), each row saying so.
        budget_s: once this many seconds have gone, the formats and shapes not yet begun are rows
            skipped for time (the GPU session's budget), not measured.
    """
    hw = hw or hardware.detect()
    bandwidth = bandwidth or timing.copy_bandwidth(hw.device, n_bytes=GiB if hw.cuda else 2**24)
    context, given, start = decode_floor.mean_context(prompt_len, new_tokens), given or {}, time.monotonic()
    compiled, rows = hw.cuda if compile is None else compile, []
    for fmt in formats:
        for shape in shapes:
            full = shape_config(shape).num_hidden_layers
            for layers in depths_of(shape_config(shape), depth_fractions):
                config = shape_config(shape, layers)
                row = _row_maker(shape, config, fmt, hw, bandwidth, context, group_size)
                backend, done = given.get((shape, fmt), (None, []))
                if layers == full and done and reusable(
                        done, batches, prompt_len, new_tokens, compiled, tune):
                    rows += [_measured_row(row(r["batch"], backend=backend, reused=True), r) for r in done]
                elif budget_s is not None and time.monotonic() - start > budget_s:
                    rows += [row(b, skipped=f"not measured: the sweep's {budget_s:.0f} s were spent")
                             for b in batches]
                else:
                    rows += measure_format(shape, config, fmt, list(batches), hw, bandwidth, prompt_len,
                                           new_tokens, repeats, compile, tune, group_size, int8_backend,
                                           keep_going)
    shapes, formats = list(shapes), list(formats)
    rows.sort(key=lambda r: (shapes.index(r["shape"]), -r["layers"], formats.index(r["format"]), r["batch"]))
    return dict(device=hw.summary(), bandwidth=bandwidth, prompt_len=prompt_len, new_tokens=new_tokens,
                context=context, group_size=group_size, act_bytes=torch.finfo(hw.model_dtype).bits // 8,
                rows=add_speedups(rows))


def floor_check(rows: list[dict], shapes, fmt: str = "bf16", batch: int = 1,
                at_least: float = 70.0) -> tuple[str, bool]:
    """Each of ``shapes``' share of its bandwidth floor at full depth in ``fmt`` at ``batch``, in words, and
    whether every one reached ``at_least`` % (issue 20's first point: bf16 at batch 1, 70%)."""
    full = {r["shape"]: r for r in sorted(rows, key=lambda r: r["layers"])
            if (r["format"], r["batch"]) == (fmt, batch)}  # the deepest row of each shape
    shares = {s: None if s not in full or full[s]["skipped"] else full[s]["pct_of_floor"] for s in shapes}
    words = ", ".join(f"{s}: {'not measured' if v is None else f'{v:.0f}%'}" for s, v in shares.items())
    return words, all(v is not None and v >= at_least for v in shares.values())


def merge(results: list[dict]) -> dict:
    """Several ``run`` results (one per GPU command, the same prompt and new tokens) as one: their rows,
    and the mean of their measured copy bandwidths."""
    if len({(r["prompt_len"], r["new_tokens"], r["act_bytes"]) for r in results}) > 1:
        raise RecipeError("these sweeps used different prompt lengths, new tokens or weight dtypes")
    bandwidth = sum(r["bandwidth"] for r in results) / len(results)
    return {**results[0], "bandwidth": bandwidth, "rows": add_speedups(sum((r["rows"] for r in results), []))}


def table(rows: list[dict]) -> list[dict]:
    """Rows as table records: shape, depth, format, batch, tokens/s (min-max), floor, % of floor, speed-up."""
    out = []
    for r in rows:
        record = {"shape": r["shape"], "layers": r["layers"], "format": r["format"], "batch": r["batch"],
                  "floor tok/s": round(r["floor_tokens_per_s"], 1)}
        if r["skipped"]:
            out.append({**record, "skipped": r["skipped"]})
            continue
        speedup = "-" if r["speedup_min"] is None else bench.describe_ratio(
            r["speedup_vs_bf16"], r["speedup_min"], r["speedup_max"])
        out.append({**record, "decode tok/s": round(r["decode_tokens_per_s"], 1),
                    "min-max": bench.spread(decode.rates(r)), "% of floor": round(r["pct_of_floor"], 1),
                    "vs bf16": speedup, "backend": r["backend"]})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m recipes_lib.measure.decode_sweep",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--formats", nargs="+", default=list(decode_floor.FORMATS),
                        choices=decode_floor.FORMATS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--depth-fractions", nargs="+", type=float, default=[1.0])
    parser.add_argument("--no-tune", action="store_true", help="no coordinate-descent tuning at batch 1")
    parser.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graph")
    parser.add_argument("--int8-backend", default="auto", choices=("auto", "torchao", "pytorch"))
    parser.add_argument("--target-speedup", type=float, default=2.0)
    parser.add_argument("--merge", nargs="+", type=Path, help="measure nothing: analyse these result files")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.merge:
        result = merge([json.loads(path.read_text()) for path in args.merge])
    else:
        result = run(args.shapes, args.formats, args.batches, args.prompt_len, args.new_tokens, args.repeats,
                     depth_fractions=args.depth_fractions, compile=False if args.eager else None,
                     tune=not args.no_tune, int8_backend=args.int8_backend)
    result["analysis"] = analyse(result, args.target_speedup)
    for record in table(result["rows"]):
        report(f"{record.pop('shape')} x{record.pop('layers')} {record.pop('format')}", **record)
    print(json.dumps(result["analysis"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
