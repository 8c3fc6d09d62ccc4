"""Why does QLoRA fine-tuning of the embedded model diverge in fp16 (simulated T4)? Per-step trace."""
import math, sys, time, json
import torch
from recipes_lib.core import batches, hardware, models, tasks, train
from recipes_lib.measure import quality
from recipes_lib.memory import qlora

hw = hardware.detect()
print(hw.summary(), hw.amp_dtype, hw.model_dtype, flush=True)
Q = "data/tiny-llama"
tok = models.load_tokenizer(Q)
docs = batches.encode(tok, tasks.make_examples(4000, seed=7, tasks=("reverse",)))
held = tasks.make_examples(200, seed=8, tasks=("reverse",))
import os; STEPS = int(os.environ.get("STEPS", 300))

def run(name, lr, full=False, clip=1.0, compute_fp16=False, amp=torch.float16, seed=0):
    t0 = time.time()
    torch.manual_seed(seed)
    model = models.load_model(Q) if full else qlora.qlora_model(Q, r=16, alpha=32)
    if compute_fp16:
        for m in model.modules():
            if hasattr(m, "compute_dtype") and m.__class__.__name__ == "Linear4bit":
                m.compute_dtype = torch.float16
    acts = {}
    def hook(mod, inp, out, name=None):
        if isinstance(out, torch.Tensor) and out.dtype == torch.float16:
            acts[name] = max(acts.get(name, 0.0), out.detach().abs().amax().float().item()) if not torch.isfinite(out).all() or True else 0
    hs = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) or m.__class__.__name__ in ("Linear4bit",)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = train.cosine_schedule(opt, STEPS, STEPS // 10)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    it = iter(batches.padded_batches(docs, 16, tok.pad_token_id, seed=1))
    trace = []
    for step in range(STEPS):
        acts.clear()
        norms = []
        scale = scaler.get_scale() if scaler else 1.0
        loss = train.optimizer_step(model, opt, [next(it)], autocast_dtype=amp, max_grad_norm=clip, scaler=scaler, grad_norms=norms)
        sched.step()
        top = sorted(acts.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -1e30)[:1]
        nonfin = [k for k, v in acts.items() if not math.isfinite(v)][:3]
        lmax = max((p.detach().abs().amax().item() for p in model.parameters() if p.requires_grad), default=0)
        trace.append(dict(step=step, loss=loss, scale=scale, gnorm=norms[0].item() if norms else None, lora_max=lmax,
                          act_max=top, nonfinite_modules=nonfin))
    for h in hs: h.remove()
    em = quality.task_scores(model, tok, held)["reverse"]
    bad = [t for t in trace if not math.isfinite(t["loss"]) or (t["gnorm"] is not None and not math.isfinite(t["gnorm"]))]
    print(f"== {name}: lr={lr} exact={em:.3f} nonfinite_steps={len(bad)} first_bad={bad[0]['step'] if bad else None} "
          f"final_scale={scaler.get_scale() if scaler else None} {time.time()-t0:.0f}s", flush=True)
    for t in trace[:3] + ([x for x in trace if x["step"] in range(max((bad[0]['step'] if bad else 0)-4, 0), (bad[0]['step'] if bad else 0)+3)] if bad else []) + trace[-2:]:
        print("  ", json.dumps(t, default=str), flush=True)
    for s in range(0, STEPS, 30):
        t = trace[s]; print(f"   step {s}: loss {t['loss']:.3f} scale {t['scale']:.0f} gnorm {t['gnorm']} lora_max {t['lora_max']:.3f} act {t['act_max']}")

variants = sys.argv[1:] or ["A"]
for v in variants:
    if v == "A": run("qlora fp16 lr1e-2 (notebook)", 1e-2)
    if v.startswith("S"): run(f"qlora fp16 lr1e-2 seed {v[1:]}", 1e-2, seed=int(v[1:]))
    if v == "B": run("qlora fp16 lr3e-3", 3e-3)
    if v == "C": run("qlora fp16 lr1e-2 bnb compute fp16", 1e-2, compute_fp16=True)
    if v == "D": run("qlora bf16 lr1e-2", 1e-2, amp=torch.bfloat16)
    if v == "E": run("full fp16 lr1e-3", 1e-3, full=True)
