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
# # 01 · Training large models on limited hardware
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-acceleration-recipes/recipes/blob/main/notebooks/01_large_models_limited_hardware.ipynb)
#
# After this notebook you will be able to fine-tune a model whose plain fine-tuning does not fit
# your GPU, and to say **where every byte goes**. Four recipes, each measured and checked:
#
# | recipe | saves | costs |
# | --- | --- | --- |
# | **QLoRA**: frozen 4-bit base + small trainable adapters | weights, grads, optimizer state | dequantising |
# | **Activation checkpointing**: keep layer inputs, recompute the rest | activations | one extra forward |
# | **Gradient accumulation**: several micro-batches per optimizer step | activations | smaller kernels |
# | **CPU offloading of optimizer states** | optimizer state on the GPU | PCIe traffic, a CPU AdamW step |
#
# They stack into a **ladder**, measured at the end. On a GPU the notebook uses a
# Llama-3.2-1B-shaped model (random weights: memory and speed do not depend on the values) at 2048
# tokens; quality is measured on the embedded tiny model, which has learned its tasks. On a CPU the
# same code runs at a small size, so CI checks every claim.

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
PROFILE = "auto"  # "cpu": CI-sized on the embedded model; "gpu": Llama-3.2-1B shape at 2048 tokens;
# "t4" / "l4": the same shape sized for a 16 GB T4 (fp16) / a 24 GB L4, about 10 minutes there
MODEL = None      # override the profile's model: a hub id, a local path, or random:<shape>
PROFILES = {
    "cpu": dict(model="data/tiny-llama", seq_len=256, micro_batch=8, accum_steps=4, lora_r=8,
                steps=5, finetune_steps=150, finetune_batch=16),
    "gpu": dict(model="random:llama-3.2-1b", seq_len=2048, micro_batch=8, accum_steps=4, lora_r=16,
                steps=6, finetune_steps=300, finetune_batch=16),
    "t4": dict(model="random:llama-3.2-1b", seq_len=1024, micro_batch=2, accum_steps=2, lora_r=16,
               steps=5, finetune_steps=300, finetune_batch=16),
    "l4": dict(model="random:llama-3.2-1b", seq_len=1024, micro_batch=4, accum_steps=4, lora_r=16,
               steps=5, finetune_steps=300, finetune_batch=16),
}
QUALITY_MODEL = "data/tiny-llama"  # the embedded default: it knows its tasks, so quality means something
FINETUNE_TASK = "reverse"          # a task the embedded model never saw in pre-training

# %%
from recipes_lib import notebook

hw, P, targets = notebook.setup(PROFILES, MODEL, PROFILE, benchmark_gpu="H100")

# %%
import functools
import itertools
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display
from transformers import AutoConfig

from recipes_lib import plots, results
from recipes_lib.core import batches, errors, hardware, losses, models, speed, tasks, train
from recipes_lib.measure import bench, estimate, estimate_check, flops, predict, quality, timing, workload
from recipes_lib.measure.memory import GiB
from recipes_lib.measure.report import report
from recipes_lib.memory import candidates as qlora_candidates
from recipes_lib.memory import offload, qlora

# %% [markdown]
# ### The model and the batches
# Memory and speed runs train on documents whose lengths are drawn uniformly between 1/8 of the
# sequence length and all of it (fine-tuning sets are like that), packed into rows of `seq_len`
# tokens. Packing restarts `position_ids` at each document, so attention stays inside it.
# `measured` runs one configuration through `bench.run` (build, warm up, time `steps` steps, measure
# one step's peak) and prints its row: tokens/s as the median step with the fastest-slowest range.
# AdamW is PyTorch's fused implementation on a GPU, as `Trainer`'s default (`adamw_torch_fused`).
# MFU counts causal attention as half (`flops.training_flops_per_token`) and is shown against the
# datasheet's dense bf16 peak and against the matmul rate measured on this device, side by side.

# %%
MODEL_NAME, SEQ_LEN = P["model"], P["seq_len"]
config = AutoConfig.from_pretrained(models.resolve(MODEL_NAME))
models.check_seq_len(config, SEQ_LEN)
docs = batches.random_documents(400, config.vocab_size, SEQ_LEN // 8, SEQ_LEN, seed=0)
flops_per_token = bench.flops_counter(config, SEQ_LEN)


def packed(micro_batch):
    return batches.packed_batches(docs, SEQ_LEN, micro_batch, seed=0)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def adamw(model, lr=1e-5):
    return torch.optim.AdamW(trainable(model), lr=lr, fused=hw.cuda or None)


def measured(cfg, batches_fn=packed, profile=0, warmup=1):
    """Run one configuration and print its one-line report (OOM is a result, not a crash); ``profile``:
    that many more steps under torch.profiler, for the share of the step the device is busy."""
    row = bench.run(cfg, batches_fn, hw, steps=P["steps"], seq_len=SEQ_LEN, flops_per_token=flops_per_token,
                    profile=profile, warmup=warmup)
    return bench.show(row)


liger_ok = "Liger kernels" not in qlora_candidates.unavailable(hw)  # a maintained peer: GPUs, where installed


matmul_peak = timing.matmul_peak(hw.device) if hw.cuda else None  # FLOP/s a big bf16 matmul reaches
n_params = sum(i * o for i, o in flops.linear_shapes(config)) + config.vocab_size * config.hidden_size
print(f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}: "
      f"{n_params / 1e6:,.1f}M parameters | {len(docs)} documents, {SEQ_LEN} tokens per row")
if matmul_peak:
    print(f"bf16 matmul peak: {matmul_peak / 1e12:.0f} TFLOP/s measured, {hw.peak_flops / 1e12:.0f} spec")
notebook.state_runtime(P, *workload.notebook01(P, config))  # this profile's work, at its GPU class's rates

# %% [markdown]
# ## 1 · QLoRA
#
# Full fine-tuning in bf16 with AdamW keeps, per parameter, the weight (2 bytes), its gradient
# (2 bytes) and two AdamW moments (2 × 2 bytes): **8 bytes × N**. QLoRA freezes the base in 4-bit
# NF4 (0.5 byte, plus 1/64 byte of 8-bit block scales and a sliver of fp32 second-level scales:
# **0.516 byte**) and trains low-rank adapters `B·A` of rank `r` beside every linear layer:
# `r·(d_in + d_out)` parameters each, in fp32 with fp32 gradients and moments (16 bytes each).
# Embeddings and norms stay in bf16 (fp16 on a GPU without bf16, a T4: `qlora.unquantized_dtype`, while
# full fine-tuning keeps fp32 weights there). The prediction below comes from the config alone.
#
# Both sides run the library's default path, the fastest the speed sections below measured: on a bf16 GPU,
# full fine-tuning with each decoder layer compiled (`speed.default_compile`), and QLoRA on torchao's
# `NF4Tensor` base with compiled layers (`qlora.default_path`, where torchao is installed). Elsewhere it
# falls back, to eager layers and bitsandbytes' base, and the first line below says so.

