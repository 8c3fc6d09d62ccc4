"""GPU smoke test of issue 18 point 4's default path in notebook 01's ladder: does each rung build and run,
and how far is the estimate? (2 timed steps each; not a measurement for the notebook.) Its H100 output:
results/history/01_default_path_smoke.H100.log. SMOKE_MODEL / SMOKE_SEQ shrink it for a CPU dry run."""
import os
import time

import torch
from transformers import AutoConfig

from recipes_lib.core import batches, hardware, models, speed
from recipes_lib.measure import bench, estimate, estimate_check
from recipes_lib.memory import offload, qlora

hw = hardware.detect()
NAME, SEQ = os.environ.get("SMOKE_MODEL", "random:llama-3.2-1b"), int(os.environ.get("SMOKE_SEQ", 2048))
config = AutoConfig.from_pretrained(models.resolve(NAME))
docs = batches.random_documents(200, config.vocab_size, SEQ // 8, SEQ, seed=0)
print(speed.default_compile(hw), qlora.default_path(hw), flush=True)


def packed(mb):
    return batches.packed_batches(docs, SEQ, mb, seed=0)


def adamw(m, lr=1e-5):
    return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, fused=True)


def off(m):
    return offload.offloaded_adamw(m.parameters(), hw.device, lr=1e-5)


def full():
    return speed.compile_layers(models.load_model(NAME))


def ql(ckpt):
    return lambda: qlora.qlora_model(NAME, r=16, gradient_checkpointing=ckpt)


cfgs = [bench.Config("full compiled", full, adamw, 8, fused_head=False),
        bench.Config("full compiled + offload", full, off, 8, max_grad_norm=None),
        bench.Config("QLoRA default", ql(False), adamw, 8),
        bench.Config("QLoRA default + ckpt + accum + offload", ql(True), off, 2, accum_steps=4,
                     max_grad_norm=None)]
base = estimate.Plan(NAME, "full", "bf16", micro_batch=8, seq_len=SEQ, lora_r=16)
nf4_base, qlora_compiled, _ = qlora.default_path(hw, config=config)  # what qlora_model built above
qlora_path = dict(method="qlora", compiled=qlora_compiled, nf4_base=nf4_base)
plans = [dict(chunked_loss=False, compiled=True), dict(compiled=True, optimizer="offload"), qlora_path,
         dict(qlora_path, checkpoint_every=1, micro_batch=2, accum_steps=4, optimizer="offload")]
rows = []
for c in cfgs:
    t = time.time()
    try:
        rows.append(bench.show(bench.run(c, packed, hw, steps=2, seq_len=SEQ)))
    except Exception as e:  # noqa: BLE001
        print("FAILED", c.name, repr(e)[:500], flush=True)
        rows.append(None)
    print(f"{c.name}: {time.time() - t:.0f} s", flush=True)
ok = [(r, estimate.for_hardware(estimate.with_changes(base, **p), hw)) for r, p in zip(rows, plans) if r]
print(estimate_check.side_by_side([r for r, _ in ok], [p for _, p in ok], config).to_string(), flush=True)
