# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Training on very long sequences
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-acceleration-recipes/recipes/blob/main/notebooks/04_training_long_sequences.ipynb)
#
# After this notebook you will be able to train a model on sequences many times longer than its
# plain training step allows, and to know which wall you will hit next. Memory at long lengths has
# three growing terms, and each recipe removes one:
#
# - **attention scores and probabilities**, `heads × L²` per layer: **flash attention** (SDPA) never
#   stores them; **sparse attention** (FlexAttention block masks, **sliding windows**) skips most of them;
# - **layer activations**, `≈ 20 × L × hidden` per layer: **gradient checkpointing** keeps one tensor
#   per layer and recomputes the rest;
# - **logits for the loss**, `L × vocab` per step (fp32: 1 GiB at 2k tokens × 128k vocab):
#   **chunked cross-entropy** never materialises them.
#
# Past the model's position limit (section 4b), as in Arctic Long Sequence Training: **RoPE extension**
# lifts the limit, and a **tiled MLP** removes the largest tensors left, the MLP's `L × intermediate`
# ones; section 7 checks that a model fine-tuned at 4x its trained length uses what it reads there.
#
# And one recipe saves time rather than memory: a **sequence-length curriculum** trains short first,
# where attention is cheap. On a GPU the notebook uses a Llama-3.2-1B-shaped model (random weights:
# memory and speed do not depend on the values); the accuracy trade-off of sliding windows is measured
# on the embedded tiny model, which has learned a long-range retrieval task. On a CPU the same code runs
# at a small size under a small memory budget, so CI checks every claim.

# %% [markdown]
# ## Setup
# On Colab (or wherever `RECIPES_COLAB=1` is set) this cell clones the repository, for its embedded
# model, data and configs, and installs the package with the notebooks' extras; the torch already
# installed stays. Elsewhere it does nothing. To run a fork, set `REPO_URL` to it, or run
# `python scripts/set_repo_url.py <your fork's URL>` once (README, "Colab").

# %%
import importlib.util
import os
import subprocess
import sys

REPO_URL = "https://github.com/llm-acceleration-recipes/recipes"
if "google.colab" in sys.modules or os.environ.get("RECIPES_COLAB") == "1":
    HOME = os.environ.setdefault("RECIPES_HOME", "/content/recipes")  # where recipes_lib finds data/
    if not os.path.isdir(HOME):
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, HOME], check=True)
    if importlib.util.find_spec("recipes_lib") is None:  # pip keeps the installed torch (torch>=2.6)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{HOME}[notebooks]"], check=True)
        importlib.invalidate_caches()

# %% tags=["parameters"]
PROFILE = "auto"  # "cpu": CI-sized, under a memory budget; "gpu": Llama-3.2-1B shape to its 128k limit, then
# past it with RoPE extended to 512k;
# "t4" / "l4": sized for a 16 GB T4 (fp16) / a 24 GB L4, about 10 minutes there; "auto": by the GPU found
MODEL = None      # override the profile's model: a hub id, a local path, or random:<shape>
PROFILES = {
    "cpu": dict(model="random:llama-mini", budget_mib=128, ladder_start=256, ladder_limit=4096,
                attn_lengths=[256, 512, 1024, 2048], flex_lengths=[2048], slide_at=2048, attn_heads=4,
                head_dim=32, window=256, ce_tokens=2048, ce_vocab=32768, ce_hidden=64,
                ckpt_lengths=[512, 1024, 2048],
                curriculum=dict(target=512, start=64, steps=32, tokens_per_step=2048, lr=3e-3, eval_every=4,
                                model={}),
                tradeoff_examples=24, rope_positions=12288, tile_mlp_tokens=1024,
                long_kv=dict(steps=24, batch=1, lr=1e-3, per_distance=8)),
    "gpu": dict(model="random:llama-3.2-1b", budget_mib=None, ladder_start=1024, ladder_limit=131072,
                attn_lengths=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
                flex_lengths=[8192, 32768], slide_at=32768, attn_heads=32, head_dim=64,
                window=4096, ce_tokens=8192, ce_vocab=128256, ce_hidden=2048,
                ckpt_lengths=[4096, 8192, 16384],
                curriculum=dict(target=16384, start=2048, steps=240, tokens_per_step=65536, lr=1e-3,
                                eval_every=8,
                                model=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                           num_attention_heads=8, num_key_value_heads=8, head_dim=64)),
                tradeoff_examples=200, rope_positions=2**19, tile_mlp_tokens=16384,
                long_kv=dict(steps=300, batch=8, lr=1e-3, per_distance=50)),
}
# A 16 GB T4 (fp16, fp32 master weights): a 360M Llama, since the 1B shape's fp32 weights and AdamW state
# alone take 20 GB; a 24 GB L4: the 1B shape. Both stop at shorter lengths, sized for about 10 minutes.
SMALL_CURRICULUM = dict(PROFILES["gpu"]["curriculum"], target=8192, start=1024, steps=120,
                        tokens_per_step=32768)
PROFILES["t4"] = dict(PROFILES["gpu"], model="random:llama-360m", ladder_limit=32768, rope_positions=32768,
                      attn_lengths=[1024, 2048, 4096, 8192, 16384], flex_lengths=[4096, 16384],
                      slide_at=16384, ce_tokens=4096, ckpt_lengths=[2048, 4096, 8192],
                      curriculum=SMALL_CURRICULUM, tradeoff_examples=100)
PROFILES["l4"] = dict(PROFILES["gpu"], ladder_limit=65536, rope_positions=65536,
                      ckpt_lengths=[2048, 4096, 8192], attn_lengths=[1024, 2048, 4096, 8192, 16384, 32768],
                      curriculum=SMALL_CURRICULUM, tradeoff_examples=100)
QUALITY_MODEL = "data/tiny-llama"     # knows the kv retrieval task: the window trade-off is measured on it
WINDOWS = [16, 32, 64, 128]           # sliding windows (tokens) for the trade-off
SINKS = 4                             # first tokens visible to every query (StreamingLLM's attention sinks)
DISTANCES = [0, 2, 4, 8, 12, 16, 23]  # facts between the asked fact and the question (24 facts, ~8 tokens)
TRAINED_LENGTH = 256                  # the embedded model's pre-training rows (data/tiny-llama/eval.json)
LONG_DISTANCES = [0, 16, 32, 48, 64, 80, 96, 112]  # the same task filled to 4x that length (~115 facts)
STEP_LIMIT_S = 600                    # the time wall: a longer step makes 1,000 steps take over a week

# %%
from recipes_lib import notebook

hw, P, targets = notebook.setup(PROFILES, MODEL, PROFILE, benchmark_gpu="H100")

# %%
import itertools
import random
import warnings

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import display
from transformers import AutoConfig

from recipes_lib import plots, results
from recipes_lib.attention import kernels, masks, sliding
from recipes_lib.core import batches, checkpointing, errors, losses, models, tasks, train
from recipes_lib.long_context import curriculum, ladder, retrieval, tiling
from recipes_lib.measure import attention_bench, estimate_check, flops, ladder_bench, loss_bench, workload
from recipes_lib.measure.memory import GiB
from recipes_lib.measure.report import report

