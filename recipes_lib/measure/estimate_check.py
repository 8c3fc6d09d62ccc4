"""The estimate beside every committed GPU measurement: the memory tables of notebooks 01, 02 and 04.

``committed_rows()`` reads ``results/<notebook>.<GPU>.json`` and describes each measured row as a ``Plan``
(what the notebook ran: method, precision, micro-batch, length, checkpointing, loss, strategy,
GPUs), then predicts it. Nothing here is fitted: a row that misses says why in its ``note``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

from ..core import batches, models
from . import advisor, flops, memory
from .estimate import Plan, estimate, for_hardware, model_config

RESULTS = models.REPO_ROOT / "results"
GPU_MODEL = "random:llama-3.2-1b"
NOTES = {
    "compiled adapters": "compiled LoRA layers recomputed under checkpointing: not modelled, eager "
                         "autograd's count (measure.activations)",
    "torch.compile": "compiled layers: what Inductor's min-cut partitioner keeps (measure.activations)",
    "liger": "Liger's fused loss in place of ours, estimated as our chunked loss",
}


def _load(name: str) -> dict:
    """The committed results of notebook ``name`` (one file per notebook: ``<name>.<GPU>.json``)."""
    found = sorted(RESULTS.glob(f"{name}.*.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one results/{name}.<GPU>.json, found {[f.name for f in found]}")
    return json.loads(found[0].read_text())


def _padded_length(seq_len: int, vocab: int, micro_batch: int, nth: int) -> int:
    """The padded length of the ``nth`` micro-batch notebook 01 measures (its documents, its shuffle)."""
    docs = batches.random_documents(400, vocab, seq_len // 8, seq_len, seed=0)
    stream = batches.padded_batches(docs, micro_batch, 0, seed=0)
    return next(b for i, b in enumerate(stream) if i == nth)["input_ids"].shape[1]


def ladder_compiled(figures: dict) -> bool:
    """Whether notebook 01's run (its ``figures``) built its ladder and offload rows on the default path,
    compiled decoder layers on a bf16 GPU: every run since commit af656aa, which made that path the default
    and the estimate's 10% check on the ladder a target, so its row is in ``targets``. Not the compiled
    full-step row: the H100 run before (``results/history``, commit 9a7a728) measured that beside an eager
    ladder."""
    return any(t["target"].startswith("the estimate within 10%") for t in figures["targets"])


def notebook_01(vocab: int) -> list[tuple[str, str, Plan, float]]:
    """Notebook 01 (1 x H100): its ladder, speed ablation, full-step and offload rows. Its ladder and
    offload rows run the default path, compiled layers on a GPU, in the runs ``ladder_compiled`` finds.
    The full steps with Liger Kernel's kernels or Apple's Cut Cross-Entropy are left out: their kernels
    keep other tensors than the model's modules, which the estimate does not model."""
    figures, out = _load("01_large_models_limited_hardware")["figures"], []
    base = Plan(GPU_MODEL, "full", "bf16", micro_batch=8, seq_len=2048, packed=True,
                compiled=ladder_compiled(figures))
    qlora = replace(base, method="qlora")
    ladder = [replace(base, chunked_loss=False), qlora, replace(qlora, checkpoint_every=1),
              replace(qlora, checkpoint_every=1, micro_batch=2, accum_steps=4),
              replace(qlora, checkpoint_every=1, micro_batch=2, accum_steps=4, optimizer="offload")]
    out += [("01 ladder", r["name"], p, r["memory_bytes"]["peak"]) for r, p in zip(figures["ladder"], ladder)]
    docs = replace(qlora, micro_batch=4, checkpoint_every=1, upcast_fp32=True, lora_dropout=0.05,
                   chunked_loss=False, compiled=False)
    padded = _padded_length(2048, vocab, 4, nth=7)  # bench.run: 1 warm-up + 6 timed steps, then measured
    bf16 = replace(docs, upcast_fp32=False)
    speed = {"docs QLoRA, padded": replace(docs, seq_len=padded), "docs QLoRA + packing (baseline)": docs,
             "+ bf16 weights (no fp32 upcast)": bf16, "+ no adapter dropout": replace(bf16, lora_dropout=0.0),
             "+ non-reentrant checkpointing": replace(bf16, lora_dropout=0.0),
             "+ fused chunked loss (ours)": replace(bf16, lora_dropout=0.0, chunked_loss=True),
             "ours with Liger's fused loss instead": replace(bf16, lora_dropout=0.0, chunked_loss=True)}
    out += [("01 speed", r["name"], speed[r["name"]], r["memory_bytes"]["peak"]) for r in figures["speed"]]
    step = replace(base, micro_batch=4, packed=False, chunked_loss=False, compiled=False)
    peers = ("Liger", "Cut Cross-Entropy")  # kernels that keep other tensors than the model's modules
    for r in (r for r in figures["full_step"] if not any(p in r["name"] for p in peers) and not r["oom"]):
        plan = replace(step, chunked_loss="chunked" in r["name"], compiled="compiled" in r["name"])
        out.append(("01 full step", r["name"], plan, r["memory_bytes"]["peak"]))
    offload = figures["offload_full"]
    out.append(("01 offload", offload["name"], replace(base, optimizer="offload"),
                offload["memory_bytes"]["peak"]))
    return out


