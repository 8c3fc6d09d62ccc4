"""Scouting for issue 14 on one GPU: our full fine-tuning step against plain transformers, and the loss step.

Llama-3.2-1B shape (random weights, bf16), 4 rows x 2048 random tokens per step, 3 warm-up and 8 timed
steps per variant (tokens/s: median [min-max]); then one loss forward + backward at 8,192 tokens x
128,256 vocabulary for the full logits, our chunked loss, Liger Kernel and Cut Cross-Entropy (peak
above the inputs, median of 7 calls). ``results/history/issue14_scouting.H200.json`` holds what a first
draft of this script (the same variants, written inline) printed on an H200; notebooks 01 and 04
measure the same comparisons in their committed runs.

    python scripts/scout_full_step_and_losses.py OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from recipes_lib.core import batches, hardware, losses, models, train
from recipes_lib.measure import timing

ROWS, SEQ = 4, 2048
HW = hardware.detect()


def tokens_per_s(step, timed: int = 8, warmup: int = 3) -> dict:
    for _ in range(warmup):
        step()
    times = [timing.seconds(step, HW.device) for _ in range(timed)]
    return {"tok_s": ROWS * SEQ / statistics.median(times), "lo": ROWS * SEQ / max(times),
            "hi": ROWS * SEQ / min(times), "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}


def plain(model, optimizer, batch):
    train.plain_step(model, optimizer, [batch])


def unclipped_plain(model, optimizer, batch):
    train.plain_step(model, optimizer, [batch], max_grad_norm=None)


def ours(fused_head: bool, autocast: bool = True):
    def step(model, optimizer, batch):
        train.optimizer_step(model, optimizer, [batch], HW.amp_dtype if autocast else None, 1.0, fused_head)
    return step


def step_variant(step, fused_adamw: bool, batch: dict) -> dict:
    torch.manual_seed(0)
    model = models.load_model("random:llama-3.2-1b").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_adamw)
    row = tokens_per_s(lambda: step(model, optimizer, batch))
    model.to("meta")  # free the weights before the next variant loads its own
    optimizer.state.clear()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def loss_variant(fn, tokens: int = 8192, vocab: int = 128256, hidden: int = 2048) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    w.requires_grad_()
    y = torch.randint(vocab, (1, tokens), device="cuda", generator=gen)

    def step():
        h.grad = w.grad = None
        fn(h, w, y).backward()

    step()
    step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = [timing.seconds(step, HW.device) for _ in range(7)]
    return {"ms": 1e3 * statistics.median(times), "lo": 1e3 * min(times), "hi": 1e3 * max(times),
            "peak_above_GiB": (torch.cuda.max_memory_allocated() - base) / 2**30}


def main(out: str) -> None:
    ids = torch.randint(128000, (ROWS, SEQ), generator=torch.Generator().manual_seed(0)).to(HW.device)
    rows_batch = {"input_ids": ids, "labels": ids}
    docs = batches.random_documents(400, 128256, SEQ // 8, SEQ, seed=0)
    packed = {k: v.to(HW.device) for k, v in next(iter(batches.packed_batches(docs, SEQ, ROWS))).items()}
    variants = {
        "plain foreach noclip": (unclipped_plain, False, rows_batch),
        "plain fused clip (Trainer defaults)": (plain, True, rows_batch),
        "ours fusedhead clip foreach": (ours(True), False, rows_batch),
        "ours fusedhead clip fused": (ours(True), True, rows_batch),
        "ours fullhead clip fused": (ours(False), True, rows_batch),
        "ours fullhead clip fused noamp": (ours(False, autocast=False), True, rows_batch),
        "ours packed fusedhead": (ours(True), True, packed),
        "ours packed fullhead": (ours(False), True, packed),
    }
    results = {}
    for name, (step, fused_adamw, batch) in variants.items():
        results[name] = step_variant(step, fused_adamw, batch)
        print(name, results[name], flush=True)
    loss_fns = {"standard": lambda h, w, y: losses.cross_entropy_sum(h @ w.T, y),
                "ours chunked": losses.linear_cross_entropy,
                "liger": losses.liger_linear_cross_entropy, "cce": losses.cce_linear_cross_entropy}
    for name, fn in loss_fns.items():
        results["loss " + name] = loss_variant(fn)
        print(name, results["loss " + name], flush=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "scout.json")