BUDGET = P["budget_mib"] * 2**20 if P["budget_mib"] else None  # the CPU's stand-in for a small device
print("memory budget:", "the whole device" if BUDGET is None else f"{P['budget_mib']} MiB")

notebook.state_runtime(P, *workload.notebook04(P, AutoConfig.from_pretrained(models.resolve(P["model"]))))


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# %% [markdown]
# ## 1 · Efficient attention: flash (SDPA) and sparse (FlexAttention)
#
# Causal attention over `L` tokens computes `L²/2` query-key pairs per head. Eager attention stores
# the `[heads, L, L]` scores and probabilities for the backward pass: `heads × L² × (2 + 4 + 2)` bytes
# per layer in bf16 with an fp32 softmax, 256 GiB for one layer of 32 heads at 32k tokens. **Flash
# attention** (SDPA's flash and cuDNN kernels) walks the pairs in tiles held in on-chip memory and
# recomputes them in backward: memory `O(L)`, work unchanged. **FlexAttention** compiles the same
# tiled kernel for any mask given as a function, and skips tiles that are entirely masked: a
# **sliding window** of `w` tokens costs `L × w` pairs instead of `L²/2`.
#
# First, the claim that they all compute the same thing: every implementation against SDPA with the
# equivalent dense boolean mask (causal, and a sliding window).

# %%
CHECK_LEN, CHECK_WINDOW = 640, 100  # not multiples of the 128-token tiles, on purpose
q, k, v = kernels.random_qkv(1, 4, CHECK_LEN, 64, hw.device, hw.model_dtype)
tolerance = 2e-2 if hw.model_dtype == torch.bfloat16 else 1e-5


references = {window: F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     attn_mask=masks.dense_mask(CHECK_LEN, window, hw.device))
              for window in (None, CHECK_WINDOW)}


def error_vs_dense_mask(impl, window):
    try:
        return rel_error(kernels.attend(impl, q, k, v, window), references[window])
    except RuntimeError:  # flash-style kernels take causal masks only, not arbitrary ones
        return None


checked = [*itertools.product(["eager", *(f"sdpa-{b}" for b in hw.sdpa_backends)], [None, CHECK_WINDOW]),
           ("flex-causal", None), ("flex-sliding", CHECK_WINDOW)]
agreement = {(impl, window): error_vs_dense_mask(impl, window) for impl, window in checked}
gqa = [torch.randn(1, h, CHECK_LEN, 64, device=hw.device, dtype=hw.model_dtype) for h in (8, 2, 2)]
gqa_reference = F.scaled_dot_product_attention(  # grouped-query attention, as in Llama: 8 query heads, 2 kv
    gqa[0].float(), gqa[1].float().repeat_interleave(4, 1), gqa[2].float().repeat_interleave(4, 1),
    attn_mask=masks.dense_mask(CHECK_LEN, CHECK_WINDOW, hw.device))
agreement[("flex-sliding GQA", CHECK_WINDOW)] = rel_error(kernels.flex(*gqa, CHECK_WINDOW), gqa_reference)
display(pd.Series({f"{impl} ({'causal' if w is None else f'window {w}'})": "no kernel for a custom mask"
                   if e is None else f"{e:.2e}" for (impl, w), e in agreement.items()},
                  name="rel. error vs dense-mask SDPA (fp32)").to_frame())

# %%
assert all(e < tolerance for e in agreement.values() if e is not None), f"a kernel disagrees > {tolerance}"
assert None not in (agreement[("eager", CHECK_WINDOW)], agreement[("flex-sliding", CHECK_WINDOW)])
assert rel_error(kernels.flex(q, k, v, CHECK_WINDOW), kernels.flex(q, k, v, None)) > 0.01, \
    "the sliding window should change the output (it hides keys further than the window)"


# %% [markdown]
# ### Time and memory against sequence length
# One attention layer, forward + backward, `heads × head_dim` as in Llama-3.2-1B (32 × 64, all heads
# with their own keys), median of 5 timed calls after a warm-up; memory is the peak above the inputs.
# Eager attention runs out of memory where its `L²` tensors no longer fit; the tiled kernels go on.
# FlexAttention compiles one kernel per length and mask (10-30 s each), so it is timed at fewer lengths.
# (FlexAttention has no backward pass on CPU, so a CPU run times forward passes only.)

# %%
BACKWARD = hw.cuda
impls = ["eager", *(f"sdpa-{b}" for b in hw.sdpa_backends if b != "math"), "flex-causal", "flex-sliding"]


def timed_here(impl, n):  # Flex at fewer lengths (compile time), the window only where it is shorter
    return not impl.startswith("flex") or n in P["flex_lengths"] and (impl[5:] == "causal" or P["window"] < n)


planned = [(impl, n) for n, impl in itertools.product(P["attn_lengths"], impls) if timed_here(impl, n)]


def attention_row(impl, seq_len):
    window = P["window"] if impl == "flex-sliding" else None
    if any(r["oom"] for r in attn_rows if r["implementation"] == impl):  # longer runs out of memory too
        return {"implementation": impl, "seq_len": seq_len, "window": window, "oom": True, "skipped": True}
    return attention_bench.time_attention(impl, seq_len, P["attn_heads"], P["head_dim"], hw, window, BACKWARD)


def attention_table(key, scale):
    cells = [{"implementation": r["implementation"], "L": r["seq_len"], key: "OOM" if r["oom"] else "n/a"
              if r[key] is None else round(r[key] * scale, 1)} for r in attn_rows]
    table = pd.DataFrame(cells).pivot(index="implementation", columns="L", values=key).loc[impls]
    return table.astype(object).fillna("-")


print("timing", "forward + backward" if BACKWARD else "forward only (CPU)")
attn_rows = []
for impl, seq_len in planned:
    attn_rows.append(attention_row(impl, seq_len))
display(attention_table("seconds", 1e3).rename_axis(columns="ms at L ="))
display(attention_table("peak_bytes", 2**-20).rename_axis(columns="peak MiB at L ="))

# %%
time_axis = "forward + backward (ms)" if BACKWARD else "forward (ms)"
log_axes = dict(xlabel="sequence length (tokens)", logx=True, logy=True)


def by_impl(key, scale):
    return plots.series_of(attn_rows, "implementation", "seq_len", key, scale, impls)


plots.side_by_side([
    (plots.curves, dict(series=by_impl("seconds", 1e3), ylabel=time_axis, **log_axes,
                        title="time: eager and causal kernels grow as L², a window as L")),
    (plots.curves, dict(series=by_impl("peak_bytes", 2**-20), ylabel="peak above inputs (MiB)", **log_axes,
                        title="memory: eager grows as L² until it runs out"))])
plt.show()