def notebook_02() -> list[tuple[str, str, Plan, float]]:
    """Notebook 02 (2 x H200, the run of commit c627bfc): memory per GPU by strategy, and the speed runs."""
    figures, out = _load("02_multi_gpu_training")["figures"], []
    for name, r in figures["scale"].items():
        if "error" in r:
            continue
        world = max(r["world_size"], r.get("gpus") or 1)
        accum = r["global_batch"] // (r["micro_batch"] * r["world_size"])
        plan = Plan(GPU_MODEL, "qlora" if name == "fsdp2-qlora" else "full", "mixed",
                    "fsdp2" if name == "fsdp2-qlora" else name, world, r["micro_batch"], r["seq_len"], accum,
                    packed=False, chunked_loss=r["loss"] == "fused", optimizer="foreach",
                    ddp_bucket_view=bool((r.get("engine_config") or {}).get("gradient_as_bucket_view")),
                    compiled=bool(r.get("compiled")))
        out.append(("02 memory", name, plan, r["peak_bytes"]))
    for gpus, r in figures["speed"].items():
        accum = r["global_batch"] // (r["micro_batch"] * r["world_size"])
        plan = Plan(GPU_MODEL, "full", "mixed", "fsdp2", int(gpus), r["micro_batch"], r["seq_len"], accum,
                    packed=False, chunked_loss=r["loss"] == "fused", optimizer="foreach",
                    compiled=bool(r.get("compiled")))
        out.append(("02 speed", f"fsdp2 on {gpus} GPU(s)" + (", compiled" if plan.compiled else ""), plan,
                    r["peak_bytes"]))
    return out


def notebook_04() -> list[tuple[str, str, Plan, float]]:
    """Notebook 04 (1 x H200, batch 1): checkpointing against length, and the ladder's rungs and probes."""
    figures, out = _load("04_training_long_sequences")["figures"], []
    base = Plan(GPU_MODEL, "full", "bf16", micro_batch=1, packed=False, optimizer="foreach")
    every = {"none": 0, "every 2nd layer": 2, "every layer": 1}
    for r in figures["checkpointing"]:
        plan = replace(base, seq_len=r["seq_len"], checkpoint_every=every[r["name"]], chunked_loss=True)
        out.append(("04 checkpointing", f"{r['name']} @ {r['seq_len']}", plan, r["peak_bytes"]))
    rungs = {"eager attention, full logits": dict(attention="eager", chunked_loss=False),
             "SDPA (transformers' default)": dict(chunked_loss=False),
             "baseline: SDPA + gradient_checkpointing_enable()": dict(checkpoint_every=1, chunked_loss=False),
             "+ chunked cross-entropy": dict(checkpoint_every=1),
             "+ activation offloading": dict(checkpoint_every=1, offload_activations=True)}
    for r in figures["ladder_probes"]:
        plan = replace(base, seq_len=r["seq_len"], **rungs[r["name"]])
        measured = None if r["oom"] else r["peak_bytes"]
        out.append(("04 ladder", f"{r['name']} @ {r['seq_len']}", plan, measured))
    return out


