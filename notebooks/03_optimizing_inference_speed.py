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
# # 03 · Optimizing inference speed
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-acceleration-recipes/recipes/blob/main/notebooks/03_optimizing_inference_speed.ipynb)
#
# After this notebook you will be able to make a trained model answer faster, and to say **what
# each speed-up costs in quality**. Four recipes, each measured next to perplexity on held-out text
# and exact-match accuracy on the embedded tasks:
#
# - **INT8 quantization** (LLM.int8(), int8 weight-only) makes decoding (memory-bound) faster by
#   halving the weight bytes read per token; it costs rounding error, and extra kernels unless fused.
# - **Knowledge distillation** makes everything faster with a smaller student trained on the
#   teacher's distribution; it costs training and some accuracy.
# - **Flash attention** (SDPA backends, flash-attn) makes long prompts faster by never writing the
#   `seq x seq` score matrix; it costs nothing (exact up to rounding).
# - **LayerNorm -> RMSNorm** makes the norm kernels faster with one reduction instead of two and no
#   centring; it costs a short healing fine-tune.
#
# Every generation speed comes from one harness (`recipes_lib.measure.decode`): a static KV cache, a
# warm-up, a decode step compiled into a CUDA graph on a GPU, CUDA-event timing, the median of five
# timed repeats with their min-max, and prompt and generation lengths printed beside each figure. A
# ratio of two speeds comes with its range (slowest over fastest, fastest over slowest:
# `bench.describe_ratio`); where that range takes in 1.0 it reads "no measurable difference". On a
# GPU, speed runs use a Llama-3.2-1B-shaped model, and a size sweep the 1B, 3B and 8B Llama shapes
# (random weights: speed does not depend on the values); quality comes from the embedded tiny models,
# which have learned their tasks. On a CPU the same code runs small, so CI checks every claim.

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
PROFILE = "auto"  # "cpu": CI-sized on the embedded models; "gpu": Llama-3.2-1B shape; "t4" / "l4": the
# same shape sized for a 16 GB T4 (fp16 GPU; weights in fp32) / a 24 GB L4; "auto": by the GPU found
MODEL = None      # override the profile's speed model: a hub id, a local path, or random:<shape>
PROFILES = {
    "cpu": dict(model="data/tiny-llama", prompt_len=32, new_tokens=16, batches=[1, 4], repeats=5,
                slow_new_tokens=8, eval_examples=40, distill_steps=30, distill_batch=16, distill_lr=1e-3,
                distill_examples=480, student_layers=2,
                attention_seq_lens=[64, 128, 256], attention_heads=4, attention_head_dim=32,
                e2e_prompt_len=128, norm_rows=1024, heal_steps=30, heal_batch=16,
                e2e_norm_shape=None, e2e_norm_batch=4, e2e_norm_seq=128,
                sweep=dict(shapes=("data/tiny-llama", "llama-mini"), formats=("bf16", "int8", "int4"),
                           batches=(1, 4), depth_fractions=(1.0, 0.5), prompt_len=16, new_tokens=32,
                           repeats=5, tune=False),
                sweep_fit_bound=float("inf")),  # shown, not checked: toy decode steps on a 2-core runner
    # are Python overhead, and their medians timed apart swing 2-10x (a CI fit was off by 745%)
    "gpu": dict(model="random:llama-3.2-1b", prompt_len=512, new_tokens=64, batches=[1, 16], repeats=5,
                slow_new_tokens=16, eval_examples=200, distill_steps=3000, distill_batch=256, distill_lr=2e-3,
                distill_examples=256_000, student_layers=2,
                attention_seq_lens=[1024, 2048, 4096, 8192], attention_heads=32,
                attention_head_dim=64, e2e_prompt_len=4096, norm_rows=65536, heal_steps=300, heal_batch=64,
                e2e_norm_shape=dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257),
                e2e_norm_batch=8, e2e_norm_seq=1024,
                sweep=dict(shapes=("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"),
                           formats=("bf16", "int8", "int4"), batches=(1, 16), depth_fractions=(1.0,),
                           prompt_len=512, new_tokens=64, repeats=3, tune=True, budget_s=600),
                sweep_fit_bound=0.25),
}
# Smaller GPUs: shorter distillation and healing, GPT-2 small for the end-to-end norm step, shorter prompts.
PROFILES["l4"] = dict(PROFILES["gpu"], distill_steps=1500, heal_steps=200, eval_examples=100,
                      sweep=dict(PROFILES["gpu"]["sweep"], shapes=("llama-3.2-1b", "llama-3.2-3b"),
                                 batches=(1,), tune=False))  # 8B: 16 GB of bf16 weights, cache: not in 22 GiB
PROFILES["t4"] = dict(PROFILES["l4"], distill_steps=800, distill_batch=128, distill_examples=102_400,
                      heal_steps=150, heal_batch=32, attention_seq_lens=[1024, 2048, 4096],
                      e2e_prompt_len=2048, norm_rows=32768, e2e_norm_batch=4,
                      e2e_norm_shape=dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024,
                                          vocab_size=50257),  # fp32 weights on a T4: 3B (13 GB) does not fit
                      sweep=dict(PROFILES["l4"]["sweep"], shapes=("llama-360m", "llama-3.2-1b")))
QUALITY_MODEL = "data/tiny-llama"    # the embedded teacher: it knows its tasks, so quality means something
LAYERNORM_MODEL = "data/tiny-gpt2"   # the embedded GPT-2-shaped (LayerNorm) model for the RMSNorm swap
NORM_HIDDEN = 2048                   # the Llama-3.2-1B hidden size, for the norm kernel benchmark
HEAL_LR = 3e-5                       # small: the swap moves the model only slightly; a large step undoes more
FLOOR_TOLERANCE_PCT = 10             # % over a floor allowed: a read-only stream may beat the copy bandwidth

# %%
from recipes_lib import notebook

hw, P, targets = notebook.setup(PROFILES, MODEL, profile=PROFILE, benchmark_gpu="H100")
reported = notebook.Targets(targets.gpu, hw, full_size=False)  # former 1B targets: shown, never asserted

# %%
import dataclasses
import functools
import itertools
import logging
import warnings

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Markdown, display
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

from recipes_lib import plots, results
from recipes_lib.attention import kernels
from recipes_lib.core import batches, errors, models, tasks, train
from recipes_lib.inference import distill, norms, prune, quantize
from recipes_lib.measure import attention_bench, bench, decode, memory, norm_bench, quality, timing, workload
from recipes_lib.measure import decode_fits as decode_fits  # their own lines: the one above is full
from recipes_lib.measure import decode_sweep as decode_sweep
from recipes_lib.measure.report import report

torch._logging.set_logs(inductor=logging.ERROR)  # autotuning chatter would fill the outputs
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a per-call "inputs will be cast to fp16" notice
BF16 = {torch.bfloat16: "bf16"}.get(hw.model_dtype, "fp32")  # the unquantized baseline's dtype here