# %%
longest = P["slide_at"]
timed = {(r["implementation"], r["seq_len"]): r["seconds"] for r in attn_rows if not r["oom"]}
sliding_s, flex_causal_s = timed[("flex-sliding", longest)], timed[("flex-causal", longest)]
fastest_causal = min((timed[(f"sdpa-{b}", longest)], b) for b in hw.sdpa_backends
                     if b != "math" and timed.get((f"sdpa-{b}", longest)))
sliding_speedup = flex_causal_s / sliding_s
report(f"window {P['window']} @ {longest}", **{"x vs flex causal": sliding_speedup,
       f"x vs sdpa-{fastest_causal[1]} causal": fastest_causal[0] / sliding_s,
       "ideal (pairs ratio)": flops.attention_flops(longest, 1, 1) / flops.attention_flops(longest, 1, 1,
                                                                                         P["window"])})
eager_rows = [r for r in attn_rows if r["implementation"] == "eager"]
eager_fit = [r for r in eager_rows if not r["oom"]][-1]
tiled = f"sdpa-{hw.sdpa_backends[0]}"
tiled_peak = {r["seq_len"]: r.get("peak_bytes") for r in attn_rows if r["implementation"] == tiled}
if hw.cuda:
    assert eager_rows[-1]["oom"], "eager attention should run out of memory at the longest length"
assert eager_fit["peak_bytes"] > 4 * tiled_peak[eager_fit["seq_len"]], \
    "eager attention should need several times the memory of the tiled kernel"
fastest = {(r["implementation"], r["seq_len"]): r["seconds_min"] for r in attn_rows if not r["oom"]}
# A shared CPU (CI runs two test files at once) can preempt any call: there, compare the fastest. A GPU may
# be shared too (issue 17): there the claim is the target below (3x, of the medians), missed, not raised.
assert hw.cuda or fastest[("flex-sliding", longest)] < fastest[("flex-causal", longest)], \
    "the sliding window should beat full causal attention in the same kernel"
if hw.cuda:
    targets.check(f"window 4k at {longest // 1024}k tokens >= 3x faster than full causal (fwd+bwd, same "
                  "kernel)", f"{sliding_speedup:.2f}x",
                  longest == 32768 and P["window"] == 4096 and sliding_speedup >= 3)


# %% [markdown]
# ## 2 · Chunked cross-entropy
#
# The loss needs `logits = hidden @ Wᵀ`, `[tokens, vocab]`: at 8k tokens and Llama-3's 128k vocabulary
# that is 2 GiB in bf16, 4 GiB upcast to fp32, and as much again for the log-softmax and its gradient.
# `losses.linear_cross_entropy` walks the tokens in chunks of 1024 and computes each chunk's loss *and
# gradient* in the forward pass (softmax minus one-hot, times the hidden states), so only one chunk's
# logits ever exist and backward has nothing left to recompute. First: the same loss and gradients
# as the standard computation, in fp32.

# %%
gen = torch.Generator().manual_seed(0)
T_CHECK, V_CHECK, D_CHECK = 1000, 5000, 64  # 1000 tokens in chunks of 256: the last chunk is shorter
hidden = torch.randn(1, T_CHECK, D_CHECK, generator=gen, requires_grad=True)
weight = (torch.randn(V_CHECK, D_CHECK, generator=gen) * 0.1).requires_grad_()
labels = torch.randint(V_CHECK, (1, T_CHECK), generator=gen)
labels[0, ::7] = losses.IGNORE_INDEX  # masked targets too
reference_loss = losses.cross_entropy_sum(hidden @ weight.T, labels)
reference_grads = torch.autograd.grad(reference_loss, [hidden, weight])
chunked_loss = losses.linear_cross_entropy(hidden, weight, labels, chunk_size=256)
chunked_grads = torch.autograd.grad(chunked_loss, [hidden, weight])
ce_errors = {"loss": rel_error(chunked_loss, reference_loss),
             "d hidden": rel_error(chunked_grads[0], reference_grads[0]),
             "d weight": rel_error(chunked_grads[1], reference_grads[1])}
report("chunked vs standard (fp32)", **{f"rel. error {k}": v for k, v in ce_errors.items()})

# %%
assert all(err < 1e-5 for err in ce_errors.values()), ce_errors


# %% [markdown]
# ### The loss step against the maintained fused losses
# Hidden states `[tokens, hidden]` and the head `[vocab, hidden]` in the model's dtype; one loss
# forward + backward, its peak above those inputs (the weight gradient, which training needs either
# way, included in all) and its time, the median of 5 calls with the fastest and slowest. Beside our
# chunked loss, the two maintained fused kernels a user can install instead: **Liger Kernel**'s fused
# linear cross-entropy and Apple's **Cut Cross-Entropy** (its documented default, which skips the
# gradient of vocabulary entries whose softmax is negligible). Both are Triton kernels: on a CPU
# their rows say so.

# %%
ce_shape = dict(tokens=P["ce_tokens"], vocab=P["ce_vocab"], hidden=P["ce_hidden"])
ce_rows = [loss_bench.loss_step(hw, **ce_shape, name=name) for name in loss_bench.LOSSES]


def loss_cells(row):
    if row.get("unavailable") or row.get("oom"):
        return {"peak above inputs (GiB)": row.get("unavailable") or "OOM"}
    t = row["timing"]
    return {"peak above inputs (GiB)": round(row["peak_bytes"] / GiB, 3), "ms": round(1e3 * t.median, 2),
            "ms range": f"{1e3 * t.low:.2f}-{1e3 * t.high:.2f}"}


print(f"loss step, {ce_shape['tokens']} tokens x {ce_shape['vocab']:,} vocab x {ce_shape['hidden']} hidden")
display(pd.DataFrame({r["loss"]: loss_cells(r) for r in ce_rows}).T.fillna("-"))
ce_standard, ce_chunked = (r["peak_bytes"] for r in ce_rows[:2])
ce_cut = 1 - ce_chunked / ce_standard
measured_ce = [r for r in ce_rows if r.get("timing")]
report("chunked vs full logits", **{"cut %": 100 * ce_cut,
       "time ratio": ce_rows[1]["timing"].median / ce_rows[0]["timing"].median})

# %%
assert ce_cut > 0.5, "the chunked loss should need far less memory than full logits"
if hw.cuda:
    targets.check("chunked cross-entropy cuts the loss step's peak >= 80% (8k tokens, 128k vocab)",
                  f"{ce_cut:.1%}", (P["ce_tokens"], P["ce_vocab"]) == (8192, 128256) and ce_cut >= 0.8)
plots.side_by_side([
    (plots.value_bars, dict(names=[r["loss"] for r in measured_ce], fmt="{:.2f}",
                            values=[r["peak_bytes"] / GiB for r in measured_ce],
                            ylabel="peak above inputs (GiB)", title="memory of the loss step")),
    (plots.value_bars, dict(names=[r["loss"] for r in measured_ce], fmt="{:.1f}",
                            values=[1e3 * r["timing"].median for r in measured_ce],
                            ylabel="forward + backward (ms, median of 5)", title="time of the loss step"))],
    title=f"{P['ce_tokens']} tokens x {P['ce_vocab']:,} vocab")
plt.show()