# %%
FULL_COMPILED, why_full = speed.default_compile(hw)
QLORA_BASE, QLORA_COMPILED, why_qlora = qlora.default_path(hw, config=config)  # qlora_model(base="auto")
print(f"full fine-tuning: {why_full} | QLoRA: {why_qlora}")


def full_fine_tune_model(compiled=FULL_COMPILED):  # the default full path: compiled layers on a bf16 GPU
    model = models.load_model(MODEL_NAME)
    return speed.compile_layers(model) if compiled else model


full_cfg = bench.Config("full fine-tune", full_fine_tune_model, adamw, P["micro_batch"],
                        fused_head=False)  # the model's own loss: plain transformers' step (Speed 1)
qlora_cfg = bench.Config("QLoRA", lambda: qlora.qlora_model(MODEL_NAME, r=P["lora_r"]), adamw,
                         P["micro_batch"])
full_row, qlora_row = measured(full_cfg), measured(qlora_cfg)
predicted = {"full fine-tune": predict.qlora_state_bytes(config, None, hw.model_dtype.itemsize),
             "QLoRA": predict.qlora_state_bytes(config, P["lora_r"], qlora.unquantized_dtype(hw).itemsize)}
states_match = [bench.check_states(row, predicted[row["name"]])
                for row in (full_row, qlora_row) if not row["oom"]]

# %%
state_ratio = None
predicted_ratio = sum(predicted["QLoRA"].values()) / sum(predicted["full fine-tune"].values())
assert all(states_match), "weights, gradients and optimizer state should match the prediction from the config"
if bench.fits(full_row, qlora_row):
    state_ratio = qlora_row["memory"].states / full_row["memory"].states
    trainable_fraction = qlora_row["trainable_params"] / full_row["trainable_params"]
    report("QLoRA vs full", **{"trainable %": 100 * trainable_fraction,
                               "states %": 100 * state_ratio, "predicted states %": 100 * predicted_ratio,
                               "peak %": 100 * qlora_row["memory"].peak / full_row["memory"].peak})
    assert state_ratio < 1.05 * predicted_ratio < 1, "QLoRA's weights+grads+AdamW should shrink as predicted"
    assert qlora_row["memory"].peak < full_row["memory"].peak
    if hw.cuda:
        targets.check("QLoRA states <= 15% of full fine-tuning's", f"{state_ratio:.1%}", state_ratio <= 0.15)
else:
    assert not qlora_row["oom"], "QLoRA should fit where full fine-tuning does not"
    print("full fine-tuning does not fit on this device; QLoRA does")

# %%
plots.memory_bars([full_row, qlora_row], "QLoRA: a 4-bit frozen base, adapter-only gradients and AdamW state")
plt.show()

# %% [markdown]
# ### Does QLoRA still learn?
# Memory is only half the story. Teach the embedded model a task it never saw (`reverse`) with
# full fine-tuning and with QLoRA, the same steps and batches, and score held-out examples (exact
# match). LoRA gets a 10x higher learning rate, as usual for adapters. On a GPU without bf16 (a T4)
# both train in fp16 with loss scaling: a step whose gradients overflow fp16 is skipped and the scale
# lowered; the table counts those steps, and any inf/NaN step that was not skipped (there must be none).

# %%
tokenizer = models.load_tokenizer(QUALITY_MODEL)
ft_docs = batches.encode(tokenizer, tasks.make_examples(4000, seed=7, tasks=(FINETUNE_TASK,)))
held_out = tasks.make_examples(200, seed=8, tasks=(FINETUNE_TASK,))
before = quality.task_scores(models.load_model(QUALITY_MODEL), tokenizer, held_out)[FINETUNE_TASK]
exact_match = {"before": before}
ft_runs = {}  # name -> train.TrainStats