notebook.state_runtime(P, *workload.notebook03(P, AutoConfig.from_pretrained(models.resolve(P["model"]))))

# %% [markdown]
# ### Held-out quality data
# Perplexity on held-out task text (every token scored) and exact-match accuracy (ROUGE-1 for
# `summary`) on held-out task prompts: examples drawn with seeds the models never trained on.

# %%
tokenizer = models.load_tokenizer(QUALITY_MODEL)
held_out = tasks.make_examples(P["eval_examples"], seed=12345)
ppl_docs = batches.encode(tokenizer, tasks.make_examples(P["eval_examples"], seed=4242), train_on_prompt=True)


def scores(model):
    return quality.summary(model, tokenizer, held_out, ppl_docs)


print(f"{len(held_out)} task prompts, {len(ppl_docs)} perplexity documents")

# %% [markdown]
# ## 1 · INT8 post-training quantization
#
# Decoding one token multiplies a `[batch, d]` activation by every weight matrix: `2·N` FLOPs
# for `2·N` bytes of bf16 weights at batch 1, far below what the GPU can compute per byte it reads
# (an H100 does ~300 FLOPs per byte of HBM bandwidth). Decode is **memory-bound**, so its time is
# `weight bytes / bandwidth`, and int8 weights (1 byte + a scale per row) could nearly halve it.
#
# Two ways to get int8 weights:
# - **LLM.int8()** (bitsandbytes): saves memory; at run time it splits outlier activation columns
#   into an fp16 matmul and quantizes the rest to int8 on the fly. Those extra kernels make it
#   *slower* than bf16: it is a memory recipe, not a speed recipe.
# - **int8 weight-only** (torchao `Int8WeightOnlyConfig`): `y = (x @ W_int8ᵀ) · scale`, activations
#   stay bf16. Speed needs the int8 -> bf16 conversion fused into the matmul, which `torch.compile`
#   does; run eagerly, it first writes a bf16 copy of each weight and is slower than bf16.
#
# First the quality cost, on the embedded model (bf16 on a GPU, fp32 on CPU):

# %%
quality_rows = {BF16: scores(models.load_model(QUALITY_MODEL))}
bnb_q = models.load_model(QUALITY_MODEL, quantization="int8", dtype=torch.float16 if hw.cuda else None)
quality_rows["LLM.int8() (bitsandbytes)"] = scores(bnb_q)
wo_q, wo_backend = quantize.int8_weight_only(models.load_model(QUALITY_MODEL))
quality_rows[f"int8 weight-only ({wo_backend})"] = scores(wo_q)
WO_BACKENDS = [wo_backend] + (["pytorch"] if wo_backend == "torchao" else [])  # torchao and our plain module
for backend in WO_BACKENDS[1:]:
    quality_rows[f"int8 weight-only ({backend})"] = scores(
        quantize.int8_weight_only(models.load_model(QUALITY_MODEL), backend=backend)[0])
for name, q in quality_rows.items():
    report(name, **{"perplexity": q["perplexity"], "accuracy": q["accuracy"]})

# %% [markdown]
# Weight bytes: the quantized linear layers' weights (int8 data + scales) against the same weights
# in bf16 (2 bytes each). The embedding table stays in bf16; bitsandbytes also keeps the LM head in
# bf16, while torchao quantizes it (which unties it from the embedding table), so a whole model
# shrinks less than its linear layers.

# %%
linear_ratio = {}
for name, model in [("LLM.int8() (bitsandbytes)", bnb_q), (f"int8 weight-only ({wo_backend})", wo_q)]:
    n_bytes, n_values = quantize.linear_weight_bytes(model, quantized_only=True)
    linear_ratio[name] = n_bytes / (2 * n_values)
    report(name, **{"linear weights vs bf16": linear_ratio[name],
                    "quantized as": quantize.quantization_of(model)})
ppl_delta = {k: q["perplexity"] / quality_rows[BF16]["perplexity"] - 1 for k, q in quality_rows.items()}
del bnb_q, wo_q, model

# %%
for name, ratio in linear_ratio.items():
    assert 0.49 < ratio < 0.56, f"{name}: int8 linear weights should take about half the bytes of bf16"
for name, delta in ppl_delta.items():
    assert abs(delta) < 0.05, f"{name}: int8 should change perplexity by well under 5%"

# %% [markdown]
# ### Speed: one harness for every model
# bf16 and torchao int8 decode with a compiled CUDA-graph step (on a GPU). At batch 1 the step is
# compiled with Inductor's coordinate-descent tuning for both (`tune=True`): decode at batch 1 is a
# chain of matrix-vector products whose speed depends on the kernels' launch parameters. Batch 16
# compiles untuned for both: tuning its mixed int8 x bf16 matmuls costs minutes of compile time.
# bitsandbytes cannot be traced by `torch.compile`, so LLM.int8() decodes eagerly, beside an eager
# bf16 row for a fair comparison (fewer new tokens: eager steps are slow). Prefill is one eager
# forward for all.

# %%
def speed_model(quantization=None):
    """The speed model, loaded with ``quantization``, or int8 weight-only by ``"int8-wo:<backend>"``."""
    if quantization and quantization.startswith("int8-wo"):
        return quantize.int8_weight_only(models.load_model(P["model"]), backend=quantization.split(":")[1])[0]
    return models.load_model(P["model"], quantization=quantization)


def run_speed(name, quantization=None, batch_sizes=None, new_tokens=None, repeats=None, compile=None):
    rows = decode.sweep(speed_model(quantization), hw, batch_sizes or P["batches"], P["prompt_len"],
                        new_tokens or P["new_tokens"], repeats or P["repeats"], compile=compile, name=name)
    memory.free_memory()
    return rows


speed = {"bf16": run_speed(BF16)}
for i, backend in enumerate(WO_BACKENDS):  # the second path at batch 1 only: each compile costs a minute
    speed[f"int8 weight-only ({backend})"] = run_speed(f"int8 weight-only ({backend})", f"int8-wo:{backend}",
                                                       batch_sizes=None if i == 0 else P["batches"][:1])

# %%
speed["bf16 eager"] = run_speed(f"{BF16} eager", compile=False, new_tokens=P["slow_new_tokens"])
speed["LLM.int8() eager"] = run_speed("LLM.int8() eager", "int8", compile=False,
                                      new_tokens=P["slow_new_tokens"])
print("protocol:", decode.describe(speed["bf16"][0]), "|", decode.describe(speed["bf16"][1]))

# %%
display(pd.DataFrame(decode.table(sum(speed.values(), []))).set_index("method"))
b1 = {k: rows[0] for k, rows in speed.items()}
# each ratio of decode tokens/s at batch 1: median over median, and its min-max over the timed repeats
wo_ratios = {b: decode.speed_ratio(b1[f"int8 weight-only ({b})"], b1["bf16"]) for b in WO_BACKENDS}
best_wo = max(wo_ratios, key=lambda b: wo_ratios[b][0])  # the int8 weight-only path this GPU runs fastest
decode_speedup = wo_ratios[best_wo][0]
ratios = {"int8 weight-only": wo_ratios[best_wo],  # the headline ratios with their min-max, saved at the end
          "LLM.int8()": decode.speed_ratio(b1["LLM.int8() eager"], b1["bf16 eager"])}