# %% [markdown]
# **Reading it: the maintained kernels beat ours.** On the committed H200 run our chunked loss cuts the
# loss step's peak by 83% against full logits, but takes 1.8x its time: it walks the chunks in Python
# and accumulates the head's gradient in fp32 (TF32 matmuls, a 1 GiB buffer at this vocabulary). Liger
# Kernel's fused kernel and Cut Cross-Entropy need about a third of our peak and run as fast as full
# logits. Ours stays as the readable reference that also runs on a CPU; on a GPU, install one of them
# (`losses.liger_linear_cross_entropy` and `losses.cce_linear_cross_entropy` call them with our labels).

# %% [markdown]
# ## 3 · Gradient checkpointing, full and selective
#
# Checkpointing a layer keeps only its input (`L × hidden` values) and recomputes the layer in the
# backward pass: one extra forward, about a third more work. **Selective** checkpointing recomputes
# every k-th layer only, trading memory back for speed when full checkpointing frees more than you
# need. First, the claim: the gradients are the same, on the model itself.

# %%
model = models.load_model(P["model"])
config = model.config
small = ladder_bench.random_batch(config.vocab_size, 256, hw.device, seed=1)


def gradients(every):
    checkpointing.enable_checkpointing(model, every) if every else checkpointing.disable_checkpointing(model)
    model.train().zero_grad(set_to_none=True)
    logits = model(input_ids=small["input_ids"], use_cache=False).logits
    losses.cross_entropy_sum(logits, small["labels"]).backward()
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


plain_grads = gradients(None)
ckpt_errors = {every: rel_error(gradients(every), plain_grads) for every in (1, 2)}
model.zero_grad(set_to_none=True)
del plain_grads  # a float32 copy of every gradient: it must not sit in the measurements below
report("checkpointing", **{f"every {every}: grad rel. error vs none": e for every, e in ckpt_errors.items()})

# %%
grad_tolerance = 1e-2 if hw.model_dtype == torch.bfloat16 else 1e-5
assert all(e < grad_tolerance for e in ckpt_errors.values()), ckpt_errors


# %% [markdown]
# ### Memory and throughput against length
# One training step at batch 1 (SDPA attention, chunked loss, AdamW), for no checkpointing, every
# 2nd layer, and every layer: the peak of one step, and tokens/s as the median of 5 timed steps
# after a warm-up (the range is the fastest and slowest).

# %%
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
ladder_bench.train_step(model, optimizer, 128, hw)  # the AdamW state exists from here on
ckpt_settings = {"none": None, "every 2nd layer": 2, "every layer": 1}


def step(rung, n, budget=None, repeats=1, profile=False):  # one AdamW step (or `repeats`), batch 1, n tokens
    return ladder_bench.train_step(model, optimizer, n, hw, rung.chunked_loss, budget, rung.name, repeats,
                                   profile)


def checkpointing_row(seq_len, name, every):
    rung = ladder.Rung(name, "sdpa", every, chunked_loss=True)
    ladder.apply(model, rung)
    step(rung, seq_len)  # warm-up at this shape
    return step(rung, seq_len, repeats=5)


length_axis = dict(xlabel="sequence length (tokens)", logx=True)
ckpt_plan = itertools.product(P["ckpt_lengths"], ckpt_settings.items())
ckpt_rows = [checkpointing_row(n, *setting) for n, setting in ckpt_plan]
display(ladder_bench.checkpointing_table(ckpt_rows, list(ckpt_settings)))
plots.side_by_side([
    (plots.curves, dict(series=plots.series_of(ckpt_rows, "name", "seq_len", "peak_bytes", 1 / GiB),
                        ylabel="peak memory (GiB)", title="checkpointing: memory", **length_axis)),
    (plots.curves, dict(series=plots.series_of(ckpt_rows, "name", "seq_len", "tokens_per_s"), **length_axis,
                        ylabel="tokens/s", title="checkpointing: throughput"))])
plt.show()

# %%
at_longest = {r["name"]: r for r in ckpt_rows if r["seq_len"] == P["ckpt_lengths"][-1]}
if not any(r["oom"] for r in at_longest.values()):
    none, half, every = (at_longest[n]["peak_bytes"] for n in ckpt_settings)
    assert none > half >= every, "more checkpointing should mean less peak memory"
    assert config.num_hidden_layers < 2 or half > every, "every layer checkpointed saves more than every 2nd"
    speeds = [at_longest[n]["tokens_per_s"] for n in ckpt_settings]
    report("at the longest length", **{"every-layer peak %": 100 * every / none,
                                       "every-layer tokens/s %": 100 * speeds[2] / speeds[0]})


# %% [markdown]
# ## 4 · The long-context ladder
# (`sdpa` lets PyTorch pick its fused kernel for causal attention: flash or cuDNN.)
#
# Stack the recipes one by one and find each rung's **longest trainable sequence at batch 1** (one
# full AdamW step), by doubling the length until a step runs out of memory and then bisecting. The
# search stops at the model's position limit (`max_position_embeddings`): beyond it RoPE has to be
# extended, which is a modelling change, not a memory one.
#
# **The baseline is what a user gets from the docs**: transformers' default attention (SDPA) with
# `model.gradient_checkpointing_enable()`, its own settings. Eager attention with full logits, and SDPA
# without checkpointing, are extra, earlier rungs: how far plain defaults get. Our recipes start from
# the baseline; "x baseline" compares with it. Beside each rung's longest length: one step there (warm:
# the search has just run one at that length), its peak memory, the pinned host memory it held (offloaded
# activations; measured on CUDA only, since on a CPU host memory is the device's), its time, tokens/s and
# MFU (model FLOPs over the datasheet peak: GPUs only). One step is no throughput benchmark (section 3
# times repeated steps), but at these lengths a step is long enough to read.

# %%
rungs = [ladder.Rung("eager attention, full logits", "eager"),
         ladder.Rung("SDPA (transformers' default)", "sdpa"),
         ladder.Rung("baseline: SDPA + gradient_checkpointing_enable()", documented_checkpointing=True),
         ladder.Rung("+ chunked cross-entropy", "sdpa", 1, chunked_loss=True),
         ladder.Rung("+ activation offloading", "sdpa", 1, chunked_loss=True, offload_activations=True)]
limit = min(P["ladder_limit"], config.max_position_embeddings)
ladder_rows, probes = ladder.climb(model, rungs, lambda rung, n: step(rung, n, BUDGET),
                                   min(P["ladder_start"], limit), limit)
BASELINE = 2  # the documented set-up's rung
display(ladder_table := ladder_bench.summary_table(ladder_rows, BASELINE))

# %% [markdown]
# **Predicted before running** (`recipes estimate`): each probe of the search as a plan for
# `measure.estimate`, which predicts its peak from the model's shape alone (flash attention keeps no
# `L²` term, eager `heads × L²`; the logits, or one chunk of them; `recipes estimate --help` prints every
# formula), beside the measurement; for each probe that ran out of memory, the advisor's cheapest changes
# that make it fit.

