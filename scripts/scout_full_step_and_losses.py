"""Issue 14 scouting: our full-FT step vs plain transformers; fused losses at 8192 x 128256."""
import json, os, sys, time, statistics, traceback
import torch
sys.path.insert(0, os.getcwd())
from recipes_lib.core import hardware, models, train, losses, batches
from recipes_lib.measure import memory, timing

hw = hardware.detect()
out = {}
B, T = 4, 2048

def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(128000, (B, T), generator=g).to(hw.device)
    return {"input_ids": ids, "labels": ids}

def timed(step, n=8, warm=3):
    for _ in range(warm): step()
    t = [timing.seconds(step, hw.device) for _ in range(n)]
    med = statistics.median(t)
    return {"tok_s": B*T/med, "lo": B*T/max(t), "hi": B*T/min(t)}

def run(name, fused_adam, fn):
    torch.manual_seed(0)
    model = models.load_model("random:llama-3.2-1b").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_adam)
    b = batch()
    try:
        r = timed(lambda: fn(model, opt, b))
        r["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as e:
        r = {"error": repr(e)[:300]}
    print(name, r, flush=True); out[name] = r
    del model, opt; torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()

def plain(clip):
    def f(model, opt, b):
        loss = model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss
        loss.backward()
        if clip: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    return f

def ours(fused_head, clip, amp=True):
    def f(model, opt, b):
        train.optimizer_step(model, opt, [b], hw.amp_dtype if amp else None, 1.0 if clip else None, fused_head)
    return f

def ours_packed(fused_head):
    docs = batches.random_documents(400, 128256, T // 8, T, seed=0)
    import itertools
    pk = next(iter(batches.packed_batches(docs, T, B, seed=0)))
    pk = {k: v.to(hw.device) for k, v in pk.items()}
    def f(model, opt, b):
        train.optimizer_step(model, opt, [pk], hw.amp_dtype, 1.0, fused_head)
    return f

print(torch.__version__, flush=True)
if "skip" not in sys.argv: run("plain foreach noclip", False, plain(False))
if "skip" not in sys.argv: run("plain fused clip (Trainer defaults)", True, plain(True))
if "skip" not in sys.argv: run("ours fusedhead clip foreach", False, ours(True, True))
if "skip" not in sys.argv: run("ours fusedhead clip fused", True, ours(True, True))
if "skip" not in sys.argv: run("ours fullhead clip fused", True, ours(False, True))
if "skip" not in sys.argv: run("ours fullhead clip fused noamp", True, ours(False, True, amp=False))
if "skip" not in sys.argv: run("ours fusedhead clip fused noamp", True, ours(True, True, amp=False))
run("ours packed fusedhead", True, ours_packed(True))
run("ours packed fullhead", True, ours_packed(False))

# losses at 8192 x 128256 x 2048
N, V, D = 8192, 128256, 2048
def loss_bench(name, fn):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
    y = torch.randint(V, (N,), device="cuda", generator=g)
    def step():
        h.grad = None; w.grad = None
        fn(h, w, y).backward()
    try:
        for _ in range(2): step()
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = [timing.seconds(step, hw.device) for _ in range(7)]
        r = {"ms": 1e3*statistics.median(t), "lo": 1e3*min(t), "hi": 1e3*max(t),
             "peak_above_GiB": (torch.cuda.max_memory_allocated() - base) / 2**30}
    except Exception as e:
        r = {"error": traceback.format_exc()[-600:]}
    print(name, r, flush=True); out["loss " + name] = r

def std(h, w, y):
    return torch.nn.functional.cross_entropy((h @ w.T).float(), y, reduction="sum")
def chunked(h, w, y):
    return losses.linear_cross_entropy(h[None], w, torch.nn.functional.pad(y, (1, 0))[None])
loss_bench("standard", std)
loss_bench("ours chunked", chunked)
try:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    lg = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    loss_bench("liger", lambda h, w, y: lg(w, h, y))
except Exception: print(traceback.format_exc())
try:
    from cut_cross_entropy import linear_cross_entropy as cce
    loss_bench("cce", lambda h, w, y: cce(h, w, y, reduction="sum"))
except Exception: print(traceback.format_exc())
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/scout14.json", "w"), indent=1)