WO_KEY = f"int8 weight-only ({best_wo})"
slow = sum((decode.slower(rows, speed["bf16 eager" if "eager" in key else "bf16"])
            for key, rows in speed.items()), [])
print("\n".join(slow) or "every row at least 0.95x its bf16 baseline")

# %% [markdown]
# Where int8 is slower, the reasons are the ones above: **LLM.int8()** quantizes every activation
# and splits out outlier columns at run time (several kernels per matmul, fp16 and int8 parts);
# **int8 weight-only prefill** runs eagerly, so each matmul first converts its int8 weight into a
# temporary bf16 copy (more bytes moved than bf16 itself) and prefill is compute-bound anyway;
# **int8 weight-only decode** is only as fast as the kernel that reads the int8 weights: both
# paths compute `(x @ W_int8ᵀ) · scale`, but through different code (torchao's `Int8Tensor` subclass
# dispatches its own matmul; our `Int8WeightOnlyLinear` is a plain module Inductor sees whole), and
# they compile to different kernels. At batch 16 the product is a real matrix multiply, where an
# int8 weight must be converted before the tensor cores use it. The table above is what this GPU
# measured; the best of the two paths is what the target below is checked on.
#
# Why int8 falls short of 2x at batch 1 on a model this size: a decoder layer's seven products
# read 2 to 32 MB each (bf16), and on an H100 each takes a few microseconds, a floor (a kernel's
# launch, ramp-up and tail) that halving the bytes does not halve. Scouting runs timed them one by one
# inside CUDA graphs: int8 takes 0.74 to 0.78x bf16's time on the 8-32 MB ones (q, o and the MLP's
# three), while the 2 MB k and v products and the 0.5 GB LM head about halve. A hand-written Triton int8 GEMV
# was no better inside the whole model, and replaying one hand-captured CUDA graph per token did not
# speed up either model (`results/history/03_decode_harness_scouting.H100.log`). In larger models,
# whose matrices are 10-50x bigger, those fixed costs are a smaller share: the size sweep below
# measures how much. That is why the 1B targets of this section and the next (int8 >= 1.5x bf16, a
# student >= 2x its teacher) are now reported rows, and the target is set at the 8B shape.

# %%
assert speed[WO_KEY][0]["weight_bytes"] < 0.8 * speed["bf16"][0]["weight_bytes"], \
    "int8 weight-only should hold far fewer weight bytes"
for backend, ratio in wo_ratios.items():
    report(f"int8 weight-only ({backend}) vs bf16", **{"batch-1 decode": bench.describe_ratio(*ratio),
              "perplexity change %": 100 * ppl_delta[f"int8 weight-only ({backend})"]})
reported.check("1B shape (reported): int8 weight-only decode at batch 1 >= 1.5x bf16",
               bench.describe_ratio(*wo_ratios[best_wo]), decode_speedup >= 1.5)
targets.check("int8 weight-only perplexity within 1% relative", f"{100 * ppl_delta[WO_KEY]:+.2f}%",
              abs(ppl_delta[WO_KEY]) <= 0.01)

# %%
plots.side_by_side(plots.decode_panels(speed, P["batches"]), width=5,
                   title=f"int8 weight-only ({best_wo}) decodes at {decode_speedup:.2f}x bf16 (batch 1, "
                   "compiled); LLM.int8() saves memory, not time")
plt.show()

# %% [markdown]
# ### Where int8 pays: a curve over model size
# A decode step is a fixed part (LM head, final norm, argmax, launching the step) plus a part per
# layer, and each part is a latency plus the bytes it reads over the memory bandwidth
# (`measure.decode_cost`). int8 halves the bytes, not the latency. A layer's bytes grow with the square
# of its width while its few kernels' latency hardly grows, so the larger the model, the larger the
# share int8 can save. `measure.decode_sweep` measures it: bf16, int8 weight-only (through the path the
# table above found faster on this GPU, `best_wo`: in the H200 run of 2026-12-02 torchao's step decoded the
# 1B shape at 0.33x bf16, the plain module at 0.92x) and int4 weight-only
# (torchao's tinygemm layout: CUDA, compute capability 8.0+, bf16 weights; elsewhere its rows say why
# they were skipped), at batch 1 and a larger batch, on Llama shapes of growing size with random
# weights, through the same harness. Beside each row is its **bandwidth floor**
# (`measure.decode_floor`): the weight, scale and KV-cache bytes one step must read, over the copy
# bandwidth measured here, so no row can beat it. On a GPU the shapes are Llama-3.2-1B, -3B and
# Llama-3.1-8B (a format or shape that does not fit the GPU's memory is a skipped row); on CPU they are
# the embedded model's shape and a 2-layer one, each also cut to half depth (which separates the
# fixed from the per-layer cost), decoded eagerly with fp32 weights as the unquantized reference.
# The speed model's bf16 and `best_wo` rows timed above are that shape's rows here where they were timed
# the same way (`decode_sweep.reusable`: batches, prompt, new tokens, CUDA graph, tuning), not timed again;
# and on a GPU the sweep has a time budget (`budget_s`, 10 minutes: a GPU session lasts 30): it measures
# every shape's bf16, then int8, then int4, and what it has not begun when the budget is spent is a row
# skipped for time, so a miss there says so rather than running out the session.

# %%
section_1 = {(P["model"].removeprefix("random:"), f): rows for f, rows in  # timed above: not again
             {"bf16": ("none", speed["bf16"]), "int8": (best_wo, speed[WO_KEY])}.items()}
size_sweep = decode_sweep.run(hw=hw, int8_backend=best_wo, given=section_1, **P["sweep"])  # best_wo: faster
display((sweep_table := pd.DataFrame(decode_sweep.table(size_sweep["rows"]))).set_index("shape"))

# %% [markdown]
# Then the cost model fitted to each format and batch (`decode_fits.analyse`): its fixed and
# per-layer cost at the largest shape, the per-layer cost split into latency and reads, the bandwidth
# the reads are charged at (fitted where the depths and widths allow, the latencies come out
# non-negative and the reads no faster than 1.1x the copy bandwidth; else the copy bandwidth: toy
# weights that stay in a CPU's cache can fit faster), and how far the measured steps lie from it.

# %%
sweep_analysis = decode_fits.analyse(size_sweep)
fits = pd.DataFrame(decode_fits.cost_table(sweep_analysis)).set_index("model")
display(fits.round(3), sweep_analysis["not_fitted"] or "every measured format and batch has a cost model")
where = decode_fits.crossover(sweep_analysis)
display(Markdown(decode_fits.where_int8_pays(sweep_analysis, where)))