# %%
plans = estimate_check.ladder_plans(probes, rungs, P["model"], hw)
display(predicted := estimate_check.side_by_side(probes, plans, config))
assert predicted["error %"].abs().max() <= 10, "the estimate should be within 10% of every probe that ran"
print(*estimate_check.oom_advice(probes, plans, hw, BUDGET, config), sep="\n")

# %%
lengths = [r["longest"] or 0 for r in ladder_rows]
plots.side_by_side([
    (plots.value_bars, dict(names=list(ladder_table.index), values=[r["longest"] for r in ladder_rows],
                            ylabel="longest trainable sequence (tokens)",
                            title=f"longest sequence at batch 1 (limit {limit:,})")),
    (plots.value_bars, dict(names=list(ladder_table.index), values=[r["peak_bytes"] and r["peak_bytes"] / GiB
                                                                      for r in ladder_rows],
                            fmt="{:.1f}", ylabel="peak memory at that length (GiB)",
                            title="peak memory of that step"))],
    title=f"{config.num_hidden_layers} layers x {config.hidden_size} hidden, vocab {config.vocab_size:,}: "
          f"full recipe: {lengths[3] / max(lengths[BASELINE], 1):.1f}x the documented baseline's length")
plt.show()

# %% [markdown]
# The full recipe should train longer sequences than the documented baseline, unless both reach the
# model's position limit: then reaching the limit is all a memory recipe can show. Its ratio against
# the baseline is reported here, not asserted as a target: the long-context issue, which goes past the
# position limit, sets that target.

# %%
assert all(b >= a for a, b in zip(lengths, lengths[1:])), "each rung should train at least as long a sequence"
full_recipe = lengths[3]
assert full_recipe >= min(4 * lengths[0], limit), "the full recipe: 4x eager attention's length, or the limit"
report("full recipe's longest sequence", **{"tokens": full_recipe, "x documented baseline": full_recipe / max(
    lengths[BASELINE], 1), "x eager, full logits": full_recipe / max(lengths[0], 1), "position limit": limit})
if hw.cuda:
    targets.check("full recipe trains >= 64k tokens at batch 1 (or the position limit)", f"{full_recipe:,}",
                  full_recipe >= min(65536, limit))


# %% [markdown]
# **Reading the ladder** (the committed H200 run). Against eager attention with full logits the full
# recipe trains 25x longer sequences, but nobody following the docs runs eager attention. Against what
# the docs give (SDPA, which is transformers' default, plus `gradient_checkpointing_enable()`) it is
# 1.6x: 81,920 -> 131,072 tokens, and 131,072 is the model's position limit, so the search stopped
# there with over 100 GiB of the GPU to spare. SDPA alone is worth 8x over eager and checkpointing
# another 2x; the chunked loss is what takes the last step, since at 81,920 tokens the fp32 logits
# alone are 39 GiB.
# Going further needs the positions extended: the next section.

# %% [markdown]
# ## 4b · Past the position limit: tiled MLP and RoPE extension
#
# With the logits chunked and every layer's input offloaded, what still grows with length on the device
# is one layer's working set while it is recomputed and back-propagated, and at long lengths its largest
# tensors are the MLP's: the gate and up projections, the activation and their product, four
# `[tokens, intermediate]` tensors, 16x a `[tokens, hidden]` one at Llama's 4x width. Arctic Long
# Sequence Training (ALST) takes two more steps, and so do we:
#
# - **Tiled MLP** (`long_context.tiling.tile_mlp`): each MLP runs over the sequence in chunks inside one
#   autograd function that saves only its input and, in backward, recomputes and back-propagates one
#   chunk at a time. *Saves*: those four tensors shrink to one chunk's (`tile_mlp_tokens` in the
#   parameters: 16,384 tokens on the GPU; ALST's default, `seq × hidden / intermediate`, would be 131,072
#   at 2^19). *Costs*: one more forward of each MLP per step (under checkpointing, a second
#   recomputation): about a sixth more matmul work at the 1B shape, less of the step where attention
#   dominates; and more, smaller matmuls.
# - **RoPE extension** (`long_context.rope.extend_context`): rotary positions stop at
#   `max_position_embeddings`; scaling the frequencies (YaRN, or llama3 scaling for a llama3-scaled model
#   such as Llama 3.2) lifts the limit. *Saves*: nothing; *costs*: no memory and no time, but it changes
#   the model, which must then be fine-tuned at the new length to use it (section 7 measures that).
#
# Attention stays the fused kernel (SDPA): memory `O(L)`, time `O(L²)`, and that is the next wall.
# `long_context.recipe.enable(model, seq_len)` applies all of it in one call, the way `recipes train`
# does with `long_context: true`. First, the claim: the tiled MLP computes what the untiled one does,
# outputs and every gradient, in fp32 (on the CPU, in chunks that do not divide the tokens).

# %%
mlp_errors = tiling.agreement(models.load_model(QUALITY_MODEL).to("cpu", torch.float32), 1000, 256)
report("tiled vs untiled MLP (fp32)", **{f"rel. error {k}": v for k, v in mlp_errors.items()})
assert all(e < 1e-5 for e in mlp_errors.values()), mlp_errors

# %% [markdown]
# Now the two rungs, on top of the full recipe (`+ activation offloading`): the tiled MLP, searched up to
# the same limit as the rungs before it, then RoPE extended to `rope_positions` and searched up to there.
# On the GPU that is 2^19 = 524,288 tokens, 4x the model's limit; a step there takes minutes (attention is
# quadratic: about 3.5 on an H200 by the model FLOPs of the 131,072-token step measured above), so this
# cell runs about seven (a step of a minute or more is not run twice: `rerun_under_s`). On the CPU the tiny
# model is extended from 8,192 to 12,288 positions under the same small memory budget. (The `t4` and `l4`
# profiles stop below the position limit, so their RoPE
# rung extends nothing.) The target, 2^19 tokens in one AdamW step of the 1B shape on one H200, is the
# length ALST trains an 8B model at on one H100.

# %%
long_rungs = ladder.past_the_limit(rungs[-1], P["tile_mlp_tokens"], P["rope_positions"])
past_limit = lambda rung, n: step(rung, n, BUDGET, profile=n > limit)  # noqa: E731 (profiled past the limit)
long_rows, long_probes = ladder.climb(model, long_rungs, past_limit, min(P["ladder_start"], limit), limit,
                                      rerun_under_s=60)
ladder.apply(model, rungs[-1])  # the model's own RoPE and MLPs again
display(ladder_bench.summary_table(ladder_rows + long_rows, BASELINE))

# %%
(tiled_row, extended_row), offloaded = long_rows, ladder_rows[-1]
assert (tiled_row["longest"], -tiled_row["peak_bytes"]) > (offloaded["longest"], -offloaded["peak_bytes"]), \
    "a tiled MLP should train a longer sequence, or the same one at a lower peak"