def finetune(model, lr, steps=P["finetune_steps"]):
    optimizer = torch.optim.AdamW(trainable(model), lr=lr)
    ft_batches = batches.padded_batches(ft_docs, P["finetune_batch"], tokenizer.pad_token_id, seed=1)
    ft_runs[len(ft_runs)] = train.train(model, optimizer, ft_batches, steps, autocast_dtype=hw.amp_dtype,
                                        scheduler=train.cosine_schedule(optimizer, steps, steps // 10))
    return quality.task_scores(model, tokenizer, held_out)[FINETUNE_TASK]


torch.manual_seed(0)  # each run starts from the same random state (LoRA's init), whatever ran before
exact_match["full fine-tune"] = finetune(models.load_model(QUALITY_MODEL), lr=1e-3)
torch.manual_seed(0)
exact_match["QLoRA"] = finetune(qlora.qlora_model(QUALITY_MODEL, r=P["lora_r"], alpha=2 * P["lora_r"],
                                                  compiled=False), lr=1e-2)  # eager: it generates, below
report(f"{FINETUNE_TASK} exact match", **exact_match)
ft_runs = dict(zip(["full fine-tune", "QLoRA"], ft_runs.values()))
tenth = max(P["finetune_steps"] // 10, 1)
first, last = ({n: np.mean([x for x in r.losses[part] if np.isfinite(x)]) for n, r in ft_runs.items()}
               for part in (slice(None, tenth), slice(-tenth, None)))  # mean loss of the first / last 10%
display(pd.DataFrame({name: {"precision": str(hw.amp_dtype or torch.float32).removeprefix("torch."),
                             "loss, first 10% of steps": first[name], "loss, last 10%": last[name],
                             "steps skipped (fp16 overflow)": r.skipped_steps,
                             "inf/NaN steps not skipped": r.unskipped_nonfinite}
                      for name, r in ft_runs.items()}).T)

# %%
assert exact_match["QLoRA"] > exact_match["before"] + 0.2, "QLoRA fine-tuning should teach the new task"
assert exact_match["QLoRA"] >= exact_match["full fine-tune"] - 0.25, "QLoRA should learn nearly as well"
for name, r in ft_runs.items():
    assert r.unskipped_nonfinite == 0, f"{name}: an inf/NaN step updated the weights"
    assert last[name] < first[name], f"{name}: the loss should fall"

# %% [markdown]
# ## 2 · Activation checkpointing
#
# Backward needs every layer's intermediate tensors. For a Llama layer that is roughly
# `seq · (34·d + 5·heads·seq)` bytes in bf16 without fused attention, `~34·seq·d` with it, times the
# number of layers. Checkpointing keeps only each layer's input (`2·seq·d` bytes) and recomputes the
# layer during backward: activation memory falls from `L × layer` to `L × input + one layer`, for one
# extra forward pass (about +1/3 of the compute with full weights, +1/2 with a frozen base, whose
# backward skips weight gradients). So the cut it can make depends on the shape: with `A` elements
# per token saved by a layer (`predict.layer_activation_elements`), it is `1 - (L·d + A) / (L·A)`:
# about 90% for 16 layers, under 50% for 2.

# %%
ckpt_cfg = bench.Config("QLoRA + checkpointing",
                        lambda: qlora.qlora_model(MODEL_NAME, r=P["lora_r"], gradient_checkpointing=True),
                        adamw, P["micro_batch"])
ckpt_row = measured(ckpt_cfg)
predicted_cut = predict.checkpointing_activation_cut(config)
activation_cut = slowdown = None
if bench.fits(qlora_row, ckpt_row):
    activation_cut = 1 - ckpt_row["memory"].activations / qlora_row["memory"].activations
    slowdown = 1 - ckpt_row["tokens_per_s"] / qlora_row["tokens_per_s"]
    report("checkpointing", **{"activation cut %": 100 * activation_cut,
                               "predicted cut %": 100 * predicted_cut, "tokens/s lost %": 100 * slowdown})

# %% [markdown]
# Checkpointing must not change the result: gradients with and without it agree (fp32, embedded model).

# %%
def lora_grads(model):
    train.accumulate_gradients(model, [batches.pad_batch(ft_docs[:4], tokenizer.pad_token_id)])
    return torch.cat([p.grad.flatten() for p in trainable(model)])


cpu = hardware.detect("cpu")  # fp32, so the comparison is exact up to float rounding
plain_model = qlora.qlora_model(QUALITY_MODEL, r=4, hw=cpu)
ckpt_model = qlora.qlora_model(QUALITY_MODEL, r=4, gradient_checkpointing=True, hw=cpu)
for p_plain, p_ckpt in zip(trainable(plain_model), trainable(ckpt_model)):
    torch.nn.init.normal_(p_plain, std=0.02)  # non-zero B too, so every adapter gets a gradient
    p_ckpt.data.copy_(p_plain.data)
g_plain, g_ckpt = lora_grads(plain_model), lora_grads(ckpt_model)
ckpt_error = ((g_ckpt - g_plain).norm() / g_plain.norm()).item()
report("checkpointing gradients", **{"relative error": ckpt_error})

# %%
assert ckpt_error < 1e-5, "checkpointing must reproduce the gradients"
assert not ckpt_row["oom"], "QLoRA with checkpointing should fit"
if activation_cut is not None:
    assert activation_cut > 0.75 * predicted_cut, "checkpointing should remove most of what the shape allows"
    if hw.cuda:
        targets.check("activation memory cut >= 60%", f"{activation_cut:.1%}", activation_cut >= 0.60)
        targets.check("tokens/s lost <= 35%", f"{slowdown:.1%}", slowdown <= 0.35)

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
plots.memory_bars([qlora_row, ckpt_row], "checkpointing keeps only each layer's input", ax=left)
plots.value_bars([qlora_row["name"], ckpt_row["name"]],
                 [qlora_row.get("tokens_per_s"), ckpt_row["tokens_per_s"]], "tokens/s",
                 "and recomputes the rest in backward", ax=right)
plt.show()

# %% [markdown]
# ## 3 · Gradient accumulation
#
# Activation memory grows with the micro-batch; the optimizer step wants a large batch. Accumulating
# `k` micro-batches before each step gives the large batch's gradient with `1/k` of the activations
# that scale with the batch (the loss chunks and one layer's recomputation do not shrink), **if**
# the loss is normalised correctly. The mean loss of a batch averages over its target
# tokens; averaging per-micro-batch means weights a token in a short (heavily padded) micro-batch
# more than one in a long one. `recipes_lib.train` sums each micro-batch's token losses and divides by
# the token count of the whole step, which is exactly the large batch's loss. The common shortcut
# takes each micro-batch's mean loss and divides by the number of micro-batches: `mean_loss` below,
# with the step's "token count" set to the number of micro-batches.
#
# Check in fp32 on the embedded model, with micro-batches of deliberately uneven lengths:

# %%
def full_grads(micro_batches, **how):
    torch.manual_seed(0)
    model = models.load_model(QUALITY_MODEL, hw=cpu)
    train.accumulate_gradients(model, micro_batches, **how)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def mean_loss(model, micro_batch):
    return train.loss_sum(model, micro_batch) / losses.count_targets(micro_batch["labels"])


uneven = sorted(ft_docs[:12] + batches.encode(tokenizer, tasks.make_examples(4, seed=9, tasks=("kv",))),
                key=lambda d: len(d.input_ids))
big_batch = [batches.pad_batch(uneven, tokenizer.pad_token_id)]
micro = [batches.pad_batch(uneven[i:i + 4], tokenizer.pad_token_id) for i in range(0, len(uneven), 4)]
print("target tokens per micro-batch:", [losses.count_targets(mb["labels"]) for mb in micro])
g_big, g_acc = full_grads(big_batch), full_grads(micro)
g_naive = full_grads(micro, loss_fn=mean_loss, total_targets=len(micro))
accum_error = ((g_acc - g_big).norm() / g_big.norm()).item()
naive_error = ((g_naive - g_big).norm() / g_big.norm()).item()
report("accumulated vs large batch",
       **{"relative error": accum_error, "naive per-micro-batch mean": naive_error})

# %%
assert accum_error < 1e-5, "token-normalised accumulation must equal the large-batch gradient"
assert naive_error > 100 * accum_error, "the naive average should be visibly wrong on uneven batches"

# %% [markdown]
# Memory: the same effective batch of `micro_batch` sequences, now as `accum_steps` smaller micro-batches.

# %%
small = P["micro_batch"] // P["accum_steps"]
accum_cfg = bench.Config("QLoRA + ckpt + accumulation",
                         lambda: qlora.qlora_model(MODEL_NAME, r=P["lora_r"], gradient_checkpointing=True),
                         adamw, small, accum_steps=P["accum_steps"])
accum_row = measured(accum_cfg)
assert accum_row["memory"].activations < ckpt_row["memory"].activations, \
    "smaller micro-batches should need less activation memory"

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
plots.value_bars(["token-normalised", "naive mean of means"], [accum_error, naive_error],
                 "relative gradient error vs large batch", "only token normalisation matches the large batch",
                 ax=left, fmt="{:.1e}")
left.set_yscale("log")
plots.memory_bars([ckpt_row, accum_row], "same effective batch, less activation memory", ax=right)
plt.show()

# %% [markdown]
# ## 4 · CPU offloading of optimizer states
#
# AdamW's two moments are as large as the trainable weights (twice, in fp32). `memory.offload`
# uses torchao's `CPUOffloadOptimizer`: moments, a host copy of the parameters and the AdamW step live
# in pinned host memory; each gradient is copied to the host during backward on a side stream, updated weights
# come back after the step. It matters most where the optimizer state is large: full fine-tuning.
# (Gradient clipping must then happen on the host copy, so these runs train without it.)

# %%
offload_full_cfg = bench.Config("full fine-tune + offload", full_fine_tune_model,
                                lambda m: offload.offloaded_adamw(m.parameters(), hw.device, lr=1e-5),
                                P["micro_batch"], max_grad_norm=None)
offload_full_row = measured(offload_full_cfg)
if bench.fits(full_row, offload_full_row):
    print("optimizer state on the accelerator:", f"{offload_full_row['memory'].optimizer / GiB:.3f} GiB",
          "| full fine-tune without offload:", f"{full_row['memory'].optimizer / GiB:.3f} GiB")

# %%
probe = models.load_model(QUALITY_MODEL)
opt = offload.offloaded_adamw(probe.parameters(), hw.device, lr=1e-4)
train.train(probe, opt, batches.padded_batches(ft_docs, 4, tokenizer.pad_token_id), steps=1,
            max_grad_norm=None, progress=False)
state_bytes = offload.optimizer_state_bytes(opt)
report("optimizer state", **{f"{device} MiB": n / 2**20 for device, n in state_bytes.items()})
assert state_bytes.get("cpu", 0) > 0.99 * sum(state_bytes.values()), "the state should be on the host"
offload.release(opt)  # torchao's hooks would otherwise keep `probe` allocated
del probe, opt
if hw.cuda and bench.fits(full_row, offload_full_row):
    assert offload_full_row["memory"].optimizer < 0.01 * full_row["memory"].optimizer, \
        "all but the smallest parameters' optimizer state should leave the GPU"
    assert offload_full_row["memory"].peak < full_row["memory"].peak
else:
    print("no accelerator: the state already lives in host memory, so there is nothing to save here")

# %%
plots.memory_bars([full_row, offload_full_row], "offloading moves AdamW's state off the accelerator")
plt.show()

# %% [markdown]
# ## The ladder
#
# All four recipes stacked, at the same effective batch (`micro_batch` sequences of `seq_len` tokens
# per optimizer step). A rung that does not fit shows as OOM. Tokens/s is the median step; the range
# beside it is the fastest and the slowest timed step.
#
# Read the last rung with section 4 in mind: on top of QLoRA the AdamW state is the adapters' only
# (tens of MiB), so offloading has almost nothing to move and still pays for its copies. The printed
# peak change says what it costs here; offloading pays off where the optimizer state is large, as
# with full fine-tuning above.

# %%
offload_cfg = bench.Config("+ offload", accum_cfg.model_fn,
                           lambda m: offload.offloaded_adamw(m.parameters(), hw.device, lr=1e-5),
                           small, accum_steps=P["accum_steps"], max_grad_norm=None)
ladder_rows = [full_row, qlora_row, ckpt_row, accum_row, measured(offload_cfg)]
rung_names = ["full fine-tune", "+ QLoRA", "+ checkpointing", "+ accumulation", "+ offload"]
for row, name in zip(ladder_rows, rung_names):
    row["name"] = name
display(bench.table(ladder_rows, reference="full fine-tune", matmul_peak=matmul_peak))
last_ratio = None
if bench.fits(full_row, ladder_rows[-1]):
    last_ratio = ladder_rows[-1]["memory"].peak / full_row["memory"].peak
if bench.fits(accum_row, ladder_rows[-1]):
    report("offload on top of QLoRA", **{
        "peak change GiB": (ladder_rows[-1]["memory"].peak - accum_row["memory"].peak) / GiB,
        "tokens/s change %": 100 * (ladder_rows[-1]["tokens_per_s"] / accum_row["tokens_per_s"] - 1)})

# %% [markdown]
# ### Predicted before running: `recipes estimate`
# `measure.estimate` predicts a run's peak from the model's shape alone: what each layer keeps for
# backward, the loss (full logits or one chunk of them), the model state and the step's temporaries
# (`recipes estimate --help` prints every formula). Beside the measured rungs: the prediction, and for a
# rung that ran out of memory, the advisor's cheapest changes that make it fit this GPU. The check below
# holds every rung to 10%: on a CPU an assert; on a GPU a target, so a miss is reported and the run goes
# on. The estimate models what compiled layers keep, with and without LoRA adapters (on torchao's base a
# compiled layer also keeps its weights dequantized to bf16 for backward: 1.8 GiB at this shape), but a
# compiled adapter layer recomputed under checkpointing runs its recompute and backward as one Inductor
# graph, which it does not model: it counts eager autograd's tensors there. Before the adapters were
# modelled, the H100 run of 2026-12-08 found the QLoRA rung without checkpointing 11.5% high and the
# checkpointing rung 9.5% low; on the same rows the estimate now predicts the first 0.4% low
# (`tests/test_estimate.py`). A 2-step H100 smoke test of these rungs
# (`results/history/01_default_path_smoke.H100.log`) found a leak: torchao's offloading optimizer kept
# section 4's full model, 2.3 GiB, allocated for the rest of the process, read by every later row;
# `offload.release`, which the bench harness now calls, frees it.

# %%
full_plan = estimate.Plan(MODEL_NAME, "full", "bf16", micro_batch=P["micro_batch"], seq_len=SEQ_LEN,
                          lora_r=P["lora_r"])  # packed rows, chunked loss, fused AdamW: the defaults
qlora_path = dict(method="qlora", compiled=QLORA_COMPILED, nf4_base=QLORA_BASE)  # as default_path builds it
ckpt_qlora = dict(qlora_path, checkpoint_every=1)
rung_changes = [dict(chunked_loss=False, compiled=FULL_COMPILED),
                qlora_path,
                ckpt_qlora,
                dict(ckpt_qlora, micro_batch=small, accum_steps=P["accum_steps"]),
                dict(ckpt_qlora, micro_batch=small, accum_steps=P["accum_steps"], optimizer="offload")]
rung_plans = [estimate.for_hardware(estimate.with_changes(full_plan, **c), hw) for c in rung_changes]
predicted_peaks = estimate_check.side_by_side(ladder_rows, rung_plans, config)
display(predicted_peaks)
print(*estimate_check.oom_advice(ladder_rows, rung_plans, hw, config=config), sep="\n")

# %%
worst = predicted_peaks["error %"].abs().max()  # on a GPU a miss is a target (see the text above)
assert targets.check("the estimate within 10% of every rung", f"{worst:.1f}% at worst",
                     worst <= 10) or hw.cuda
assert bench.fits(*ladder_rows[1:]), "every rung with QLoRA should fit"
if last_ratio is not None:
    assert last_ratio < 0.5, "the full recipe should at least halve peak memory"
    if hw.cuda:
        targets.check("last rung <= 25% of full fine-tuning's peak", f"{last_ratio:.1%}", last_ratio <= 0.25)

# %%
plots.ladder(ladder_rows, f"{MODEL_NAME} at {SEQ_LEN} tokens x {P['micro_batch']} sequences per step")
plt.show()

# %% [markdown]
# ## Speed 1 · Our full fine-tuning step against plain transformers
#
# Every "vs full fine-tuning" figure above is only as fair as our full fine-tuning step. The reference
# is the plain transformers step with `Trainer`'s defaults (`train.plain_step`): bf16 weights, SDPA
# attention, the model's own loss (full logits upcast to fp32), fused AdamW, clipping at 1.0. Ours
# runs through our loop (token-normalised loss, one `.item()` per step) with the same model, loss and
# optimizer; then with our chunked fused loss instead of the full logits. All three train on the same
# unpadded rows of `seq_len` random tokens, 4 per step. The ratio's range runs from our slowest step
# over the plain loop's fastest to the other way round: where it takes in 1.0, there is no measurable
# difference. Then two levers toward issue 18's 1.25x: our step with each decoder layer compiled
# (`speed.compile_layers`), and, where they are installed (a GPU), the maintained peers: the plain
# step with Liger Kernel's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy kernels (`speed.apply_liger`),
# and our step with Apple's Cut Cross-Entropy as its loss (`losses.cce_linear_cross_entropy`), eager and with
# compiled layers: like Liger's loss, it never holds the `[tokens, vocab]` logits.
# Each row also profiles two steps: "device busy" is the share of the step the GPU computes; the rest is
# launch overhead and Python, where a host-bound step loses its time (and its steadiness).
# On a CPU the claims that our steps are not slower (here and in Speed 2) are asserts; on a GPU they are
# targets, reported where measured: another process may share the GPU and slow one row but not the next
# (issue 17's simulated T4 and L4 ran side by side on one H100); on an H100 a missed target still fails the
# run, at the end. On a T4, whose full fine-tuning holds fp32 weights, no full step fits: its rows say OOM
# and the comparisons are skipped.

# %%
def token_blocks(micro_batch):  # plain pre-training rows: no padding, no document boundaries
    gen = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(config.vocab_size, (micro_batch, SEQ_LEN), generator=gen)
        yield {"input_ids": ids, "labels": ids}


full_model = functools.partial(full_fine_tune_model, compiled=False)  # plain transformers' step: eager
full_setups = {"plain transformers (Trainer defaults)": (full_model, dict(step_fn=train.plain_step)),
               "ours, the model's loss": (full_model, dict(fused_head=False)),
               "ours, chunked fused loss": (full_model, dict(fused_head=True)),
               "ours, the model's loss, compiled layers": (lambda: speed.compile_layers(full_model()),
                                                           dict(fused_head=False, may_fail=True))}
full_setups |= qlora_candidates.full_step_peers(full_model, hw)  # Liger, Cut Cross-Entropy: where installed
step_rows = [measured(bench.Config(name, fn, adamw, 4, **how), token_blocks, profile=2)
             for name, (fn, how) in full_setups.items()]
speed.remove_liger()  # Liger swaps Llama's RoPE, norm and MLP module-wide: later rows get the originals
display(bench.table(step_rows, reference=step_rows[0]["name"], matmul_peak=matmul_peak))
step_ratios = {row["name"]: bench.speed_ratio(row, step_rows[0])
               for row in step_rows[1:] if bench.fits(row, step_rows[0])}
report("vs plain transformers", **{name: bench.describe_ratio(*r) for name, r in step_ratios.items()})

# %%
ours_vs_plain = step_ratios.get("ours, the model's loss")
if ours_vs_plain is not None:  # timings: asserted on a CPU, a target on a GPU (it may be shared)
    assert hw.cuda or ours_vs_plain[0] > 0.8, "our loop should cost little over the plain transformers step"
    if hw.cuda:
        targets.check("our full fine-tuning step as fast as plain transformers' (not measurably slower)",
                      bench.describe_ratio(*ours_vs_plain), ours_vs_plain[2] >= 1.0)
fastest, fastest_ratio = bench.report_fastest("our fastest full step", step_rows, "ours", step_rows[0])
assert fastest_ratio or not bench.fits(step_rows[0]), "our full step should fit where the plain one does"
if hw.cuda:  # issue 18's target: missed, not skipped, where no full step fits
    shown = (f"{bench.describe_ratio(*fastest_ratio)}, MFU {fastest['mfu'] or 0:.1%}" if fastest_ratio
             else "no comparison: a full step did not fit")
    targets.check(">= 1.25x plain transformers' full fine-tuning step, at >= 40% MFU (datasheet)", shown,
                  fastest_ratio is not None and fastest_ratio[0] >= 1.25 and (fastest["mfu"] or 0) >= 0.40)

# %% [markdown]
# **Reading it** (the committed H100 run; each ratio with the range of its timed steps).
# - **Our loop costs nothing**: with the same model, loss and optimizer our step and the plain transformers
#   step are not measurably different (1.01x, range 0.99-1.02).
# - **Our chunked fused loss costs speed**: 0.88x (0.87-0.89) at 4 x 2048 tokens, for 9.7 GiB less peak
#   (22.4 against 32.1 GiB). So the ladder's full fine-tuning rung uses the model's own loss (the fast
#   reference every "vs full fine-tuning" ratio divides by), and the chunked loss is for where memory binds
#   (notebook 04 puts it beside the maintained fused kernels, which are faster than ours).
# - **Compiling each decoder layer meets issue 18's target**: 1.30x (1.22-1.32) the plain step, at 46% MFU
#   of the datasheet peak, and 4 GiB less peak memory (the compiler fuses elementwise work and keeps fewer
#   intermediates). The device is busy about 95% of every full step, so what compile buys is fewer,
#   fused kernels, not less host overhead.
# - **The maintained peers are level with it**: Liger Kernel's kernels on the plain step run 1.28x
#   (1.22-1.30) the plain step, and Cut Cross-Entropy as our compiled step's loss 1.30x (1.28-1.31); ours
#   against them is 1.01x (0.95-1.07) and 1.00x (0.94-1.02): no measurable difference in speed. Their peaks
#   are 11 GiB lower (16.9 and 17.1 against 28.1 GiB): their fused losses never hold the `[tokens, vocab]`
#   logits, while our compiled step keeps the model's own loss. Our fastest full step does not beat the
#   maintained peers; it ties them, at a higher peak. Why not faster: in all three the pointwise work is
#   fused (by Inductor in ours, by Liger's kernels in its row), the device is busy 95% of the step, and a
#   fused loss saves memory here, not time: Cut Cross-Entropy's loss on our compiled step is level with the
#   model's own loss on it (58,571 against 58,499 tokens/s).

# %% [markdown]
# ## Speed 2 · Our QLoRA against the strongest documented set-up, one change at a time
#
# The plain transformers + peft + bitsandbytes recipe from their docs: `prepare_model_for_kbit_training`
# (non-quantized weights upcast to fp32, gradient checkpointing with its default, reentrant), LoRA on
# all linear layers with dropout 0.05, the model's own loss (full `[tokens, vocab]` logits, upcast to
# fp32). Batches padded to their longest document are the documented collator; **packing** (TRL's
# `packing=True`, here our packed rows with per-document `position_ids`, applied to their model) is the
# strongest documented option, and it is **the baseline**. Then our set-up's changes one at a time, same
# micro-batch: weights kept in bf16 (no fp32 upcast, so a bf16 LM head), no adapter dropout,
# non-reentrant checkpointing, and last our fused chunked LM-head loss (which gives our QLoRA model of
# section 2). Where Liger Kernel is installed (on a GPU), a last row swaps our loss for its fused
# linear cross-entropy. Throughput counts real tokens only; MFU counts `4N` per token for the frozen base plus
# causal attention, recomputation excluded. "Device busy" (two profiled steps per row) tells a GPU-bound
# step from a host-bound one, whose time follows the host's Python and launch overhead and swings with it.

# %%
def padded(micro_batch):
    return batches.padded_batches(docs, micro_batch, 0, seed=0)


def docs_model(**changes):
    return lambda: qlora.docs_qlora_model(MODEL_NAME, r=P["lora_r"], **changes)


speed_batch = P["micro_batch"] // 2
sample = list(itertools.islice(padded(speed_batch), 50))
real_tokens = sum(int(b["attention_mask"].sum()) for b in sample)
padded_tokens = sum(b["attention_mask"].numel() for b in sample)
report("dynamic padding", **{"real tokens %": 100 * real_tokens / padded_tokens})
ablation = {  # name: (model set-up, fused chunked loss); each row adds one change to the row above
    "docs QLoRA + packing (baseline)": (dict(), False),
    "+ bf16 weights (no fp32 upcast)": (dict(upcast_fp32=False), False),
    "+ no adapter dropout": (dict(upcast_fp32=False, dropout=0.0), False),
    "+ non-reentrant checkpointing": (dict(upcast_fp32=False, dropout=0.0, use_reentrant=False), False),
    "+ fused chunked loss (ours)": (dict(upcast_fp32=False, dropout=0.0, use_reentrant=False), True)}
padded_cfg = bench.Config("docs QLoRA, padded", docs_model(), adamw, speed_batch, fused_head=False)
speed_rows = [measured(padded_cfg, padded, profile=2)]
speed_rows += [measured(bench.Config(name, docs_model(**changes), adamw, speed_batch, fused_head=fused),
                        profile=2) for name, (changes, fused) in ablation.items()]


def liger_loss(model, micro_batch):  # Liger Kernel's fused linear cross-entropy in place of our chunked loss
    return train.loss_sum(model, micro_batch, head_loss=losses.liger_linear_cross_entropy)


if liger_ok:  # the maintained fused kernel, where installed
    speed_rows.append(measured(bench.Config("ours with Liger's fused loss instead", docs_model(
        **ablation["+ fused chunked loss (ours)"][0]), adamw, speed_batch, loss_fn=liger_loss)))
display(bench.table(speed_rows, matmul_peak=matmul_peak))

# %%
baseline_row = speed_rows[1]
ours_row = next(r for r in speed_rows if r["name"] == "+ fused chunked loss (ours)")
steps_table = [{"row": r["name"], "vs the row above": bench.describe_ratio(*bench.speed_ratio(r, above)),
                "vs baseline": bench.describe_ratio(*bench.speed_ratio(r, baseline_row))}
               for above, r in zip(speed_rows, speed_rows[1:]) if bench.fits(above, r, baseline_row)]
display(pd.DataFrame(steps_table).set_index("row"))
speedup, speedup_low, speedup_high = bench.speed_ratio(ours_row, baseline_row)
report("our QLoRA vs the documented set-up with packing", **{"speed-up": bench.describe_ratio(
    speedup, speedup_low, speedup_high), "ours tokens/s range": bench.spread(ours_row),
    "baseline tokens/s range": bench.spread(baseline_row)})

# %%
assert hw.cuda or speedup_high > 1.0, "our QLoRA should not be measurably slower than the documented set-up"
if hw.cuda:  # timings on a GPU are targets: it may be shared (Speed 1)
    shown = bench.describe_ratio(speedup, speedup_low, speedup_high)
    targets.check("our QLoRA not measurably slower than the documented set-up", shown, speedup_high > 1.0)
    targets.check(">= 1.3x the documented QLoRA with packing", shown, speedup >= 1.3)

# %%
plots.value_bars([r["name"] for r in speed_rows], [r["tokens_per_s"] for r in speed_rows], "real tokens/s",
                 f"our QLoRA: {speedup:.2f}x the documented set-up with packing")
plt.show()

# %% [markdown]
# **Reading the ablation** (the committed H100 run; each ratio with the range of its timed steps).
# - **Packing is the first win, and it is the documented set-up's own**: 2.2x over dynamic padding,
#   whose per-shape costs make its steps spread widely in a short run (1,634-8,997 tokens/s). It is
#   therefore the baseline.
# - **The eager QLoRA step is host-bound, so its rows swing with the host**: "device busy" is 69-93% across
#   these rows (the full steps of Speed 1: about 95%). bitsandbytes' 4-bit layers launch many small kernels,
#   and a step whose GPU waits on Python and launches takes the host's speed of the moment. In this run
#   bf16 weights gave 1.39x, no adapter dropout 1.07x more, non-reentrant checkpointing nothing measurable
#   and our fused loss 0.96x; in the H100 run before it the last three rows measured 1.48x, 1.26x and 1.13x
#   the baseline at 91%, 54% and 71% busy: not monotone, although neither change adds that much device work.
# - **Our set-up's changes, measured on this host**: our QLoRA step is 1.44x (1.42-1.45) the documented one
#   with packing: the 1.3x target is met in this run, but across the committed runs since the fair
#   baselines the eager figure has ranged from 0.98x (on the H200) to 1.44x, because the step is
#   host-bound; Speed 3 removes that.
# - **Our fused chunked loss saves memory**: a peak of 2.8 instead of 13.5 GiB, for 0.96x (0.95-0.99) of
#   the row above. Liger Kernel's fused loss in its place is level with it (1.04x, 0.90-1.06).

# %% [markdown]
# ## Speed 3 · Toward 2x the documented set-up: candidates for the QLoRA step
#
# Issue 18 asks for 2.0x the documented step with packing. Each candidate (`memory.candidates`) changes one
# thing in our set-up (`qlora.qlora_model` with checkpointing: bf16 weights, no dropout, non-reentrant
# recomputation; the model's own loss, the faster one above), and each is divided by the same documented
# baseline:
# - **compiled layers** (`speed.compile_layers`): every decoder layer through `torch.compile`,
#   bitsandbytes' 4-bit base and peft's adapters included;
# - **the NF4 base in plain PyTorch** (`memory.nf4`): the same 4-bit NormalFloat code, dequantized by
#   tensor operations the compiler can fuse into the layer, eager and compiled;
# - **dequantize once per step** (`nf4.cache_per_step`, eager layers): each 4-bit weight is expanded to
#   bf16 once per optimizer step, not in the forward, the recomputation and the backward; it costs a bf16
#   copy of the base while the step runs, which the peak column shows (as activations);
# - on a GPU, the compiled PyTorch NF4 layers replayed as **CUDA graphs** (`mode="reduce-overhead"`),
#   which launch a layer's kernels at once: the lever for a step the profile finds host-bound;
# - on a GPU, **FlexAttention** in place of SDPA: with packed rows SDPA gets a dense block-diagonal mask,
#   which rules out its flash kernel; FlexAttention's block mask skips the tiles between documents;
# - **torchao's `NF4Tensor`** as the base, compiled (torchtune's way), where torchao is installed; and on it
#   the **fused LoRA MLP** (`memory.lora_mlp`, Unsloth's approach in PyTorch): each SwiGLU MLP with its
#   three adapters as one autograd function whose backward is written out, keeping fewer tensors and
#   dequantizing the base where it is used, its pointwise work fused by the compiler;
# - **Liger Kernel's RMSNorm, SwiGLU and RoPE kernels** in our model, where installed (a GPU).
#
# A candidate the installed stack cannot run (a compiler or kernel error, or a layer that would exceed
# the compiler's recompile budget and silently run eager) shows as a "failed" row with the error, as
# running out of memory shows as OOM. The fused LoRA MLP is ours in PyTorch, not Unsloth's Triton kernels.
# The fastest of the rows, the top of several noisy medians, is measured once
# more, right after the baseline is measured once more, and the ratio of those two back-to-back runs is the
# figure compared with the target (the machine drifts between the sections: one H100 run measured the same
# configuration 9% apart). It then trains the embedded task
# for 50 steps beside the documented set-up: the two loss curves must agree within their step noise.

# %%
candidates = qlora_candidates.qlora_candidates(P["lora_r"], hw, adamw)  # name: (model_fn(name), optimizer)
print("not run here:", qlora_candidates.unavailable(hw) or "none")
candidate_rows = [measured(bench.Config(name, functools.partial(fn, MODEL_NAME), opt, speed_batch,
                                        fused_head=False, may_fail=name != "ours"), profile=2, warmup=3)
                  for name, (fn, opt) in candidates.items()]  # 3 warm-up steps: compiling, graph recording
speed.remove_liger()
display(bench.table([baseline_row] + candidate_rows, reference=baseline_row["name"], matmul_peak=matmul_peak))
fastest_name = max(candidate_rows, key=bench.rate)["name"]  # the top of ~9 noisy medians: measure it again
fastest_fn, fastest_optimizer = candidates[fastest_name]
# the baseline measured again, back to back with the fastest
again = measured(bench.Config("baseline (again)", docs_model(), adamw, speed_batch, fused_head=False))
best = measured(bench.Config(f"{fastest_name} (again)", functools.partial(fastest_fn, MODEL_NAME),
                             fastest_optimizer, speed_batch, fused_head=False), warmup=3)
best_ratio = bench.speed_ratio(best, again)
state_share = best["memory"].states / full_row["memory"].states if bench.fits(full_row, best) else None
report(f"fastest QLoRA step: {best['name']}", **{
    "vs the documented set-up": bench.describe_ratio(*best_ratio),
    "weights + grads + optimizer vs full fine-tuning (%)": 100 * (state_share or float("nan"))})

# %%
if state_share is not None:  # here and below: on a GPU a miss is a reported target, not a lost run
    assert targets.check("QLoRA weights + gradients + optimizer <= 15% of full fine-tuning's",
                         f"{state_share:.1%}", state_share <= 0.15) or hw.cuda
if hw.cuda:  # issue 18's target
    targets.check(">= 2.0x the documented QLoRA step with packing", f"{best['name']}: "
                  f"{bench.describe_ratio(*best_ratio)}", best_ratio[0] >= 2.0)


def loss_curve(model_fn, optimizer_fn):  # 50 steps of the embedded task: same seed (LoRA init), batches
    torch.manual_seed(0)
    model = model_fn()
    ft = batches.padded_batches(ft_docs, P["finetune_batch"], tokenizer.pad_token_id, seed=1)
    return train.train(model, optimizer_fn(model, lr=1e-2), ft, 50, autocast_dtype=hw.amp_dtype).losses


curves = {"documented set-up": loss_curve(lambda: qlora.docs_qlora_model(QUALITY_MODEL, r=P["lora_r"]),
                                          adamw),
          fastest_name: loss_curve(functools.partial(fastest_fn, QUALITY_MODEL), fastest_optimizer)}
ends = quality.curve_ends(curves, last=10)  # each curve's mean over its last 10 steps; their noise
report("loss after 50 steps", **ends)
plots.curves({n: (range(1, len(c) + 1), c) for n, c in curves.items()}, "optimizer step", "loss (nats/token)",
             f"{FINETUNE_TASK} on the embedded model: the fastest candidate and the documented set-up")
plt.show()
assert targets.check("fastest candidate's loss after 50 steps within 2x the step noise of the documented",
                     f"{ends['gap']:.3f} apart, noise {ends['noise']:.3f}",
                     ends["gap"] <= 2 * ends["noise"]) or hw.cuda

# %% [markdown]
# **Reading the candidates** (the committed H100 run; the baseline, documented QLoRA with packing: 15,772
# tokens/s).
# - **Compiling is what pays**, on every base: bitsandbytes' layers compiled 32,397 tokens/s (2.05x the
#   baseline), our PyTorch NF4 base compiled 32,371 (2.05x), torchao's `NF4Tensor` compiled
#   **34,662 (2.20x)**, with the GPU busy 92% of its step (our eager step: 75%).
# - **Not compiled, bitsandbytes' base is the faster**: our PyTorch NF4 base eager ran 17,019 tokens/s
#   against bitsandbytes' 23,902.
# - **Dequantizing once per step** pays over our eager NF4 base (19,821 tokens/s, 1.16x) for 1.8 GiB more
#   peak (15.3 against 13.5 GiB), and cannot combine with compiled layers: those are faster without it.
# - **Our fused LoRA MLP did not pay**: on torchao's compiled step it ran 33,500 tokens/s against 34,662
#   without it (0.97x, range 0.87-1.00: slightly slower). Inductor already fuses the MLP's pointwise work;
#   why the written-out backward gains nothing here was not profiled further.
# - **FlexAttention with a document mask** was level with SDPA's (24,871 tokens/s): at 2048 tokens the
#   tiles it skips are few. **Liger's kernels** on the eager step did not pay (19,532): the step waits on the
#   host (42% busy), not on the norms and activations they fuse. **CUDA graphs failed**: with activation
#   checkpointing a layer's recomputation runs while an earlier replay's outputs are still awaited by the
#   backward, and `torch.compile` refuses to overwrite them.
# - **The target is met**: measured again, back to back with a second run of the baseline, torchao's
#   compiled step ran 34,923 tokens/s against 15,688: 2.23x (2.18-2.27). (In the H100 run before this one
#   the same configuration measured 1.998x against a baseline run minutes earlier, which is why the ratio now
#   divides two runs measured back to back.)
# - **It keeps QLoRA's memory and learns the same**: weights + gradients + optimizer are 12.2% of full
#   fine-tuning's, and after 50 steps of the embedded task its loss (3.03) is 0.056 from the documented
#   set-up's (3.08), inside their step-to-step noise (0.069).
#
# So torchao's NF4 base with compiled decoder layers is the fastest QLoRA step we measured, and the one to use
# on a GPU: it is the library's default there (`qlora.default_path`), which this notebook's ladder and
# `recipes train` use.

# %% [markdown]
# ## Bad input gives one clear message
# A missing model, a length over the model's limit, and a kernel this machine lacks (with its fallback):

# %%
for attempt in (lambda: models.load_model("./models/does-not-exist"),
                lambda: models.check_seq_len(config, config.max_position_embeddings + 1)):
    try:
        attempt()
    except errors.RecipeError as error:
        print("RecipeError:", error)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    chosen = models.attention_implementation("flash_attention_2")
print(f"flash_attention_2 requested -> {chosen!r}", *(str(w.message) for w in caught))

# %% [markdown]
# ## Save the figures

# %%
def rung(row):
    return None if row["oom"] else row["memory"].peak


board = [results.scoreboard_row("01", name, "full fine-tune", rung(row), rung(full_row),
                                row.get("tokens_per_s"), full_row.get("tokens_per_s"))
         for name, row in [("QLoRA", qlora_row), ("+ checkpointing", ckpt_row), ("+ accumulation", accum_row),
                           ("+ offload (full recipe)", ladder_rows[-1])]]
for name, row, reference in [("our QLoRA (speed)", ours_row, baseline_row),
                             ("our full fine-tuning step", step_rows[1], step_rows[0]),
                             (f"fastest QLoRA candidate: {best['name']}", best, again),
                             (f"fastest full step: {fastest['name']}", fastest, step_rows[0])]:
    board.append(results.scoreboard_row("01", name, reference["name"], rung(row), rung(reference),
                                        row.get("tokens_per_s"), reference.get("tokens_per_s")))
figures = {"ladder": [bench.to_json(r) for r in ladder_rows], "speed": [bench.to_json(r) for r in speed_rows],
           "speed_ablation": {name: {"docs_qlora_model": changes, "fused_chunked_loss": fused}
                              for name, (changes, fused) in ablation.items()},
           "full_step": [bench.to_json(r) for r in step_rows], "matmul_peak_flops": matmul_peak,
           "full_step_vs_plain": step_ratios, "qlora_speedup_range": [speedup_low, speedup_high],
           "offload_full": bench.to_json(offload_full_row),
           "qlora_state_ratio": state_ratio, "activation_cut": activation_cut,
           "predicted_activation_cut": predicted_cut, "checkpointing_slowdown": slowdown,
           "last_rung_peak_ratio": last_ratio, "qlora_speedup": speedup,
           "accumulation_rel_error": accum_error, "checkpointing_grad_rel_error": ckpt_error,
           "quality_exact_match": exact_match, "targets": targets.rows,
           "qlora_candidates": [bench.to_json(r) for r in candidate_rows], "qlora_best": bench.to_json(best),
           "qlora_baseline_again": bench.to_json(again),
           "qlora_best_ratio": best_ratio,
           "qlora_best_state_share": state_share, "loss_curves_50_steps": curves, "full_step_fastest_ratio":
           fastest_ratio}
env = results.environment(hw, **P)
# results/ holds the reference runs only
publish = hw.cuda and P["profile"] == "gpu" and MODEL_NAME == PROFILES["gpu"]["model"]
for path in results.save("01_large_models_limited_hardware", hw, env, figures, board, publish=publish):
    print("wrote", path.relative_to(models.REPO_ROOT) if path.is_relative_to(models.REPO_ROOT) else path)

# %% [markdown]
# ## The GPU targets
# Each target was printed where it was measured; on the GPU they were set for (an H100), a miss fails here.

# %%
targets.assert_all()

# %% [markdown]
# ## Use it in your own code
#
# ```python
# from recipes_lib.core import batches, hardware, train
# from recipes_lib.memory import offload, qlora
#
# hw = hardware.detect()
# model = qlora.qlora_model("meta-llama/Llama-3.2-1B", r=16, gradient_checkpointing=True)  # + checkpointing
# print(qlora.default_path(hw)[2])  # its base and compilation: torchao's NF4, compiled, on a bf16 GPU
# optimizer = offload.offloaded_adamw(model.parameters(), hw.device, lr=2e-4)              # offloaded AdamW
# micro_batches = batches.packed_batches(my_documents, seq_len=2048, batch_size=2)         # packed rows
# train.train(model, optimizer, micro_batches, steps=1000, accum_steps=8,                  # token-normalised
#             autocast_dtype=hw.amp_dtype, max_grad_norm=None)
# ```