# %%
plots.decode_size_sweep(size_sweep["rows"], title=where and f"int8 weight-only {where['words']} (fitted)")
plt.show()

# %% [markdown]
# The student that cost model chooses for the largest shape (`decode_cost.choose_student`, from the
# bf16 batch-1 fit): the most parameters, keeping the head size and the query/key-value head ratio,
# predicted to decode at least twice as fast as its teacher. The checks below hold each row to its floor
# on a GPU only: on a CPU the toy weights stay in cache and the copy bandwidth swings with the machine's
# load, so a row can "beat" its floor there (a loaded CI runner saw 245%); its floors are shown, not
# checked. For the same reason the CPU run shows its chosen student but distils the depth-only one:
# a choice made from toy timings would change from run to run. Each row against its floor is a target, as
# are the cost models' fits to their steps (within 25% on a GPU; a fit with as many terms as points is
# exact, not checked) and F.rms_norm against the written-out formula below (printed only on a CPU, as every
# target there), and the student decoding faster is an assert on a CPU and its >= 2x row on a GPU: another
# process may share the GPU (issue 17's simulated T4 and L4 ran side by side on one H100); on the H100 a
# miss still fails the run, at the end, after every figure is saved.

# %%
student_choice = sweep_analysis.get("student", "no bf16 batch-1 cost model: no student chosen")
display(pd.DataFrame([student_choice]) if isinstance(student_choice, dict) else student_choice)
used = sweep_analysis if hw.cuda else {"student": "CPU: toy timings are Python overhead: shown, not used"}

# %%
worst = sweep_table.get("% of floor", pd.Series(dtype=float)).max()  # NaN misses: none measured
targets.check(f"every size-sweep row at most {100 + FLOOR_TOLERANCE_PCT}% of its bandwidth floor (timings)",
              f"worst {worst:.0f}%", worst <= 100 + FLOOR_TOLERANCE_PCT)  # a target: the GPU may be shared
checked = fits[fits["points"] > fits["terms"]]["max |residual| %"]  # as many terms as points: no residual
print("exact fits, no residual to check:", list(fits.index.difference(checked.index)) or "none")
assert len(fits), "no format and batch has a cost model"  # how well they fit the timings: a target
targets.check(f"size-sweep cost models within {P['sweep_fit_bound']:.0%} of each measured step", f"worst "
              f"{checked.max():.0f}% ({len(checked)} checked)", (checked <= 100 * P["sweep_fit_bound"]).all())
if P["profile"] == "gpu":  # issue 20's target, where int8 should pay: the 8B shape at batch 1
    int8_8b = next(r for r in size_sweep["rows"] if (r["shape"], r["layers"], r["format"], r["batch"])
                   == ("llama-3.1-8b", 32, "int8", 1))
    targets.check("int8 weight-only decode at batch 1 >= 1.5x bf16 on the 8B shape (size sweep)",
                  decode_sweep.table([int8_8b])[0].get("vs bf16", int8_8b["skipped"]),
                  (int8_8b["speedup_vs_bf16"] or 0) >= 1.5)
    targets.check("bf16 decode at batch 1 >= 70% of its bandwidth floor, 1B and 8B shapes (size sweep)",
                  *decode_sweep.floor_check(size_sweep["rows"], ("llama-3.2-1b", "llama-3.1-8b")))  # 70%

# %% [markdown]
# ## 2 · Knowledge distillation
#
# The student has the shape the size sweep chose for its largest teacher (section 1: depth *and*
# width, predicted to decode >= 2x its teacher), scaled down to the embedded teacher: the same
# fraction of its layers and of its key/value heads (`prune.scaled_shape`; the width follows the
# heads). Its weights are cut out of the teacher (`prune.prune_student`, Minitron-style structured
# pruning): the residual channels, key/value head groups and MLP neurons with the largest
# activations on a few training batches, from evenly spaced teacher layers. Where no shape was
# chosen, the student is the teacher with `student_layers` evenly spaced layers, as before. From
# that one initialisation it is trained the same number of steps on the same batches twice: with
# the distillation loss `0.5 · T²·KL(teacher || student) + 0.5 · CE` (T = 2) and with cross-entropy
# alone; both runs record their cross-entropy per step, the part of the loss they share. Quality on
# the teacher's tasks, then decode speed through the same harness. Training runs in fp32 weights
# (bf16 autocast on a GPU); the speed runs use the model dtype.
#
# How long to distil matters most for the hardest task, `kv` (find the value of a key seen earlier
# in the prompt): a lookup like this takes two attention layers working together (one to tie each
# value to its key, one to find it), the kind of circuit known to form late in training. In a
# scouting run on an H100 (`results/history/03_distill_scouting.H100.log`) the distilled 2-layer
# student scored 0 on `kv` after 700 steps of 64 examples, 0.28 after 4,000 x 64, and 0.93 after
# 3,000 x 256 at twice the learning rate, the setting used here (256,000 examples, three passes);
# trained on cross-entropy alone for as long, it stayed at 0.08.

# %%
teacher = models.load_model(QUALITY_MODEL, dtype=torch.float32)
distill_docs = batches.encode(tokenizer, tasks.make_examples(P["distill_examples"], seed=77),
                              train_on_prompt=True)
distill_batches = functools.partial(batches.padded_batches, distill_docs, P["distill_batch"],
                                    tokenizer.pad_token_id, seed=1)  # a fresh, identical stream per run
student_init, student_shape = prune.student_from_choice(  # importance measured on 4 training batches
    teacher, used, list(itertools.islice(distill_batches(), 4)), P["student_layers"])
students, ce_curves = distill.kd_and_ce(student_init, teacher, distill_batches, P["distill_steps"],
                                        lr=P["distill_lr"], autocast_dtype=hw.amp_dtype)
print(f"{student_shape}\nteacher {models.count_parameters(teacher)[1]:,} parameters | student "
      f"{models.count_parameters(student_init)[1]:,}")

# %%
plots.curves({name: (range(1, len(c) + 1), c) for name, c in ce_curves.items()}, xlabel="optimizer step",
             ylabel="training cross-entropy (nats per target token)",
             title="cross-entropy of the two students, from the same initialisation")
plt.show()

# %%
answer_docs = batches.encode(tokenizer, held_out)  # answers only: how well each model predicts them
kd_quality = {name: {**scores(m),
                     "answer_perplexity": quality.perplexity(m, answer_docs, tokenizer.pad_token_id)}
              for name, m in {"teacher": teacher, **students}.items()}
for name, q in kd_quality.items():
    report(name, perplexity=q["perplexity"], accuracy=q["accuracy"], answer_perplexity=q["answer_perplexity"])