own = config.max_position_embeddings  # the model's own limit (the RoPE rung extends past it where asked)
assert extended_row["longest"] > own or P["rope_positions"] <= own, "RoPE extended: past the position limit"
if hw.cuda:
    targets.check("full recipe + RoPE extension trains >= 524,288 tokens (2^19) at batch 1 (set for an H200)",
                  f"{extended_row['longest'] or 0:,} tokens, MFU {100 * (extended_row['mfu'] or 0):.1f}%",
                  (extended_row["longest"] or 0) >= 2**19)

# %% [markdown]
# **Where the step's time goes** at the longest length the RoPE rung reached. The ladder's steps past its
# search limit (`limit`: the model's position limit on the GPU, 2^17; the CPU's search stops at 4,096)
# ran under torch.profiler (`ladder_bench.train_step(profile=True)`), the row's own step included, so the
# split shown is that step's, not one more step of minutes; only where the rung stopped within the limit
# is one more step profiled (`ladder_bench.step_time_split`). The RoPE rung's step time, tokens/s and MFU
# above therefore include the profiler's own cost: small beside a step of minutes (a few ms per thousand
# operators, and CUPTI's set-up once). The step's time is split into attention
# (SDPA's kernels), the tiled MLP and the chunked loss (the `record_function` ranges around their forward
# and backward), offload copies (host <-> device copies while no kernel runs; all their time, overlapped
# or not, is in the row's name) and everything else (norms, RoPE, the optimizer, gaps): device time on a
# GPU, host time on the CPU, which has no copies.

# %%
ladder.apply(model, long_rungs[-1])  # the RoPE rung again, for a rung that stopped within the limit
long_split = extended_row["split"] or ladder_bench.step_time_split(model, optimizer, extended_row["longest"],
                                                                   hw, fused_head=True)
ladder.apply(model, rungs[-1])
display(long_split if isinstance(long_split, str) else long_split.table())  # str: out of memory

# %% [markdown]
# **Predicted before running**, as for the rungs above, now with the host memory the offloaded inputs
# take (`Estimate.host`; pinned blocks, rounded to powers of two) beside what CUDA's pinned allocator
# handed out. Then what `recipes estimate` predicts the full recipe reaches on this device: the longest
# length that fits its memory (GPU, and host RAM for the offloaded activations), and the step time there,
# scaled from the longest step measured by its model FLOPs. Where that step would take over
# `STEP_LIMIT_S`, time is what stops a longer run first. (On a CPU, "GPU memory" is the budget.)

# %%
long_plans = estimate_check.ladder_plans(long_probes, long_rungs, P["model"], hw)
display(long_predicted := estimate_check.side_by_side(long_probes, long_plans, config, host=True))
miss = long_predicted["error %"].abs().max()  # on a GPU a target: never yet compared there past the limit
assert targets.check("estimate within 10% past the limit", f"{miss:.1f}%", miss <= 10) or hw.cuda
predicted_reach = estimate_check.reach(long_plans[-1], hw, extended_row["longest"], extended_row["seconds"],
                                       STEP_LIMIT_S, BUDGET, min(P["ladder_start"], limit), config)  # RoPE's
report("recipes estimate: full recipe", **predicted_reach)
assert (predicted_reach["longest by memory"] or 0) >= 0.9 * extended_row["longest"], "it fits what was run"

# %% [markdown]
# **Reading it.** On the CPU run the tiled MLP lowers the peak at the same length (4,096 tokens, the
# search's limit there), and with RoPE extended the full recipe trains 12,288 tokens, past the tiny
# model's 8,192 positions, within its 128 MiB budget; the estimate then says memory (the budget) stops it
# at about 13,800. The GPU figures (how far past 131,072 the 1B shape goes, its host memory, MFU, and
# what stops it: GPU memory, host RAM or time) come from the GPU run of these cells, which is pending;
# until then the outputs above the new cells are those of the previous H200 run.
#
# **A peer in the same run.** ArcticTraining, ALST's implementation, is on the package index but is not
# installed here (nor in the offline wheels the GPU run uses); a GPU run that can install it adds its
# single-GPU recipe on the same model beside these rows: its longest length and tokens/s.

# %% [markdown]
# ## 5 · Sequence-length curriculum
#
# A fixed token budget, the same tokens per step, two schedules: every step at the target length, or
# lengths doubling from 1/8 of it in equal stages over the first half of the steps (more, shorter rows
# per step), then the target. Short rows make attention cheaper per token (`O(L)`), so early steps run
# faster, but only where attention is a large share of the step: on a GPU the runs use a wider and deeper
# version of the embedded model's architecture (`model` in the parameters), whose step is not dominated
# by per-step overheads. Both runs train from scratch on the task corpus and are judged by the loss on
# held-out rows of the **target** length.