def committed_rows() -> list[dict]:
    """Every committed measured row: its plan, measured and predicted peak (bytes), the error, and a note."""
    config = model_config(GPU_MODEL)
    rows = notebook_01(config.vocab_size) + notebook_02() + notebook_04()
    out = []
    for table, name, plan, measured in rows:
        predicted = estimate(plan, config)
        hits = (("compiled adapters", plan.compiled and plan.method != "full" and plan.checkpoint_every > 0),
                ("torch.compile", plan.compiled), ("liger", "Liger" in name))
        note = next((NOTES[key] for key, hit in hits if hit), "")
        out.append({"table": table, "row": name, "plan": plan, "measured": measured,
                    "predicted": predicted.peak, "moment": predicted.moment, "note": note,
                    "error": None if measured is None else predicted.peak / measured - 1})
    return out


def ladder_plans(rows: list[dict], rungs, model: str, hw) -> list[Plan]:
    """Each probe of the long-context ladder (``long_context.ladder.climb``'s rows, one step at batch 1) as
    the plan it ran: full fine-tuning with torch's AdamW, and its rung's attention, checkpointing, offload,
    loss, MLP tiling and RoPE extension (``rungs``: the ``ladder.Rung``s, read by their attributes), on the
    machine ``hw``."""
    by_name = {rung.name: rung for rung in rungs}
    plans = []
    for row in rows:
        rung = by_name[row["name"]]
        every = rung.checkpoint_every or int(rung.documented_checkpointing)
        plan = Plan(model, "full", "bf16", micro_batch=1, seq_len=row["seq_len"], packed=False,
                    optimizer="foreach", attention=rung.attention, checkpoint_every=every,
                    chunked_loss=rung.chunked_loss, offload_activations=rung.offload_activations,
                    tile_mlp_tokens=rung.tile_mlp_tokens or 0,
                    rope_positions=rung.rope_positions or 0)
        plans.append(for_hardware(plan, hw))
    return plans


def longest_fitting(plan_at: Callable[[int], Plan], gpu_bytes: float, host_bytes: float | None = None,
                    start: int = 1024, cap: int = 2**24, config=None) -> tuple[int | None, str]:
    """The longest length whose plan ``plan_at(n)`` is predicted to fit ``gpu_bytes`` of GPU memory (and
    ``host_bytes`` of host memory for offloaded activations), and what stops a longer one: ``"GPU memory"``,
    ``"host memory"`` or ``"cap"`` (``cap`` tokens reached). Doubles from ``start``, then bisects on
    multiples of ``start``, as the ladder's search does; ``(None, why)`` if ``start`` does not fit."""
    def stop(n: int) -> str | None:
        predicted = estimate(plan_at(n), config)
        if predicted.peak > gpu_bytes:
            return "GPU memory"
        return "host memory" if host_bytes is not None and predicted.host > host_bytes else None

    best, length = None, start
    while length <= cap and (why := stop(length)) is None:
        best, length = length, length * 2
    if length > cap:
        return best, "cap"
    low, high = best, length
    while low is not None and high - low > start:
        middle = (low + high) // 2 // start * start
        if (reason := stop(middle)) is None:
            low = middle
        else:
            high, why = middle, reason
    return low, why