# %% [markdown]
# **Speed is timed on the shape the student was chosen for.** Decode speed depends on the shape, not on the
# weights' values, and the embedded pair is too small to time: one decode step of the 4-layer, 3M-parameter
# teacher takes about 0.25 ms on an H100, mostly fixed per-step costs (graph launch, the host loop), so its
# student's time swings above and below the teacher's from run to run. So the teacher timed is the size
# sweep's largest shape (Llama-3.1-8B on a GPU) and the student the shape chosen for it, both with random
# weights, decoded through the one harness (compiled, and tuned where the sweep the cost model was fitted
# to was): this measures the >= 2x the cost model predicted. Where no shape was chosen, the speed model
# (Llama-3.2-1B-shaped on a GPU) is cut to the student's share of layers by `distill.make_student`.

# %%
chosen = isinstance(used.get("student"), dict)
speed_models = prune.speed_models(used, hw, lambda: distill.depth_pair(  # without a choice
    models.load_model(P["model"]), P["student_layers"] / teacher.config.num_hidden_layers))
speed_depths = tuple(m.config.num_hidden_layers for m in speed_models.values())
kd_speed = decode.benchmark_each(speed_models, hw, P["prompt_len"], P["new_tokens"], repeats=P["repeats"],
                                 tune=P["sweep"]["tune"])  # tuned as the sweep the cost model was fitted to
teacher_speed, student_speed = kd_speed.values()
ratios["student"] = decode.speed_ratio(student_speed, teacher_speed)  # median ratio, min, max
student_speedup = ratios["student"][0]
kept = kd_quality["distilled (KL + CE)"]["accuracy"] / kd_quality["teacher"]["accuracy"]
ce_kept = kd_quality["CE only"]["accuracy"] / kd_quality["teacher"]["accuracy"]
report("distilled student", **{"decode speed-up": bench.describe_ratio(*ratios["student"]),
                               "teacher accuracy kept": kept, "CE-only kept": ce_kept})
# A decode step = a fixed part (embedding, final norm, the LM head over the whole vocabulary, the
# argmax) + a part per layer. Two depths of one width give both; halving the layers halves only the second.
step_model = None if chosen else decode.step_split(teacher_speed, student_speed, speed_depths)
report("decode step", **({"predicted speed-up (cost model)": student_choice["predicted_speedup"]} if chosen
                         else {"fixed ms": step_model["fixed_ms"], "ms per layer": step_model["ms_per_layer"],
                               f"layers for 2x (of {speed_depths[0]})": step_model["layers_for_2x"]}))

# %%
kd, ce = kd_quality["distilled (KL + CE)"], kd_quality["CE only"]
for claim, ok in {"KD predicts the answers better than CE": kd["answer_perplexity"] < ce["answer_perplexity"],
                  "KD scores at least as well as CE": kd["accuracy"] >= ce["accuracy"]}.items():
    # a narrower (chosen) student has no scouting run behind these: reported there, asserted otherwise
    assert reported.check(claim, f"KD {kd['accuracy']:.3f}, CE {ce['accuracy']:.3f} accuracy", ok) or chosen
assert hw.cuda or student_speedup > 1.0, "the student should decode faster"  # on a GPU: >= 2x, below
(targets if chosen else reported).check(  # the depth cut of the 1B shape is a reported row
    f"chosen student decode >= 2x its teacher on the {sweep_analysis['largest']} shape (batch 1)" if chosen
    else "1B shape (reported): distilled student decode >= 2x the teacher (batch 1)",
    bench.describe_ratio(*ratios["student"]), student_speedup >= 2)
targets.check("distilled student keeps >= 95% of teacher accuracy", f"{kept:.1%}", kept >= 0.95)

# %%
plots.side_by_side([
    (plots.value_bars, dict(names=list(kd_quality), values=[q["accuracy"] for q in kd_quality.values()],
                            fmt="{:.2f}", ylabel="mean task score (exact match / ROUGE-1)",
                            title="distillation keeps more of the teacher's accuracy")),
    (plots.value_bars, dict(names=list(kd_speed),
                            values=[r["decode_tokens_per_s"] for r in kd_speed.values()],
                            ylabel="decode tokens/s (batch 1)",
                            title=f"the student decodes {student_speedup:.2f}x faster")),
], width=6)
plt.show()

# %% [markdown]
# **Half the layers is less than half the time.** Without a chosen shape, the `decode step` line splits a
# step into a fixed part and a part per layer from the two depths measured above (with one, it gives the
# speed-up the size sweep's cost model predicted, beside the measured one above). At batch 1 the fixed part
# is large on a Llama-3.2-1B shape. Part of it is the tied embedding / LM head, a 128,256 x 2,048 matrix
# (525 MB in bf16, roughly 0.18 ms at 3 TB/s) read once per token whatever the depth; the rest is per-step
# work that does not shrink with depth either (the final norm, the argmax, launching the step's graph). And
# every decoder layer's seven small products take a few microseconds each however few bytes they read. A
# student with half the layers therefore decodes less than 2x faster; `layers for 2x` says how few layers
# would be needed. Below half depth the embedded student would have a single layer for the two-step `kv`
# lookup (not measured here); a student of half the width as well as half the depth, tried in the same
# scouting run (at lr 3e-3), still scored 0 on `kv` after the same 3,000 x 256 examples (mean score 0.735
# against the teacher's 0.97); that student started from random weights. The chosen shape above is narrower
# too, which is why it starts from the teacher's pruned weights and why both runs' cross-entropy curves are
# shown: if the narrower student has not learned within the steps given, its curves and accuracy say so,
# and the depth-only student of the scouting run (0.93 on `kv`) is the best trade-off measured.

# %% [markdown]
# ## 3 · Flash attention
#
# Eager attention writes the `[batch, heads, seq, seq]` scores, reads them for the softmax, writes
# the probabilities and reads them again for `· V`: memory `O(seq²)` and time bound by that
# traffic. The fused kernels tile the computation and keep every tile's scores on chip, so memory
# is `O(seq)` and time is set by the tensor cores. All must compute the same function: first
# agreement with eager attention in fp32, within the rounding of the working dtype.

# %%
dtype = hw.compute_dtype  # bf16 on a GPU (fp16 on a T4), fp32 on a CPU
implementations = [n for n in kernels.available(hw) if not n.startswith("flex")]  # FlexAttention: notebook 04
q, k, v = kernels.random_qkv(1, P["attention_heads"], 256, P["attention_head_dim"], hw.device, dtype)
tolerance = {torch.bfloat16: 3e-2, torch.float16: 5e-3}.get(dtype, 1e-4)
attention_errors = {name: kernels.max_error_vs_eager(name, q, k, v) for name in implementations}
for name, error in attention_errors.items():
    report(name, **{"max |error| vs fp32 eager": error, "tolerance": tolerance})

# %%
assert len(attention_errors) >= 3, "eager and at least two SDPA backends should run here"
for name, error in attention_errors.items():
    assert error < tolerance, f"{name} disagrees with eager attention"

# %% [markdown]
# Time and peak memory of one causal attention forward against sequence length (batch 1, the
# speed model's heads and head size; FLOPs from `measure.flops.attention_flops`: `4·d` per
# query-key pair and head, the causal mask keeping half the pairs):