# %%
C = P["curriculum"]
tokenizer = models.load_tokenizer(QUALITY_MODEL)
stream_examples = tasks.make_examples(C["tokens_per_step"] * C["steps"] // 40, seed=11)
stream = batches.token_stream(tokenizer, stream_examples).to(hw.device)
held_rows = batches.token_stream(tokenizer, tasks.make_examples(C["target"], seed=12))[: 8 * C["target"]]
held_rows = held_rows.view(8, C["target"]).to(hw.device)  # ~40 tokens per example: 8 full rows
print(f"stream: {stream.numel():,} tokens for a budget of {C['steps'] * C['tokens_per_step']:,}; "
      f"held-out: {tuple(held_rows.shape)}")


def fresh():
    """The embedded model's architecture, randomly initialised (seed 0), with AdamW and a cosine schedule."""
    net = models.fresh_model(QUALITY_MODEL, max_position_embeddings=max(C["target"], 2048), **C["model"])
    opt = torch.optim.AdamW(net.parameters(), lr=C["lr"], weight_decay=0.01)
    return net, opt, train.cosine_schedule(opt, C["steps"], warmup=C["steps"] // 20)


def warm_up(schedule):  # three steps on a throwaway copy: kernels and allocator ready before timing
    net, opt, _ = fresh()
    curriculum.run(net, opt, schedule[:3], stream, C["tokens_per_step"], lambda: 0.0, 10**9, desc="warm-up")


def curriculum_run(start):
    schedule = curriculum.length_schedule(C["target"], C["steps"], start=start)
    warm_up(schedule)
    net, opt, sched = fresh()
    return curriculum.run(net, opt, schedule, stream, C["tokens_per_step"], lambda: curriculum.eval_loss(
        net, held_rows, hw.amp_dtype), C["eval_every"], sched, hw.amp_dtype, desc=f"start {schedule[0]}")


fixed, curric = curriculum_run(None), curriculum_run(C["start"])
runs = {"fixed length": fixed, "curriculum": curric}
print(f"{models.count_parameters(fresh()[0])[1] / 1e6:.1f}M parameters")


def summary(h):
    per_length = {f"ms/step @{n}": 1e3 * t for n, t in h.step_seconds_by_length().items()}
    return {"train s": h.seconds[-1], "final eval loss": h.eval_loss[-1], **per_length}


display(pd.DataFrame({name: summary(h) for name, h in runs.items()}).round(3))

# %%
final = dict(ylabel=f"held-out loss at {C['target']} tokens (nats)", line=fixed.eval_loss[-1],
             line_label="fixed run's final loss")
plots.side_by_side([
    (plots.curves_with_line, dict(series={n: (h.eval_tokens, h.eval_loss) for n, h in runs.items()},
                                  xlabel="tokens trained", title="loss against tokens", **final)),
    (plots.curves_with_line, dict(series={n: (h.eval_seconds, h.eval_loss) for n, h in runs.items()},
                                  xlabel="training time (s)", title="loss against wall time", **final))])
plt.show()

# %%
reach = curric.time_to_reach(fixed.eval_loss[-1])
time_saved = None if reach is None else 1 - reach / fixed.seconds[-1]
report("curriculum", **{"reaches fixed run's final loss at s": reach if reach is not None else "never",
                        "fixed run s": fixed.seconds[-1],
                        "time saved %": "-" if reach is None else 100 * time_saved,
                        "whole run faster %": 100 * (1 - curric.seconds[-1] / fixed.seconds[-1])})
assert all(h.eval_loss[-1] < h.eval_loss[0] for h in runs.values()), "both runs should learn"
assert curric.tokens[-1] == fixed.tokens[-1], "the same token budget"
if hw.cuda:
    targets.check("the curriculum reaches the fixed-length run's final loss in less wall time",
                  f"{reach if reach is None else round(reach, 1)} s vs {fixed.seconds[-1]:.1f} s",
                  reach is not None and reach < fixed.seconds[-1])


# %% [markdown]
# **Reading the curriculum.** Two figures, of different strength. The whole run at the same token
# budget is faster because its early steps are shorter (the `ms/step` above): that saving is
# mechanical and repeats. The time to reach the fixed run's final loss is more fragile: both runs flatten
# out near this corpus' floor (its answers are random facts), and on that plateau the two curves differ
# by about as much as they move between evaluations, so where they cross can shift a lot from run to run.
# The curriculum can only pay where attention is a large share of the step, which is why the GPU run
# uses a wider and deeper model than the tiny one: compare the `ms/step` at each length on your model
# before adopting it.


# %% [markdown]
# ## 6 · Sliding windows and what they cost in accuracy
#
# A window of `w` tokens makes attention `O(L × w)`, but a token can then only look `w` tokens back
# (per layer). The embedded model learned a retrieval task: 24 `key = value` facts (about 8 tokens
# each), then a question about one of them; the **distance** is the number of facts between the
# asked fact and the question. Swap its attention for a FlexAttention sliding window and score
# exact-match accuracy against distance.
#
# Two ways to get a window: `sliding.use_sliding_window(model, w)` registers a FlexAttention window
# for any transformers model; Mistral is Llama plus the architecture's own `sliding_window`, so
# `sliding.as_mistral` loads the same weights with transformers' own windowed mask. First, they agree.

# %%
full_model = models.load_model(QUALITY_MODEL).eval()
probe = batches.encode(tokenizer, [tasks.kv_example(random.Random(0), 24, 20)])[0]
probe_ids = torch.tensor([probe.input_ids], device=hw.device)
with torch.no_grad():
    flex_logits = sliding.use_sliding_window(models.load_model(QUALITY_MODEL).eval(), 32, compiled=False)(
        probe_ids).logits
    mistral = sliding.as_mistral(QUALITY_MODEL, 32, dtype=hw.model_dtype).to(hw.device).eval()
    mistral_logits = mistral(probe_ids).logits
    full_logits = full_model(probe_ids).logits
window_agreement = rel_error(flex_logits, mistral_logits)
report("window 32: FlexAttention vs Mistral's own", **{"rel. error": window_agreement,
       "vs full attention": rel_error(flex_logits, full_logits)})
assert window_agreement < tolerance, "our FlexAttention window should match transformers' own sliding_window"
assert rel_error(flex_logits, full_logits) > 0.01, "a window shorter than the prompt should change the logits"

# %%
kv_sets = retrieval.kv_sets(24, DISTANCES, P["tradeoff_examples"], seed=5)


def windowed(window, sinks):  # rows of varying length: eager Flex (compiling each length would take longer)
    net = models.load_model(QUALITY_MODEL).eval()
    return net if window is None else sliding.use_sliding_window(net, window, compiled=False, sinks=sinks)


spans = retrieval.mean_spans(tokenizer, kv_sets)
print("mean tokens from the asked fact to the question:", dict(zip(DISTANCES, [round(s) for s in spans])))
settings = {"full attention": (None, 0), **{f"window {w}": (w, 0) for w in WINDOWS},
            **{f"window {w} + {SINKS} sinks": (w, SINKS) for w in WINDOWS}}
accuracy = {name: retrieval.accuracy_by_distance(windowed(*setting), tokenizer, kv_sets)
            for name, setting in settings.items()}
display(pd.DataFrame(accuracy, index=[f"d={d}" for d in DISTANCES]).T.round(2))

# %%
def shown(sinks):
    return {n: (spans, a) for n, a in accuracy.items() if n == "full attention" or ("sinks" in n) == sinks}


axes = dict(xlabel="tokens from the asked fact to the question", ylabel="exact match")
plots.side_by_side([
    (plots.curves, dict(series=shown(False), title="window alone: the model loses its sink", **axes)),
    (plots.curves, dict(series=shown(True), **axes,
                        title=f"window + {SINKS} attention sinks: exact up to the window, then nothing"))])
plt.show()


# %% [markdown]
# **Reading the trade-off.** A bare window loses accuracy even for facts inside it. Keeping the first
# few tokens visible (StreamingLLM's *attention sinks*, `sinks=` here, four extra keys per query)
# restores it, which says the model relies on seeing the start of the sequence (StreamingLLM found that
# trained models park much of their attention there; we did not measure where ours puts it). With the
# sinks the window answers the facts that lie well inside it (the answer's own tokens need room too)
# and none beyond,
# although four layers could in principle relay information four windows back. A window is a modelling
# choice: train with the window you will serve with, and size it to the dependencies your data has.

# %%
def window_claims(window):  # the answer's own tokens and the separator: 8 tokens of margin either side
    with_sinks, bare = accuracy[f"window {window} + {SINKS} sinks"], accuracy[f"window {window}"]
    inside = all(a >= 0.8 for a, span in zip(with_sinks, spans) if span + 8 <= window)
    beyond = all(a <= 0.2 for a, span in zip(with_sinks, spans) if span > window + 8)
    return {"answers inside": inside, "not beyond": beyond, "sinks help": sum(with_sinks) > sum(bare)}


display(claims := pd.DataFrame({f"window {w}": window_claims(w) for w in WINDOWS}))
assert min(accuracy["full attention"]) > 0.8, "the embedded model should retrieve at every distance"
assert claims.loc["answers inside"].all(), "a window + sinks should answer the facts inside the window"
assert claims.loc["not beyond"].all(), "a window should not answer the facts beyond it"
assert claims.loc["sinks help"].all(), "attention sinks should help every window"


# %% [markdown]
# ## 7 · Long enough to matter: fine-tuned at 4x the trained length
#
# Training at a length only pays if the model then uses what lies that far back. The embedded model was
# pre-trained on rows of 256 tokens (its config allows 2,048 positions, but it never saw more than 256).
# The retrieval task above, filled with facts to about 4x that length (~115 facts, ~900 tokens), asks it
# to look back up to ~900 tokens. Three versions of the model answer it:
#
# - **as trained**: RoPE as it was, positions it never saw, attention spread over 4x the tokens;
# - **yarn x4, not fine-tuned**: RoPE extended from 256 to 1,024 positions with YaRN
#   (`rope.extend_context(model, 1024, "yarn", trained=256)`), nothing else changed;
# - **yarn x4, fine-tuned**: the same, then a brief fine-tune on kv prompts of 24 to ~115 facts in rows
#   of 1,024 tokens (`retrieval.finetune`: AdamW, warm-up and cosine decay, every token scored as in
#   pre-training).
#
# Each is scored by exact match at each distance, as in section 6 (`retrieval.before_and_after`). The
# CPU run fine-tunes for seconds (24 rows) and scores 8 prompts per distance; the GPU run fine-tunes on
# 2,400 rows and scores 50.

# %%
K, LONG = P["long_kv"], 4 * TRAINED_LENGTH
long_sets = retrieval.kv_sets(retrieval.facts_for(tokenizer, LONG), LONG_DISTANCES, K["per_distance"])
long_spans = retrieval.mean_spans(tokenizer, long_sets)
long_accuracy, tuning = retrieval.before_and_after(QUALITY_MODEL, tokenizer, TRAINED_LENGTH, LONG, long_sets,
                                                   K["steps"], K["lr"], K["batch"], hw.amp_dtype)
report(f"fine-tune at {LONG} tokens", **{"first loss": tuning.losses[0], "last loss": tuning.losses[-1]})
display(pd.DataFrame(long_accuracy, index=[f"d={d}" for d in long_sets]).T.round(2))

# %%
plots.curves({name: (long_spans, a) for name, a in long_accuracy.items()}, **axes,
             title=f"retrieval at 4x the trained length ({TRAINED_LENGTH} -> {LONG} positions)")
plt.show()
far = retrieval.beyond(long_spans, long_accuracy, TRAINED_LENGTH)  # answers further back than it ever saw
report(f"beyond {TRAINED_LENGTH} tokens", **far)
as_trained, not_tuned, tuned = far.values()
assert tuned >= as_trained + 0.25 and tuned > not_tuned, "the fine-tune should retrieve what lies beyond"

# %% [markdown]
# **Reading it** (the CPU run; the GPU run's figures are pending). At four times its trained length the
# model as trained answered nothing, not even the fact just before the question: RoPE is relative, so
# near facts sit at distances it has seen; what it never saw is a row this long, with attention spread
# over four times the tokens. Extending RoPE alone recovered a little (0.12 beyond 256 tokens), and 24
# rows of fine-tuning at the new length about half of the answers at every distance (0.48). With 8
# prompts per distance read these as a direction, not a level; the GPU run trains and scores more.


# %% [markdown]
# ## Bad input gives one clear message
# A length over the model's position limit (with how to extend RoPE), a window that covers the whole
# sequence (a warning, then plain causal attention), a window that is not a positive number, and a
# chunk size that does not divide the tokens (allowed: the last chunk is shorter, the loss the same).

# %%
for attempt in (lambda: models.check_seq_len(config, config.max_position_embeddings + 1),
                lambda: masks.check_window(0),
                lambda: curriculum.length_schedule(4096, 100, start=3000)):
    try:
        attempt()
    except errors.RecipeError as error:
        print("RecipeError:", error)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    wide = kernels.flex(q, k, v, window=CHECK_LEN * 2)
print("warning:", *(str(w.message) for w in caught))
assert torch.equal(wide, kernels.flex(q, k, v, None))
odd = losses.linear_cross_entropy(hidden, weight, labels, chunk_size=333)  # 1000 tokens = 3 x 333 + 1
report("chunk 333 of 1000 tokens", **{"rel. error vs standard": rel_error(odd, reference_loss)})
assert rel_error(odd, reference_loss) < 1e-5

# %% [markdown]
# ## Save the figures

# %%
board = [results.scoreboard_row("04", "chunked cross-entropy (loss step)", "full logits", ce_chunked,
                                ce_standard, None, None)]
loss_steps = [{"loss": r["loss"], "peak_bytes": r["peak_bytes"], "unavailable": r.get("unavailable"),
               "seconds": r["timing"] and r["timing"].samples} for r in ce_rows]
figures = {"attention": attn_rows, "sliding_speedup_vs_flex_causal": sliding_speedup,
           "chunked_ce_cut": ce_cut, "loss_steps": loss_steps, "chunked_ce_errors": ce_errors,
           "ladder_baseline": rungs[BASELINE].name, "checkpointing_grad_errors": ckpt_errors,
           "checkpointing": ckpt_rows, "ladder": ladder_rows, "ladder_probes": probes,
           "curriculum": {"fixed": vars(fixed), "curriculum": vars(curric), "reach_s": reach,
                          "time_saved": time_saved},
           "sliding_window_accuracy": {"distances": DISTANCES, "token_spans": spans, **accuracy},
           "tiled_mlp_errors": mlp_errors, "long_ladder": long_rows, "long_ladder_probes": long_probes,
           "estimate_reach": predicted_reach, "long_retrieval": {"token_spans": long_spans, **long_accuracy},
           "long_step_split": getattr(long_split, "__dict__", long_split), "targets": targets.rows}
publish = hw.cuda and P["profile"] == "gpu" and P["model"] == PROFILES["gpu"]["model"]  # reference runs only
environment = results.environment(hw, **P)
for path in results.save("04_training_long_sequences", hw, environment, figures, board, publish):
    print("wrote", path.relative_to(models.REPO_ROOT) if path.is_relative_to(models.REPO_ROOT) else path)


# %% [markdown]
# ## The targets
# Measured above and saved with the figures; on the GPU they were set for, a miss fails here.

# %%
targets.assert_all()

# %% [markdown]
# ## Use it in your own code
#
# ```python
# from recipes_lib.attention import sliding
# from recipes_lib.core import checkpointing, losses, models, train
# from recipes_lib.long_context import recipe
#
# model = models.load_model("meta-llama/Llama-3.2-1B", attn_implementation="sdpa")  # flash/cuDNN kernels
# checkpointing.enable_checkpointing(model, every=1)  # every=2: half the recompute, half the saving
# # sliding.use_sliding_window(model, 4096)           # FlexAttention window, O(L x w)
# loss = train.loss_sum(model, batch, fused_head=True)  # chunked cross-entropy: no [tokens, vocab] logits
# (loss / losses.count_targets(batch["labels"])).backward()
#
# # Past the position limit: fused attention, RoPE extended, tiled MLP, every layer checkpointed with its
# # input offloaded to host memory, in one call (the loss stays the step's: fused_head=True above)
# print(recipe.describe(recipe.enable(model, 524288)))
# ```