def side_by_side(rows: list[dict], plans: list[Plan], config=None, host: bool = False):
    """A pandas table of measured rows (``bench.run``'s or ``ladder_bench.train_step``'s) beside the peak
    predicted for each one's plan: GiB on a GPU, MiB on a CPU, the error in % (NaN where it ran out of
    memory) and the moment of the predicted peak. With ``host``, also the host memory predicted for
    offloaded activations (``Estimate.host``) beside the rows' ``host_bytes`` ("-" where a row has none:
    on a CPU the host memory is the device's, and the peak counts it)."""
    import pandas as pd

    lengths = {row.get("seq_len") for row in rows}
    records = []
    for row, plan in zip(rows, plans, strict=True):
        predicted = estimate(plan, config)
        unit, scale = ("GiB", 2**30) if plan.device == "cuda" else ("MiB", 2**20)
        measured = row["memory"].peak if row.get("memory") else row.get("peak_bytes")
        name = row["name"] + (f" @ {row['seq_len']:,}" if len(lengths) > 1 else "")
        record = {"configuration": name, f"predicted ({unit})": round(predicted.peak / scale, 2),
                  f"measured ({unit})": "OOM" if measured is None else round(measured / scale, 2),
                  "error %": float("nan") if measured is None
                  else round(100 * (predicted.peak / measured - 1), 1),
                  "peak at": predicted.moment}
        if host:
            record[f"host predicted ({unit})"] = round(predicted.host / scale, 2)
            record[f"host measured ({unit})"] = "-" if row.get("host_bytes") is None else round(
                row["host_bytes"] / scale, 2)
        records.append(record)
    return pd.DataFrame(records).set_index("configuration")


def reach(plan: Plan, hw, measured_len: int, measured_seconds: float, time_limit_s: float,
          budget: int | None = None, start: int = 1024, config=None) -> dict:
    """What the estimate predicts ``plan`` reaches at other lengths (RoPE extended to each), at batch 1 on
    the machine ``hw``: the longest length memory allows (``longest_fitting``: the GPU's usable memory or
    ``budget`` bytes, and on CUDA the host's physical memory for the offloaded activations), its predicted
    GPU peak and host bytes, the step time there (``flops.scaled_step_seconds`` from a step measured at
    ``measured_len`` tokens in ``measured_seconds``), and what stops a longer run: memory, or ``"time"``
    where that step would take over ``time_limit_s``. ``longest in time`` is the longest length whose
    predicted step takes at most ``time_limit_s`` (on multiples of ``start``; None if none does)."""
    config = config or model_config(plan.model)

    def plan_at(n: int) -> Plan:
        return replace(plan, seq_len=n, rope_positions=max(n, plan.rope_positions))

    gpu_bytes = budget or advisor.usable(hw.memory_bytes)
    host_bytes = memory.host_total_bytes() if hw.cuda else None
    longest, why = longest_fitting(plan_at, gpu_bytes, host_bytes, start=start, config=config)
    out = {"longest by memory": longest, "memory stops it at": why}
    if longest is None:
        return out | {"what stops": why}

    def seconds(n: int) -> float:
        return flops.scaled_step_seconds(config, n, measured_len, measured_seconds)

    low, high = 0, longest // start  # bisect on multiples of start: the step's time grows with length
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if seconds(middle * start) <= time_limit_s else (low, middle - 1)
    predicted, slow = estimate(plan_at(longest), config), seconds(longest) > time_limit_s
    return out | {"GPU peak (GiB)": predicted.peak / 2**30, "host (GiB)": predicted.host / 2**30,
                  "step s there": seconds(longest), "what stops": "time" if slow else why,
                  "longest in time": low * start or None}


def oom_advice(rows: list[dict], plans: list[Plan], hw, budget: int | None = None, config=None) -> list[str]:
    """For every row that ran out of memory, the advisor's answer: the cheapest changes that make its plan
    fit this device (``hw``'s memory, or ``budget`` bytes where a CPU run plays a smaller device)."""
    ran_out = [(row, plan) for row, plan in zip(rows, plans, strict=True) if row["oom"]]
    if not ran_out:
        return ["no row ran out of memory"]
    limit = budget or advisor.usable(hw.memory_bytes)
    lengths = {row.get("seq_len") for row in rows}
    return [row["name"] + (f" @ {row['seq_len']:,}" if len(lengths) > 1 else "") + ": "
            + advisor.advice_text(plan, limit, config) for row, plan in ran_out]