# %%
sweep = [attention_bench.time_attention(name, seq, P["attention_heads"], P["attention_head_dim"], hw,
                                        backward=False, repeats=10)
         for seq, name in itertools.product(P["attention_seq_lens"], implementations)]
sweep_table = pd.DataFrame(sweep).astype({"seconds": float, "peak_bytes": float})
sweep_ms = sweep_table.pivot(index="seq_len", columns="implementation", values="seconds") * 1e3
sweep_mib = sweep_table.pivot(index="seq_len", columns="implementation", values="peak_bytes") / 2**20
display(sweep_ms.round(3), sweep_mib.round(1))

# %%
longest = max(P["attention_seq_lens"])
at_longest = {r["implementation"]: r for r in sweep if r["seq_len"] == longest and not r["oom"]}
fused_names = [n for n in at_longest if n in ("sdpa-flash", "sdpa-cudnn")]
best_fused = max(fused_names, key=lambda n: at_longest[n]["tflops"]) if fused_names else None
matmul_tflops = timing.matmul_peak(hw.device, n=8192 if hw.cuda else 1024, dtype=dtype) / 1e12
report("measured matmul peak", **{"TFLOP/s": matmul_tflops, "dtype": str(dtype)})
for name, row in at_longest.items():
    report(f"{name} @ {longest}", **{"TFLOP/s": row["tflops"], "peak MiB": row["peak_bytes"] / 2**20,
                                     "TFLOP/s min-max": f"{row['tflops_min']:.3g}-{row['tflops_max']:.3g}",
                                     "% of matmul peak": 100 * row["tflops"] / matmul_tflops})

# %%
fused_any = [n for n in at_longest if n not in ("eager", "sdpa-math")]
assert fused_any, "at least one fused attention kernel should run at the longest length"
assert all(at_longest[n]["peak_bytes"] < at_longest["eager"]["peak_bytes"] for n in fused_any), \
    "fused kernels should need less memory than eager attention, which writes the score matrix"
attention_fraction = at_longest[best_fused]["tflops"] / matmul_tflops if best_fused else None
targets.check(f"best of SDPA flash/cuDNN forward at seq {longest} >= 50% of the measured matmul peak",
              f"{best_fused}: {attention_fraction:.1%} of {matmul_tflops:.0f} TFLOP/s (TFLOP/s "
              f"{at_longest[best_fused]['tflops_min']:.3g}-{at_longest[best_fused]['tflops_max']:.3g})"
              if best_fused else "no kernel",
              attention_fraction is not None and attention_fraction >= 0.5)

# %%
plots.side_by_side([
    (plots.curves, dict(series={n: (sweep_ms.index, sweep_ms[n]) for n in sweep_ms},
                        xlabel="sequence length (tokens)", ylabel="forward time (ms)",
                        title="fused kernels grow slower than eager attention",
                        logx=True, logy=True)),
    (plots.curves, dict(series={n: (sweep_mib.index, sweep_mib[n]) for n in sweep_mib}, logx=True, logy=True,
                        xlabel="sequence length (tokens)", ylabel="peak memory (MiB)",
                        title="eager attention stores seq x seq scores")),
], width=6)
plt.show()

# %% [markdown]
# End to end: the speed model with eager attention against SDPA, a long prompt, the same harness.
# The decode steps here run eagerly (fewer new tokens): the comparison is about attention, and
# prefill over a long prompt is where attention dominates.

# %%
def e2e_speed(implementation):
    model = models.load_model(P["model"], attn_implementation=implementation)
    row = decode.benchmark(model, hw, 1, P["e2e_prompt_len"], P["slow_new_tokens"], compile=False,
                           repeats=P["repeats"], warmup=1, name=f"attention: {implementation}")
    return decode.report_row(row)


flash_attention_2 = ["flash_attention_2"] if hw.cuda and kernels.flash_attn_installed() else []
e2e_attention = {name: e2e_speed(name) for name in ["eager", "sdpa", *flash_attention_2]}
memory.free_memory()
e2e_sdpa, e2e_eager = e2e_attention["sdpa"], e2e_attention["eager"]
ratios |= {f"SDPA {phase}": decode.speed_ratio(e2e_sdpa, e2e_eager, phase) for phase in ("prefill", "decode")}
report("SDPA vs eager end to end", **{k: bench.describe_ratio(*v) for k, v in ratios.items() if "SDPA" in k})

# %% [markdown]
# ## 4 · LayerNorm -> RMSNorm
#
# RMSNorm drops LayerNorm's centring: `y = x / sqrt(mean(x²) + eps) · w + b` instead of
# `(x - mean) / sqrt(var + eps) · w + b`. One reduction per row instead of two, the same bytes
# moved. First the module against its formula (computed here by hand, in fp64):

# %%
x = torch.randn(4, 16, 64, dtype=torch.float64)
norm = norms.RMSNorm(64, eps=1e-6, bias=True).double()
torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
by_hand = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 64 + 1e-6) * norm.weight + norm.bias
formula_error = (norm(x) - by_hand).abs().max().item()
norm.fused = True
fused_error = (norm(x) - by_hand).abs().max().item()
report("RMSNorm vs its formula", **{"max |error| (written out)": formula_error,
                                    "max |error| (F.rms_norm)": fused_error})
assert formula_error < 1e-12 and fused_error < 1e-12, "RMSNorm must compute its formula"

# %% [markdown]
# Now the swap on the embedded GPT-2-shaped model (`data/tiny-gpt2`, built by
# `scripts/build_layernorm_model.py` from the same tokenizer and tasks): every LayerNorm becomes
# an RMSNorm with the same weight and bias. Where a norm's inputs have a non-zero mean, the model
# now sees shifted activations and quality drops; how much depends on the model (the run below
# prints it: where the inputs are already nearly centred the drop is small). A short, gentle
# fine-tune on the pre-training mix then heals what was lost, through the one training loop.

# %%
gpt2 = models.load_model(LAYERNORM_MODEL, dtype=torch.float32)
ln_quality = {"LayerNorm (original)": scores(gpt2)}
n_layernorms = norms.count_layernorms(gpt2)
n_swapped = norms.swap_layernorm(gpt2)
ln_quality["RMSNorm (swapped)"] = scores(gpt2)
heal_docs = batches.encode(tokenizer, tasks.make_examples(P["heal_steps"] * P["heal_batch"], seed=99),
                           train_on_prompt=True)
optimizer = torch.optim.AdamW(gpt2.parameters(), lr=HEAL_LR, weight_decay=0.0)
train.train(gpt2, optimizer,
            batches.padded_batches(heal_docs, P["heal_batch"], tokenizer.pad_token_id, seed=3),
            steps=P["heal_steps"], autocast_dtype=hw.amp_dtype, desc="heal",
            scheduler=train.cosine_schedule(optimizer, P["heal_steps"], warmup=P["heal_steps"] // 10))
ln_quality["RMSNorm (healed)"] = scores(gpt2)
for name, q in ln_quality.items():
    report(name, **{"perplexity": q["perplexity"], "accuracy": q["accuracy"]})
print(f"swapped {n_swapped} of {n_layernorms} LayerNorms; left: {norms.count_layernorms(gpt2)}")

# %%
original, swapped, healed = (q["perplexity"] for q in ln_quality.values())
heal_gap = healed / original - 1
assert norms.count_layernorms(gpt2) == 0 and n_swapped == n_layernorms > 0, "every LayerNorm should be gone"
report("RMSNorm swap", **{"perplexity change after swap %": 100 * (swapped / original - 1),
                         "after healing %": 100 * heal_gap})
assert swapped != original, "the swap should change the model's function (no centring any more)"
assert heal_gap <= 0.02, "after healing, perplexity should be within 2% of the LayerNorm original"
targets.check("perplexity after healing within 2% of the LayerNorm original", f"{100 * heal_gap:+.2f}%",
              heal_gap <= 0.02)

# %% [markdown]
# ### The norm kernels against the memory-bandwidth floor
# Forward + backward of one norm over `[rows, 2048]` (the Llama-3.2-1B hidden size). A fused
# kernel must at least read `x` and write `y` (forward), read `x` and `dy` and write `dx`
# (backward): `5 · rows · 2048 · bytes` moved, whose time at the measured copy bandwidth is the
# floor. The written-out RMSNorm launches a kernel per operation and moves every intermediate
# through memory; `F.rms_norm` and `torch.compile` fuse them. On a GPU with Triton,
# `recipes_lib.inference.rmsnorm_triton` adds ours: one forward kernel (a row per program, `rstd`
# kept) and one
# backward kernel whose persistent programs each walk many rows and keep their share of the weight
# gradient in registers, so `x` and `dy` are read once for both gradients. The fastest fused kernel
# is the one set against the target.

# %%
bandwidth = timing.copy_bandwidth(hw.device, n_bytes=2**30 if hw.cuda else 2**26)
floor_s = norm_bench.bytes_moved(P["norm_rows"], NORM_HIDDEN, dtype) / bandwidth
norm_times = {name: norm_bench.forward_backward_timing(fn, P["norm_rows"], NORM_HIDDEN, hw.device, dtype)
              for name, fn in norms.norm_functions(NORM_HIDDEN, hw.device, dtype, compile=hw.cuda).items()}
report("memory-bandwidth floor", **{"copy GB/s": bandwidth / 1e9, "floor ms": floor_s * 1e3,
                                    "rows": P["norm_rows"]})
for name, t in norm_times.items():  # the time's median [min-max], and the same over the floor
    report(name, **{"fwd+bwd": str(t), "x floor": bench.describe_ratio(*t.over(floor_s))})
if "RMSNorm (Triton)" in norm_times:  # our kernels against the formula, forward and both gradients
    triton_errors = norms.triton_errors(NORM_HIDDEN, hw.device, dtype)
    report("Triton RMSNorm vs fp64 formula", **{f"max |error| {k}": v for k, v in triton_errors.items()})

# %%
targets.check("F.rms_norm beats the written-out formula (fwd+bwd)", str(norm_times["RMSNorm (F.rms_norm)"]),
              norm_times["RMSNorm (F.rms_norm)"].median < norm_times["RMSNorm (eager formula)"].median)
if "RMSNorm (Triton)" in norm_times:  # bf16 outputs: a few ulps of values up to ~4; dw sums 4096 rows in fp32
    assert triton_errors["y"] < 0.05 and triton_errors["dx"] < 0.05 \
        and triton_errors["dw (relative)"] < 0.01, \
        f"the Triton RMSNorm must compute the formula and its gradients: {triton_errors}"
fused_kernels = [n for n in ("RMSNorm (F.rms_norm)", "RMSNorm (compiled)", "RMSNorm (Triton)")
                 if n in norm_times]
fused_name = min(fused_kernels, key=lambda n: norm_times[n].median)
fused_vs_floor, *floor_range = norm_times[fused_name].over(floor_s)
targets.check("fused RMSNorm fwd+bwd within 1.5x of the bandwidth floor (fastest fused kernel)",
              f"{fused_name}: {bench.describe_ratio(fused_vs_floor, *floor_range)} the floor",
              fused_vs_floor <= 1.5)

# %% [markdown]
# End to end: one training step (forward + backward) of a GPT-2-shaped model with LayerNorm, with
# the written-out RMSNorm, and with the fused `F.rms_norm` (on a GPU: GPT-2-medium's shape, random
# weights; on CPU the embedded model).

# %%
e2e_model = (GPT2LMHeadModel(GPT2Config(**P["e2e_norm_shape"])).to(hw.device, hw.model_dtype)
             if P["e2e_norm_shape"] else models.load_model(LAYERNORM_MODEL))
step_seconds = functools.partial(norm_bench.train_step_timing, e2e_model, P["e2e_norm_batch"],
                                 P["e2e_norm_seq"])
e2e_norm = {"LayerNorm": step_seconds()}
norms.swap_layernorm(e2e_model)
e2e_norm["RMSNorm (written out)"] = step_seconds()
norms.set_fused(e2e_model, True)
e2e_norm["RMSNorm (F.rms_norm)"] = step_seconds()
n_tok = P["e2e_norm_batch"] * P["e2e_norm_seq"]  # tokens per step
for name, t in e2e_norm.items():  # the median step [min-max], its tokens/s, its speed against LayerNorm's
    ratios[f"{name} step"] = bench.speed_ratio(t.per_second(n_tok), e2e_norm["LayerNorm"].per_second(n_tok))
    report(name, **{"step": str(t), "tokens/s": n_tok / t.median,
                    "vs LayerNorm": bench.describe_ratio(*ratios[f"{name} step"])})
del e2e_model, step_seconds
memory.free_memory()

# %%
plots.side_by_side([
    (plots.floor_bars, dict(names=list(norm_times), values=[t.median * 1e3 for t in norm_times.values()],
                            floor=floor_s * 1e3, floor_label="bandwidth floor",
                            ylabel="forward + backward (ms)",
                            title=f"{fused_name}: {fused_vs_floor:.2f}x the memory floor")),
    (plots.value_bars, dict(names=list(ln_quality), values=[q["perplexity"] for q in ln_quality.values()],
                            fmt="{:.3g}", ylabel="held-out perplexity",
                            title=f"healing brings perplexity to {100 * heal_gap:+.1f}% of the original")),
])
plt.show()

# %% [markdown]
# ## Bad input gives one clear message, and a fallback where one exists

# %%
def raised(fn):
    try:
        fn()
    except errors.RecipeError as error:
        return error


def warned(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        return fn(), [str(w.message) for w in caught]


small = quantize.int8_weight_only(models.load_model(QUALITY_MODEL))[0]
twice = raised(lambda: quantize.int8_weight_only(small))
no_flash = dataclasses.replace(hw, name=f"{hw.name} (simulated: no flash kernel, as on a pre-Ampere GPU)",
                               sdpa_backends=tuple(b for b in hw.sdpa_backends if b != "flash"))
chosen, flash_warnings = warned(lambda: kernels.choose_backend("flash", no_flash))
no_bnb = dataclasses.replace(hw, name=f"{hw.name} (simulated: bitsandbytes without kernels)",
                             bitsandbytes=False)
fallback, bnb_warnings = warned(
    lambda: quantize.quantization_of(models.load_model(QUALITY_MODEL, quantization="int8", hw=no_bnb)))
too_big = raised(lambda: distill.make_student(teacher, teacher.config.num_hidden_layers + 2))
print(f"quantize an already-quantized model: {twice}\na student larger than its teacher: {too_big}")
print(f"SDPA flash on a GPU without it -> {chosen!r}: {flash_warnings}")
print(f"LLM.int8() without bitsandbytes kernels -> quantized as {fallback!r}: {bnb_warnings}")

# %%
assert isinstance(twice, errors.RecipeError) and isinstance(too_big, errors.RecipeError)
assert chosen in no_flash.sdpa_backends and flash_warnings, "a missing flash kernel should warn and fall back"
assert fallback is None and bnb_warnings, "missing bitsandbytes should warn and load unquantized weights"

# %% [markdown]
# ## The recipes side by side, and the saved figures

# %%
said = {name: bench.describe_ratio(*ratio) for name, ratio in ratios.items()}  # median [min-max]
display(pd.DataFrame([
    {"recipe": "int8 weight-only", "speed-up": f"{said['int8 weight-only']} decode (batch 1)",
     "quality": f"perplexity {100 * ppl_delta[WO_KEY]:+.2f}%"},
    {"recipe": "LLM.int8()", "speed-up": f"{said['LLM.int8()']} decode vs eager bf16",
     "quality": f"perplexity {100 * ppl_delta['LLM.int8() (bitsandbytes)']:+.2f}%"},
    {"recipe": "distilled student", "speed-up": f"{said['student']} decode (batch 1)",
     "quality": f"{kept:.1%} of teacher accuracy"},
    {"recipe": f"SDPA ({best_fused or 'fused'}) vs eager attention",
     "speed-up": f"{said['SDPA prefill']} prefill at {P['e2e_prompt_len']} tokens",
     "quality": f"max error {max(e for n, e in attention_errors.items() if n != 'eager'):.1e}"},
    {"recipe": "RMSNorm (fused) vs LayerNorm", "speed-up": f"{said['RMSNorm (F.rms_norm) step']} train step",
     "quality": f"perplexity {100 * heal_gap:+.2f}% after healing"},
]).set_index("recipe"))

# %%
bnb, bf16_eager = b1["LLM.int8() eager"], b1["bf16 eager"]
board = [
    results.scoreboard_row("03", "int8 weight-only (decode, batch 1)", "bf16", b1[WO_KEY]["weight_bytes"],
                           b1["bf16"]["weight_bytes"], b1[WO_KEY]["decode_tokens_per_s"],
                           b1["bf16"]["decode_tokens_per_s"]),
    results.scoreboard_row("03", "LLM.int8() (eager decode, batch 1)", "bf16 eager", bnb["weight_bytes"],
                           bf16_eager["weight_bytes"], bnb["decode_tokens_per_s"],
                           bf16_eager["decode_tokens_per_s"]),
    results.scoreboard_row("03", "distilled student (decode)", "teacher", None, None,
                           student_speed["decode_tokens_per_s"], teacher_speed["decode_tokens_per_s"]),
    results.scoreboard_row("03", "SDPA attention (prefill)", "eager attention", None, None,
                           e2e_attention["sdpa"]["prefill_tokens_per_s"],
                           e2e_attention["eager"]["prefill_tokens_per_s"]),
]
figures = {"int8_speed": speed, "int8_quality": quality_rows, "int8_linear_bytes_ratio": linear_ratio,
           "int8_perplexity_delta": ppl_delta, "int8_decode_speedup": decode_speedup,
           "int8_decode_speedup_by_backend": wo_ratios, "distill_quality": kd_quality,
           "distill_speed": kd_speed, "student_speedup": student_speedup, "ratios_min_max": ratios,
           "distill_student": student_shape, "distill_ce_per_step": ce_curves,
           "accuracy_kept": kept, "decode_step_model": step_model, "attention_errors": attention_errors,
           "attention_sweep": sweep, "matmul_peak_tflops": matmul_tflops,
           "attention_best_fused": best_fused, "attention_fraction_of_matmul_peak": attention_fraction,
           "attention_end_to_end": e2e_attention, "layernorm_quality": ln_quality, "heal_gap": heal_gap,
           "norm_fwd_bwd_seconds": norm_times, "norm_floor_seconds": floor_s, "copy_bandwidth": bandwidth,
           "norm_fastest_fused": fused_name, "norm_end_to_end_seconds": e2e_norm, "targets": targets.rows,
           "reported_1b_rows": reported.rows, "decode_size_sweep": {**size_sweep, "analysis": sweep_analysis}}
env = results.environment(hw, **{**P, "quality_model": QUALITY_MODEL, "layernorm_model": LAYERNORM_MODEL,
                                 "int8_backend": wo_backend})
for path in results.save("03_optimizing_inference_speed", hw, env, figures, board, publish=P["reference"]):
    print("wrote", path.relative_to(models.REPO_ROOT) if path.is_relative_to(models.REPO_ROOT) else path)

# %% [markdown]
# ## The GPU targets
# Set for an H100; printed everywhere, and on an H100 a miss fails this cell (after every
# figure above has been measured and saved), so a missed target is shown, not hidden. The rows
# marked "1B shape (reported)" were targets until the size sweep showed why they cannot be met at
# that size (a fixed and per-layer latency that int8 and fewer layers do not remove); they are
# shown beside the targets and never asserted, and the sweep's 8B target replaced them.

# %%
display(pd.DataFrame(targets.rows + reported.rows).set_index("target"))
targets.assert_all()

# %% [markdown]
# ## Use it in your own code
#
# ```python
# from recipes_lib.core import hardware, models
# from recipes_lib.inference import distill, norms, quantize
# from recipes_lib.measure import decode
#
# hw = hardware.detect()
# # torchao int8 weight-only, then decode with a compiled CUDA-graph step
# model, backend = quantize.int8_weight_only(models.load_model("meta-llama/Llama-3.2-1B"))
# print(decode.benchmark(model, hw, batch=1, prompt_len=512, new_tokens=128))
#
# # half the layers, initialised from the teacher; trained by train.train with the KL + CE loss hook
# student = distill.make_student(teacher, num_layers=8)
# distill.distill(student, teacher, batches, steps=2000, kl_weight=0.5, autocast_dtype=hw.amp_dtype)
#
# norms.swap_layernorm(gpt2_model, fused=True)  # LayerNorm -> RMSNorm, then heal with train.train
# ```
