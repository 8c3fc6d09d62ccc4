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
# # 02 · Scaling training to several GPUs
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-acceleration-recipes/recipes/blob/main/notebooks/02_multi_gpu_training.ipynb)
#
# After this notebook you will be able to train one model on several GPUs with PyTorch's own
# **FSDP2** (`fully_shard`, per-parameter sharding) in **bf16 mixed precision**, over a **4-bit
# quantized base** when memory is short (FSDP-QLoRA), fed by an **input pipeline that keeps the GPUs
# busy**; and to say, with measurements, what each choice costs against the baselines you will meet:
# DDP, DeepSpeed ZeRO-2/3 (through Accelerate) and naive model parallelism.
#
# What each engine keeps on every GPU, and what it communicates per step:
# - **DDP**: the whole model, its gradients (once: each `.grad` is a view into the all-reduce bucket,
#   `gradient_as_bucket_view=True`) and optimizer state; an all-reduce of every gradient.
# - **FSDP2** (`fully_shard`, ZeRO-3-like): `1/N` of every parameter, gradient and optimizer state, a
#   layer's full weights only while it runs; all-gathers of weights (forward and backward),
#   reduce-scatters of gradients.
# - **FSDP2 without resharding** (ZeRO-2-like): as FSDP2, but gathered weights stay from forward to
#   backward; one all-gather fewer per layer.
# - **FSDP2 + CPU offload**: nothing but the layer that runs (shards, gradients and AdamW live in host
#   memory); as FSDP2, plus host <-> GPU copies, and AdamW steps on the CPU.
# - **FSDP-QLoRA**: `1/N` of a frozen NF4 base (0.5 byte per weight) and of the LoRA adapters; as
#   FSDP2, on 4x smaller weights.
# - **DeepSpeed ZeRO-2 / ZeRO-3**: bf16 weights (ZeRO-3: `1/N` of them, but the embedding, which is
#   also the tied LM head, and the norms kept whole, as FSDP2's root unit), `1/N` of fp32 master
#   weights, gradients and AdamW; reduce-scatters (ZeRO-3: and all-gathers).
# - **naive model parallelism**: half of the layers (on 2 GPUs) and their state; hidden states pass
#   between GPUs, and one GPU works at a time.
#
# Multi-process training runs as separate processes, one per GPU, started by `torchrun`. A notebook
# cannot be those processes, so it *launches* them: `parallel.launcher.launch` runs
# `torchrun scripts/train_distributed.py` as a subprocess, prints every worker's lines as they come,
# reads back the result each rank prints, and stops every process of a run that fails, hangs past
# its timeout, or is interrupted. The same script runs from a shell with `torchrun` or
# `accelerate launch`, across nodes too (README: the multi-node command and a SLURM script). On a
# CPU it runs 2 processes with the gloo backend, so CI checks the same code that runs on GPUs with
# NCCL; what needs GPUs (DeepSpeed, naive model parallelism, GPU memory peaks) shows the committed
# GPU run's figures instead.

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
PROFILE = "auto"  # "cpu": 2 gloo processes, embedded model; "gpu": one process per GPU, Llama-3.2-1B shape;
# "t4" / "l4": a 16 / 24 GB GPU. With fewer GPUs than NPROC (Colab), sections 1-3 run the "cpu" sizes on
# NPROC gloo processes on the CPU, as CI does, and show the committed 2-GPU figures beside them.
MODEL = None      # override the scale runs' model: a hub id, a local path, or random:<shape>
# one_launch: a section's runs share one launch of the training script (one start-up of python, torch and
# transformers) on CPU; on GPUs each run has its processes to itself, so its memory readings are its own.
# timeline_steps: steps profiled after each baseline run's measured ones (section 2b).
PROFILES = {
    "cpu": dict(check_model="data/tiny-llama", check_seq_len=64, check_global_batch=8, check_micro_batch=2,
                check_steps=3, model="data/tiny-llama", seq_len=64, micro_batch=2, accum=2, steps=3, warmup=1,
                speed_micro_batch=2, speed_loss="full", lora_r=16, timeout_s=300, one_launch=True,
                timeline_steps=1,
                # workers=0 on a CPU: worker processes would compete with the compute for the same cores
                data=dict(seq_len=128, batch=4, docs=1500, steps=5, warmup=1, workers=0)),
    "gpu": dict(check_model="data/tiny-llama", check_seq_len=256, check_global_batch=16, check_micro_batch=4,
                check_steps=3, model="random:llama-3.2-1b", seq_len=2048, micro_batch=2, accum=2, steps=7,
                warmup=2, speed_micro_batch=8, speed_loss="full", lora_r=16, timeout_s=300, one_launch=False,
                timeline_steps=2,
                data=dict(seq_len=1024, batch=8, docs=20000, steps=30, warmup=5, workers=4)),
}
# A 16 GB T4 or a 24 GB L4 has one GPU: its multi-process runs are the CPU profile's; the data-loading
# section runs on the GPU, at the full profile's size (the embedded model: seconds).
PROFILES["t4"] = PROFILES["l4"] = PROFILES["cpu"] | {"data": PROFILES["gpu"]["data"] | dict(workers=2)}
NPROC = 2  # processes (one per GPU on a GPU machine)

# %%
from recipes_lib import notebook

hw, P, targets = notebook.setup(PROFILES, MODEL, PROFILE, benchmark_gpu="H200")

# %%
import gc
import itertools
import json
import socket

import matplotlib.pyplot as plt
import pandas as pd
import psutil
import torch
from IPython.display import display
from transformers import AutoConfig, AutoModelForCausalLM

from recipes_lib import plots, results
from recipes_lib.core import dataload, errors, models
from recipes_lib.measure import bench, flops, memory, pipeline, predict, timing, workload
from recipes_lib.measure.memory import GiB
from recipes_lib.measure.report import report
from recipes_lib.parallel import context, fsdp2, launcher, run, runs, zero

GPUS = torch.cuda.device_count()
ON_GPUS = hw.cuda and GPUS >= NPROC  # one process per GPU; else NPROC gloo processes on the CPU
if hw.cuda and not ON_GPUS:
    P = P | {k: v for k, v in PROFILES["cpu"].items() if k != "data"}
    print(f"{GPUS} GPU here, {NPROC} processes wanted: sections 1-3 run {NPROC} gloo processes on the CPU at "
          "the CPU profile's sizes (as CI does), beside the committed 2-GPU figures; section 4 uses the GPU")
MODEL_NAME = P["model"]
ROOT = str(models.REPO_ROOT)  # the package's checkout, whatever the working directory (Colab: /content)
SCRIPT = os.path.join(ROOT, "scripts", "train_distributed.py")
# The workers import recipes_lib from this checkout, whatever the kernel's working directory; with too
# few GPUs they see none, so they join with gloo on the CPU.
WORKER_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
WORKER_ENV |= {} if ON_GPUS or not hw.cuda else {"CUDA_VISIBLE_DEVICES": ""}
LAUNCH = dict(timeout_s=P["timeout_s"], env=WORKER_ENV, backend="nccl" if ON_GPUS else "gloo")
CPU = torch.device("cpu")
DIST_DEVICE = hw.device if ON_GPUS else CPU  # where the one-process reference of section 1 trains
print(f"scale model: {MODEL_NAME} | {NPROC} processes, {'nccl' if ON_GPUS else 'gloo'} | {GPUS} GPU(s)")
data_params = models.count_parameters(models.load_model("data/tiny-llama", dtype=torch.float32))[1]
model_config = AutoConfig.from_pretrained(models.resolve(MODEL_NAME))
notebook.state_runtime(P, *workload.notebook02(P, model_config, data_params, ON_GPUS))  # class's rates
# The correctness runs' options: the same global batches whatever the strategy (fp32).
CHECK = {"model": P["check_model"], "steps": P["check_steps"], "global-batch": P["check_global_batch"],
         "micro-batch": P["check_micro_batch"], "seq-len": P["check_seq_len"]}
PARAMS = os.path.abspath("outputs/02_params_{}.pt")  # each correctness run's final weights


def check_runs(strategies, nproc):
    """Correctness runs in one launch: rank 0's result of each (every rank reports the same losses) and
    its final weights."""
    values = [CHECK | {"strategy": s, "save-params": PARAMS.format(s)} for s in strategies]
    rows = runs.launch_rows(SCRIPT, nproc, values, gpus=nproc, echo=True, **LAUNCH)
    return {s: (runs.succeeded(r), torch.load(PARAMS.format(s))) for s, r in zip(strategies, rows)}


def reference_run():
    """The one-process reference, trained in this notebook's process (what a worker runs): its result
    and final weights."""
    args = run.parse_args(runs.script_args(CHECK | {"strategy": "single"}))
    result, model = run.train_rank(args, context.Context(0, 1, 0, DIST_DEVICE))
    return result, fsdp2.full_state_dict(model)

# %% [markdown]
# ## 1 · Launching from a notebook, and the same model as one process
#
# Data parallelism should change *where* the work runs, not *what* is trained. Each step's global
# batch (padded rows of documents of random length, so the ranks hold different numbers of real
# tokens) is the same for 1 or `N` processes; each rank divides its summed loss by the target tokens
# of **all** ranks, and the gradients are **summed** over ranks (FSDP2's and DDP's default is a mean,
# which is only right when every rank holds the same number of tokens). So the step is the one
# process's step, up to the order of floating-point additions. Every strategy computes the loss inside
# the module its engine wraps (`train.LossModel`: the fused chunked LM head + cross-entropy): FSDP2's
# root unit gathers the embeddings and LM head for it like for any layer, and no engine is charged
# for a gather outside its forward.
#
# The runs on 2 processes, FSDP2, FSDP2 without resharding and DDP, share one launch: their options,
# separated by `--then`, run one after another in the same workers (`runs.launch_rows`), so python,
# torch and transformers start once for the three. The workers' lines print live, prefixed with their
# rank; the `RESULT` line each rank prints at the end comes back as a dict per run. Then the
# one-process reference, on the same batches, trains right here in the notebook's own process
# (`run.train_rank`, what each worker runs). Everything runs in fp32 (on a GPU too) for a tight check:
# losses and gradient norms within `rtol` of the one-process run, every final parameter within
# `atol`, after AdamW steps at lr 1e-3. On CPU with one thread per process (CI) the runs agree to a few
# fp32 ulps; with several threads (the CPU's matmuls then split their sums by thread count) or on GPUs
# (NCCL's reduction order) rounding of the same size enters every step, so the tolerance is wider there
# (on a 16-core machine's CPU the final parameters differed by 2.4e-5).

# %%
SINGLE_THREAD = not ON_GPUS and torch.get_num_threads() == 1  # CI: OMP_NUM_THREADS=1
LOSS_RTOL, PARAM_ATOL = (1e-5, 1e-5) if SINGLE_THREAD else (1e-4, 1e-4)
os.makedirs("outputs", exist_ok=True)
CHECKS = ["fsdp2", "fsdp2-no-reshard", "ddp"]  # on NPROC processes, one launch
checked = {}
seconds = timing.seconds(lambda: checked.update(check_runs(CHECKS, NPROC) | {"single": reference_run()}), CPU)
report("correctness runs", **{"runs": len(checked), "launches": 1, "seconds": seconds})
agreement = [runs.agreement(*checked[s], *checked["single"]) for s in checked]
display(pd.DataFrame(agreement).set_index("strategy"))

# %%
for row in agreement:
    assert row["max loss rel. diff"] <= LOSS_RTOL, f"{row['strategy']}: loss differs from one process"
    assert row["max grad-norm rel. diff"] <= LOSS_RTOL, f"{row['strategy']}: grad norm differs (mean vs sum?)"
    assert row["max parameter diff"] <= PARAM_ATOL, f"{row['strategy']}: final parameters differ"
by = {row["strategy"]: row for row in agreement}
HALVED = itertools.product(["fsdp2", "fsdp2-no-reshard"], ["param bytes / rank", "optimizer bytes / rank"])
for strategy, column in HALVED:  # each rank holds 1/N of every parameter and of Adam's state
    assert abs(by[strategy][column] * NPROC / by["single"][column] - 1) < 0.01, (strategy, column)
assert by["ddp"]["param bytes / rank"] == by["single"]["param bytes / rank"], "DDP replicates the whole model"

# %% [markdown]
# ## 2 · Memory per GPU, strategy by strategy: predicted and measured
#
# Between the last backward and the optimizer step a rank holds its weights, gradients and optimizer
# state; `predict.predicted_run_state` gives them per strategy from the parameter count and the
# config (bytes per parameter: fp32 master weights 4, gradients 4, AdamW's two moments 8; DDP's
# gradients are views into its all-reduce buckets, so it holds them once; DeepSpeed's bf16 mode
# keeps bf16 weights in the model and the fp32 master copy in its optimizer: 2 + 2 (ZeRO-3: 4) + 12;
# naive model parallelism puts the embeddings and LM head on the first GPU with its half of the
# layers, 61% of a Llama-3.2-1B). Each run below reads, on every GPU, the bytes allocated right
# after the last backward (that state, measured) and the peak of the steps after warm-up;
# `memory.memory_breakdown` splits the peak into weights, gradients, optimizer state and activations
# (with temporaries, FSDP2's gathered layers among them).
#
# All strategies train the same model on the same batches: bf16 compute (fp32 on CPU), `micro_batch`
# rows of `seq_len` tokens per forward, `accum` micro-batches per step on each GPU, eager PyTorch.
# Each run trains `steps` optimizer steps and leaves the first `warmup` out (on a GPU 7 and 2: five
# timed steps). Its tokens/s is the median timed step's, shown with its min-max over the timed steps
# (each rank records every step's time; rank 0's are shown); a ratio of two runs comes with its range
# too (`bench.describe_ratio`: slowest over fastest and fastest over slowest), and where that range
# takes in 1.0 it reads "no measurable difference". On GPUs each strategy runs in processes of its own,
# so its memory readings are its own; on a CPU they share one launch (`one_launch`), which saves a
# start-up of python, torch and transformers per strategy. Section 3's two speed runs are launched here
# too, with the runs of the same number of processes.
#
# The baselines run as their docs advise for a model this size (each run records the settings it ran
# with, saved with the figures):
# - **DDP** with `gradient_as_bucket_view=True` (`parallel.ddp.ddp_kwargs`): each gradient is a view
#   into its all-reduce bucket, so DDP holds the gradients once instead of twice (its default copies
#   `.grad` into the buckets). `static_graph=True` is set where it is valid, for steps of one
#   micro-batch: with gradient accumulation through `no_sync` (as here, `accum` > 1) PyTorch's static
#   graph fails its first backward and, past that, stops all-reducing (pytorch/pytorch#143580, #187732).
# - **DeepSpeed ZeRO-3** tuned for the model's shapes (`parallel.zero.zero3_tuning`):
#   `stage3_param_persistence_threshold` = the embedding's size and `stage3_model_persistence_threshold`
#   = that plus the norms, so the embedding (= the tied LM head, which the fused loss reads) and the
#   norms stay gathered like FSDP2's root unit while every decoder-layer matrix is partitioned;
#   `stage3_prefetch_bucket_size` = two decoder layers, `reduce_bucket_size` = one, `overlap_comm` and
#   `contiguous_gradients` on. ZeRO-2: DeepSpeed's 5e8-element buckets, `overlap_comm` on.

# %%
SCALE = {"model": MODEL_NAME, "seq-len": P["seq_len"], "bf16": ON_GPUS, "full-rows": True,
         "steps": P["steps"], "warmup": P["warmup"], "lora-r": P["lora_r"]}
SPEED = {"compile": ON_GPUS, "loss": P["speed_loss"], "micro-batch": P["speed_micro_batch"]}  # section 3
DATA_PARALLEL = ["ddp", "fsdp2", "fsdp2-no-reshard", "fsdp2-offload", "fsdp2-qlora", "deepspeed-zero2",
                 "deepspeed-zero3"]  # on NPROC processes; then naive-mp, one process over the GPUs
TIMELINE = ["ddp", "fsdp2", "fsdp2-no-reshard", "deepspeed-zero2", "deepspeed-zero3"]  # profiled (2b)
TRACE = os.path.abspath("outputs/02_trace_{}.json")  # rank 0's Chrome trace of each profiled run


def show(label, r):
    """Print one run's throughput and peak, or why it could not run here (its worker's RecipeError line)."""
    shown = {"tokens/s per GPU": r.get("tokens_per_s_per_gpu"), "peak GiB": (r.get("peak_bytes") or 0) / GiB}
    shown |= {} if "error" in r else {"tokens/s per GPU, min-max": runs.per_gpu_spread(r)}
    print(f"{label}: not run here: {r['error'][:160]}") if "error" in r else report(label, **shown)
    return r


def scale_values(strategy, nproc, setup=None):
    """One run's options: section 2's (2b's baselines profile `timeline_steps` more steps), or `setup`'s."""
    micro = (setup or {}).get("micro-batch", P["micro_batch"])
    values = SCALE | {"strategy": strategy, "micro-batch": micro, "global-batch": micro * P["accum"] * nproc}
    profiled = {"timeline-steps": P["timeline_steps"], "trace": TRACE.format(strategy)}
    return values | (setup or (profiled if strategy in TIMELINE else {}))


def scale_runs(named, nproc):
    """`{label: options}` run on `nproc` processes, in one launch where `one_launch`; a run this machine
    cannot make is a row with the reason."""
    gpus = [GPUS * ON_GPUS if values["strategy"] == "naive-mp" else nproc for values in named.values()]
    rows = runs.launch_rows(SCRIPT, nproc, list(named.values()), gpus, together=P["one_launch"], **LAUNCH)
    return {n: show(n, r if "error" in r else runs.throughput(r, *RATES)) for n, r in zip(named, rows)}


# MFU against the datasheet's dense bf16 peak and the bf16 matmul rate measured here, side by side
measured_peak = timing.matmul_peak(hw.device, repeats=50) if ON_GPUS else None
PEAK = hw.peak_flops if ON_GPUS else None  # no MFU for runs on the CPU
RATES = (model_config, PEAK, measured_peak)


# CPU offload steps AdamW on the host, about 4 s per step at 1B parameters: slow, but timed as often.
# Section 3's speed runs (FSDP2 set up for speed, on 1 and on NPROC processes) share these launches.
SPEED_RUN = "fsdp2 speed set-up, {} proc"
on_nproc = scale_runs({s: scale_values(s, NPROC) for s in DATA_PARALLEL}
                      | {SPEED_RUN.format(NPROC): scale_values("fsdp2", NPROC, SPEED)}, NPROC)
on_one = scale_runs({"naive-mp": scale_values("naive-mp", 1),
                     SPEED_RUN.format(1): scale_values("fsdp2", 1, SPEED)}, 1)
speed = {n: group.pop(SPEED_RUN.format(n)) for n, group in ((1, on_one), (NPROC, on_nproc))}
scale = on_nproc | on_one
with torch.device("meta"):  # shapes only: the ZeRO-3 config the workers fit to this model
    shapes = AutoModelForCausalLM.from_config(model_config)
ZERO3 = zero.tune(zero.deepspeed_config(3, P["micro_batch"], P["accum"], NPROC, 1.0, ON_GPUS), shapes)
baselines = {"ddp": scale["ddp"].get("engine_config"),
             "deepspeed-zero3": scale["deepspeed-zero3"].get("engine_config") or ZERO3}
print(json.dumps(baselines, indent=1))

# %%
predicted = {strategy: predict.predicted_run_state(r, model_config, P["lora_r"])
             for strategy, r in scale.items() if "error" not in r}
UNIT, U = (GiB, "GiB") if ON_GPUS else (2**20, "MiB")  # the CPU profile's tiny model: MiB
rows = [runs.memory_row(strategy, r, predicted.get(strategy), UNIT, U) for strategy, r in scale.items()]
memory_table = pd.DataFrame(rows).set_index("strategy")
display(memory_table.round(2))

# %% [markdown]
# What the table says, and the cell below asserts wherever the runs could be made:
# - **FSDP2 shards everything**: its weights and AdamW state per rank are half of one process's, and
#   the measured state matches the prediction. DDP holds the whole model, its gradients (once, in its
#   buckets) and the whole AdamW state on every GPU.
# - **Not resharding** after forward keeps each layer's gathered bf16 weights until backward: more
#   memory, one all-gather fewer per layer.
# - **CPU offload** leaves almost nothing but activations on the GPU, and pays for it in time (the
#   AdamW step on the host, and copies).
# - **FSDP-QLoRA** holds 4-bit weights and tiny adapters: less than half of FSDP2's state.
# - **ZeRO-3** shards DeepSpeed's bf16 weights; **ZeRO-2** keeps them whole on every GPU.
# - **Naive model parallelism** splits the weights over the GPUs (the first also holds the embeddings
#   and LM head: 61% of a Llama-3.2-1B on 2 GPUs), but only one GPU works at a time, so its tokens/s
#   per GPU fall far below DDP's.

# %%
ok = {s: r for s, r in scale.items() if "error" not in r}
assert {"ddp", "fsdp2", "fsdp2-no-reshard", "fsdp2-qlora"} <= set(ok), "the torch strategies run everywhere"
for strategy in ("ddp", "fsdp2", "fsdp2-no-reshard", "fsdp2-qlora"):
    r, p = ok[strategy], predicted[strategy]
    assert abs(r["optimizer_bytes"] / p["optimizer"] - 1) < 0.02, f"{strategy}: AdamW state vs prediction"
    assert abs(r["param_bytes"] / p["parameters"] - 1) < 0.05, f"{strategy}: weights vs prediction"
assert ok["fsdp2-qlora"]["trainable_params"] < 0.1 * ok["fsdp2-qlora"]["n_params"]
state_bytes = {s: r["param_bytes"] + r["optimizer_bytes"] for s, r in ok.items()}
assert state_bytes["fsdp2-qlora"] < 0.5 * state_bytes["fsdp2"], "a 4-bit frozen base: less state than FSDP2's"
assert baselines["ddp"]["gradient_as_bucket_view"], "the DDP baseline holds its gradients once"
persist = baselines["deepspeed-zero3"]["zero_optimization"]["stage3_param_persistence_threshold"]
embedding = shapes.get_input_embeddings().weight.numel()
assert persist >= embedding, "ZeRO-3 keeps the embedding (= the tied LM head) gathered"
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
if ON_GPUS:
    needed = {"fsdp2-offload"} | ({"naive-mp"} if GPUS >= 2 else set()) | \
        ({"deepspeed-zero2", "deepspeed-zero3"} if DEEPSPEED else set())
    assert needed <= set(ok), f"failed on this GPU machine: {sorted(needed - set(ok))}"
    mem = {s: memory.memory_breakdown(r) for s, r in ok.items()}
    for strategy in mem.keys() - {"fsdp2-qlora"}:  # QLoRA's state is checked above, from its shards
        state = mem[strategy].parameters + mem[strategy].gradients + mem[strategy].optimizer
        assert abs(state - predicted[strategy]["on device"]) < 0.05 * predicted["ddp"]["on device"], strategy
    assert mem["fsdp2"].peak < mem["fsdp2-no-reshard"].peak < mem["ddp"].peak
    assert mem["fsdp2-offload"].peak < mem["fsdp2"].peak and mem["fsdp2-qlora"].peak < mem["fsdp2"].peak
    assert ok["fsdp2-offload"]["tokens_per_s"] < ok["fsdp2"]["tokens_per_s"], "offload costs time"
    if "deepspeed-zero3" in ok:
        assert ok["deepspeed-zero3"]["param_bytes"] < ok["deepspeed-zero2"]["param_bytes"]
    if "naive-mp" in ok:
        per_gpu = ok["naive-mp"]["device_param_bytes"]
        assert max(per_gpu) < 0.75 * ok["ddp"]["param_bytes"], "each GPU holds part of the layers"
        per_gpu_speed = ok["naive-mp"]["tokens_per_s_per_gpu"] / ok["ddp"]["tokens_per_s_per_gpu"]
        assert per_gpu_speed < 0.75, "GPUs take turns"
else:  # refused with the reason
    assert "needs at least 2" in scale["naive-mp"]["error"]
    assert "DeepSpeed is not installed" in scale["deepspeed-zero3"]["error"] or DEEPSPEED

# %%
COMMITTED = os.path.join(ROOT, "results", "02_multi_gpu_training.H200.json")


where = f"{NPROC} x {hw.name}" if ON_GPUS else f"{NPROC} gloo processes on this CPU"
panels = plots.strategy_panels(scale, f"measured here, {where}")
if not ON_GPUS and os.path.exists(COMMITTED):  # beside them, what the same runs measure on 2 GPUs
    committed = json.load(open(COMMITTED))
    panels += plots.strategy_panels(committed["figures"]["scale"], "the committed 2 x H200 run, before this "
                              f"notebook's tuned baselines ({committed['environment']['device']})")
elif not ON_GPUS:
    print("no committed results/02_multi_gpu_training.H200.json: the 2 x H200 figures so far are in the "
          "README ('GPU evidence for notebook 02') and results/history/")
fig = plots.side_by_side(panels, width=5.5, height=4.8)
plt.show()

# %% [markdown]
# ## 2b · Where a step's time goes: a comm/compute timeline
#
# Tokens/s says which strategy is faster, not why. After its measured steps, each baseline run above
# trains `timeline_steps` more under `torch.profiler` (`--timeline-steps`, after one step traced and
# thrown away, since tracing's first step costs most; they count in no other figure), and
# `measure.timeline` splits each of them into:
# - **compute ms**: the time the device runs anything but a collective (on a GPU: every kernel, copy
#   and memset outside NCCL; on CPU: the training thread's `aten::` operators);
# - **comm ms**: the time a collective runs (NCCL kernels; on CPU, gloo's worker threads), including
#   the wait for the slower rank to arrive;
# - **exposed comm ms**: the part of that communication which no compute overlaps: the device waits
#   for the network there. A collective issued early enough, on its own stream, hides behind the
#   compute and adds nothing here;
# - **idle ms**: neither (the host launching kernels, Python hooks, synchronisation).
#
# Step = compute + exposed comm + idle; rank 0's Chrome trace of every profiled run is in
# `outputs/02_trace_<strategy>.json` (open it in Perfetto or `chrome://tracing`). Reading it for the
# gap between ZeRO-3 and FSDP2 (section 3's ratio): both gather each layer's weights before its
# forward and backward and reduce-scatter its gradients, so their comm ms should be alike. A ZeRO-3
# step longer than FSDP2's by its **exposed comm** is all-gathers that were not prefetched (issued when
# the layer is already needed); by its **comm** is more traffic (a weight gathered more than once, or
# in smaller, slower messages: see the collectives' count and MiB); by its **idle** time is the host:
# DeepSpeed's per-parameter Python hooks, launching work the GPU waits for. On a CPU with gloo the
# figures are what two processes sharing the cores give: nothing overlaps much, and nothing about GPUs
# follows from them; ZeRO-3 needs CUDA and is profiled on the GPU run only.

# %%
PARTS = ("step_ms", "compute_ms", "comm_ms", "exposed_comm_ms", "idle_ms")
profiled = {s: scale[s]["timeline"] for s in TIMELINE if "error" not in scale[s]}
display(pd.DataFrame([runs.timeline_row(s, scale[s]) for s in TIMELINE]).set_index("strategy").round(1))
if {"fsdp2", "deepspeed-zero3"} <= profiled.keys():
    report("ZeRO-3 minus FSDP2, ms/step", **{p.removesuffix("_ms"): profiled["deepspeed-zero3"][p]
                                            - profiled["fsdp2"][p] for p in PARTS})
else:
    print("ZeRO-3 not run here (DeepSpeed needs CUDA): its gap to FSDP2 is split on the GPU run")

# %%
for strategy, steps in profiled.items():  # the trace shows every strategy's collectives and compute
    assert steps["comm_ms"] > 0 and steps["compute_ms"] > 0, f"{strategy}: no collective or no compute found"
gathers = {s: profiled[s]["kinds"].get("all_gather", 0) for s in profiled}
assert gathers["fsdp2"] > 0 and gathers["ddp"] == 0, "FSDP2 gathers its weights; DDP all-reduces gradients"
assert gathers["fsdp2-no-reshard"] < gathers["fsdp2"], "without resharding, backward gathers nothing again"

# %% [markdown]
# ## 3 · Speed: scaling from 1 to 2 GPUs, and model FLOPs utilisation
#
# FSDP2 (full resharding) on 1 and on 2 GPUs with the same work per GPU (weak scaling; launched in
# section 2's cell), set up for speed rather than for the smallest footprint of section 2:
# - every decoder layer compiled (`--compile`: `torch.compile` fuses the norms, RoPE, SwiGLU and
#   residual adds that eager PyTorch runs one kernel at a time);
# - `speed_micro_batch` rows per forward (8 x 2048 tokens on a GPU): larger matmuls, and FSDP2's
#   per-layer collectives and the optimizer step spread over more tokens;
# - the plain loss over full logits (`--loss full`), not section 2's fused chunked LM head. The fused
#   head never holds the `[tokens, 128k]` logits, which saves gigabytes at this vocabulary, but its
#   chunk loop costs time: on one H100 it was about 15% of the step (`results/history/02_mfu_probe.H100.log`).
#   With 141 GB per GPU, memory is not what limits this run, so it spends memory on speed.
#
# MFU counts the model's FLOPs per token (`6N + 6·L·d·(T+1)`: causal attention computes about half
# of the `T²` query-key pairs; `flops.training_flops_per_token`) times tokens/s per GPU, over a peak:
# the datasheet's dense bf16 figure, and the bf16 matmul rate measured on this GPU
# (`timing.matmul_peak`, an 8192³ product, measured in section 2), which is what the GPU can actually
# give a large matmul. Both are shown side by side, here and in section 2's table.
#
# The targets against the baselines of section 2: FSDP2's per-GPU peak at most 60% of DDP's with
# `gradient_as_bucket_view=True`, and FSDP2's tokens/s at least ZeRO-3's with the tuned persistence,
# prefetch and buckets (both eager, the same batches).

# %%
def mfu_of(r, peak):
    """MFU of a run's tokens/s per GPU against ``peak``: at its median, slowest and fastest step."""
    keys = ("tokens_per_s_per_gpu", "tokens_per_s_per_gpu_min", "tokens_per_s_per_gpu_max")
    return [flops.mfu(r[key], fpt, peak) for key in keys]


# `speed`: FSDP2 on 1 and on NPROC processes, set up for speed (launched with section 2's runs)
fpt = flops.training_flops_per_token(model_config, P["seq_len"])
scaling_range = bench.speed_ratio(speed[NPROC], speed[1])  # median ratio, and its min-max over the steps
scaling = scaling_range[0]
speed_rows = [{"GPUs": n, "tokens/s (all GPUs)": r["tokens_per_s"], "min-max (all GPUs)": bench.spread(r),
               "tokens/s per GPU": r["tokens_per_s_per_gpu"], "min-max per GPU": runs.per_gpu_spread(r),
               "MFU, datasheet peak (%)":
                   100 * (flops.mfu(r["tokens_per_s_per_gpu"], fpt, PEAK) or 0),
               "MFU, measured matmul peak (%)":
                   100 * (flops.mfu(r["tokens_per_s_per_gpu"], fpt, measured_peak) or 0),
               "peak (GiB)": (r["peak_bytes"] or 0) / GiB} for n, r in speed.items()]
display(pd.DataFrame(speed_rows).set_index("GPUs").round(1))
report("scaling 1 -> 2", **{"speed-up [min-max]": bench.describe_ratio(*scaling_range),
                            "datasheet peak TFLOP/s": (PEAK or 0) / 1e12,
                            "measured matmul TFLOP/s": (measured_peak or 0) / 1e12})
# FSDP2 against the tuned ZeRO-3 (section 2's eager runs), where DeepSpeed ran
vs_zero3_range = bench.speed_ratio(ok["fsdp2"], ok["deepspeed-zero3"]) if "deepspeed-zero3" in ok else None
print("FSDP2 vs ZeRO-3 tokens/s:", bench.describe_ratio(*vs_zero3_range) if vs_zero3_range else "not run")

# %%
if ON_GPUS:
    assert measured_peak < 1.1 * hw.peak_flops, "a matmul faster than the datasheet: the timing is wrong"
    assert scaling > 1.5, "2 GPUs should nearly double the throughput (NVLink, communication overlapped)"
    mfu_datasheet, *datasheet_range = mfu_of(speed[NPROC], hw.peak_flops)
    mfu_measured, *measured_range = mfu_of(speed[NPROC], measured_peak)
    targets.check("FSDP2 scaling 1 -> 2 GPUs >= 1.85x tokens/s", bench.describe_ratio(*scaling_range),
                  scaling >= 1.85)
    targets.check("MFU >= 45% in bf16, of the measured bf16 matmul peak",
                 f"{mfu_measured:.1%} [{measured_range[0]:.1%}-{measured_range[1]:.1%}] of "
                 f"{measured_peak / 1e12:.0f} TFLOP/s", mfu_measured >= 0.45)
    targets.check("MFU >= 45% in bf16, of the datasheet dense bf16 peak",
                 f"{mfu_datasheet:.1%} [{datasheet_range[0]:.1%}-{datasheet_range[1]:.1%}] of "
                 f"{hw.peak_flops / 1e12:.0f} TFLOP/s", mfu_datasheet >= 0.45)
    fsdp_vs_ddp = mem["fsdp2"].peak / mem["ddp"].peak
    targets.check("FSDP2 (full resharding) per-GPU peak <= 60% of DDP's (gradient_as_bucket_view)",
                 f"{fsdp_vs_ddp:.1%} ({mem['fsdp2'].peak / GiB:.1f} vs {mem['ddp'].peak / GiB:.1f} GiB)",
                 fsdp_vs_ddp <= 0.60)
    ZERO3_TARGET = "FSDP2 tokens/s >= DeepSpeed ZeRO-3's (tuned persistence, prefetch, buckets; eager)"
    if "deepspeed-zero3" in ok:
        vs_zero3 = vs_zero3_range[0]
        targets.check(ZERO3_TARGET, f"vs ZeRO-3: {bench.describe_ratio(*vs_zero3_range)}", vs_zero3 >= 1.0)
    else:
        targets.check(ZERO3_TARGET, "ZeRO-3 not run: pip install deepspeed", False)
else:
    print("no GPU here: scaling, MFU and the targets are measured on GPUs (README: GPU evidence, 02)")

# %% [markdown]
# ## 4 · Efficient data loading
#
# A GPU step waits for its batch whenever the input pipeline is slower than the step. The naive
# pipeline (`dataload.naive_loader`) tokenises raw text for every row, every epoch, in the training
# process (no workers) and copies unpinned memory to the GPU. The efficient one tokenises once with
# `datasets` (batched, the Rust tokenizer), packs rows of exactly `seq_len` tokens, saves them as
# Arrow files that later runs memory-map (`dataload.packed_dataset`), and reads them with worker
# processes that prefetch into pinned memory while the GPU computes, the copy not blocking the host
# (`dataload.efficient_loader`). `pipeline.time_pipeline` times the steps with CUDA events and counts
# the time the GPU sat idle between one step's compute and the next.
#
# The smaller the model, the shorter its step, and the more the input pipeline matters: this runs the
# embedded model (a few milliseconds per step on a GPU), the case where data loading decides the speed.
# On a CPU the "accelerator" is the CPU itself: worker processes would compete with the compute for
# the same cores, so there the efficient pipeline reads its pre-tokenised rows in the training process.
# The claims on waiting and step time are asserts on a CPU and targets on a GPU, which another process may
# share (issue 17's simulated T4 and L4 ran side by side on one H100); on the H200 a miss still fails the run.

# %%
D = P["data"]
data_model = models.load_model("data/tiny-llama", dtype=torch.float32 if not hw.cuda else None)
data_optimizer = torch.optim.AdamW(data_model.parameters(), lr=1e-4)
tokenizer = models.load_tokenizer("data/tiny-llama")


def data_step(batch, model=data_model, optimizer=data_optimizer):
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


texts = dataload.raw_corpus(D["docs"], seed=0)
packing = {}
seconds = timing.seconds(lambda: packing.update(rows=dataload.packed_dataset(texts, tokenizer, D["seq_len"])),
                         CPU)
packed = packing["rows"]
report("tokenise + pack + save", **{"rows": len(packed), "seconds": seconds})
pipelines = {"naive: tokenise per row, no workers":
                 dataload.naive_loader(texts, tokenizer, D["seq_len"], D["batch"]),
             f"pre-tokenised, {D['workers']} workers" + (", pinned, prefetch" if D["workers"] else ""):
                 dataload.efficient_loader(packed, D["batch"], hw.device, num_workers=D["workers"])}
timings = {}
for name, loader in pipelines.items():
    timings[name] = pipeline.time_pipeline(loader, data_step, hw.device, steps=D["steps"], warmup=D["warmup"])
    report(name[:28], **{"step ms": 1e3 * timings[name].step_s, "waiting": timings[name].wait_fraction,
                         "tokens/s": timings[name].tokens_per_s})
naive_t, fast_t = timings.values()
display(pd.DataFrame({name: {"step time (ms)": 1e3 * t.step_s,
                             "time waiting for data (%)": 100 * t.wait_fraction, "tokens/s": t.tokens_per_s}
                      for name, t in timings.items()}).T.round(1))

# %%
labels = ["naive", "efficient"]
plots.side_by_side([
    (plots.value_bars, dict(names=labels, values=[1e3 * t.step_s for t in timings.values()],
                            ylabel="step time (ms)", title=f"Step time, {D['batch']} x {D['seq_len']} tokens",
                            fmt="{:.1f}")),
    (plots.value_bars, dict(names=labels, values=[100 * t.wait_fraction for t in timings.values()],
                            ylabel="time waiting for data (%)", fmt="{:.1f}",
                            title=("The naive pipeline keeps the device waiting" if hw.cuda
                                   else "Waiting for data (CPU)")))],
    width=6, height=4)
plt.show()

# %%
waits_less = fast_t.wait_fraction < naive_t.wait_fraction
assert hw.cuda or waits_less, "the efficient pipeline waits less"
if hw.cuda:  # timings: asserted on a CPU, targets on a GPU (another process may share it: issue 17)
    waits = f"waiting {naive_t.wait_fraction:.0%} (naive) vs {fast_t.wait_fraction:.0%} (efficient)"
    targets.check("on a GPU, tokenising in the training loop starves a small model (> 30% waiting)", waits,
                  naive_t.wait_fraction > 0.3)
    targets.check("the efficient pipeline waits less, under 10%, and steps faster than the naive one",
                  f"{waits}; step {1e3 * fast_t.step_s:.1f} vs {1e3 * naive_t.step_s:.1f} ms",
                  waits_less and fast_t.wait_fraction < 0.1 and fast_t.step_s < naive_t.step_s)
if ON_GPUS:
    idle_s = naive_t.wait_s / naive_t.steps
    step_1b = ok["fsdp2"]["step_seconds"] / P["accum"]  # one micro-batch of the 1B model on one GPU
    report("naive pipeline vs a 1B step", **{"GPU idle per batch (ms)": 1e3 * idle_s,
                                             "1B micro-step (ms)": 1e3 * step_1b})
del data_model, data_optimizer, data_step, pipelines  # the workers (persistent) exit with their loader
gc.collect()

# %% [markdown]
# ## Bad input: a clear message, nothing left running
#
# Each case below must raise `RecipeError` with a message that says what to change, and leave no
# process of the run behind (checked by listing this kernel's child processes afterwards).

# %%
def attempt(label, fn):
    """Run ``fn``; print and return the RecipeError it raised (or "no error")."""
    outcome = runs.recipe_error(fn)
    print(f"{label}: {type(outcome).__name__}: {str(outcome).splitlines()[0][:200]}")
    return outcome


def children():
    """This kernel's live child processes."""
    return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


before = {p.pid for p in children()}
failing = os.path.abspath("outputs/02_failing_worker.py")
with open(failing, "w") as f:
    f.write("import os\nraise ValueError('bad value on rank ' + os.environ['RANK'])\n")
hung = os.path.abspath("outputs/02_hung_worker.py")
with open(hung, "w") as f:
    f.write("import time\ntime.sleep(600)\n")
wrong_ds = os.path.abspath("outputs/02_wrong_deepspeed.json")
with open(wrong_ds, "w") as f:
    json.dump({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 16}, f)
busy = socket.socket()  # a port something else listens on
busy.bind(("127.0.0.1", 0))
busy.listen()
cases = {
    "more processes than GPUs": attempt("more processes than GPUs", lambda: launcher.launch(
        SCRIPT, torch.cuda.device_count() + 1, backend="nccl")) if hw.cuda else None,
    "NCCL on a machine without CUDA": None if hw.cuda else attempt(
        "NCCL on a machine without CUDA", lambda: launcher.launch(SCRIPT, 2, backend="nccl")),
    "a port in use": attempt("a port in use", lambda: launcher.launch(
        SCRIPT, 2, port=busy.getsockname()[1], backend=LAUNCH["backend"])),
    "a wrong DeepSpeed config": attempt("a wrong DeepSpeed config", lambda: zero.check_deepspeed_config(
        zero.load_deepspeed_config(wrong_ds), micro_batch=2, accum_steps=2, world_size=2)),
    "a missing DeepSpeed config": attempt("a missing DeepSpeed config",
                                          lambda: zero.load_deepspeed_config("no/such/zero3.json")),
    "a failing worker": attempt("a failing worker", lambda: launcher.launch(
        failing, 2, timeout_s=120, echo=False, backend=LAUNCH["backend"])),
    "a hung worker (timeout 5 s)": attempt("a hung worker (timeout 5 s)", lambda: launcher.launch(
        hung, 2, timeout_s=5, echo=False, backend=LAUNCH["backend"])),
}
busy.close()
psutil.wait_procs(children(), timeout=1)  # up to a second for the last exits
left = [p for p in children() if p.pid not in before]

# %%
for label, outcome in cases.items():
    if outcome is not None:
        assert isinstance(outcome, errors.RecipeError), f"{label}: expected a RecipeError"
assert "ValueError: bad value on rank" in str(cases["a failing worker"]), "the workers' traceback is shown"
assert "timeout_s=5" in str(cases["a hung worker (timeout 5 s)"])
assert "train_micro_batch_size_per_gpu=16 but this run uses 2" in str(cases["a wrong DeepSpeed config"])
assert not left, f"processes left running: {[p.cmdline() for p in left]}"

# %% [markdown]
# ## Save the figures

# %%
figures = {"correctness": agreement, "scale": scale, "baselines": baselines,
           "timeline": [runs.timeline_row(s, scale[s]) for s in TIMELINE],
           "speed": {str(k): v for k, v in speed.items()},
           "scaling": scaling, "scaling_min_max": scaling_range[1:], "fsdp2_vs_zero3": vs_zero3_range,
           "measured_matmul_peak": measured_peak,
           "data_loading": {name: vars(t) for name, t in timings.items()},
           "targets": targets.rows}
board = []
if ON_GPUS:
    board.append(results.scoreboard_row("02", "FSDP2 (2 GPUs)", "DDP (gradient_as_bucket_view)",
                                        mem["fsdp2"].peak, mem["ddp"].peak,
                                        ok["fsdp2"]["tokens_per_s_per_gpu"],
                                        ok["ddp"]["tokens_per_s_per_gpu"]))
env = results.environment(hw, **{**P, "gpus": GPUS, "processes": NPROC})
publish = hw.cuda and P["profile"] == "gpu" and MODEL_NAME == PROFILES["gpu"]["model"] and GPUS >= NPROC
for path in results.save("02_multi_gpu_training", hw, env, figures, board, publish=publish):
    print("wrote", path.relative_to(models.REPO_ROOT) if path.is_relative_to(models.REPO_ROOT) else path)

# %% [markdown]
# ## Use it in your own code
#
# From a shell, on every GPU of a machine (or across nodes: README):
#
# ```bash
# torchrun --standalone --nproc-per-node 8 scripts/train_distributed.py --strategy fsdp2 --bf16 --compile \
#     --model meta-llama/Llama-3.2-1B --seq-len 2048 --micro-batch 8 --global-batch 128 --loss full \
#     --steps 100
# ```
#
# (section 3's speed set-up: about 52 GiB per GPU on 2 GPUs; on smaller GPUs drop `--loss full`, so
# the default fused loss chunks the LM head, and halve `--micro-batch`.)
#
# Inside your own training script, started by `torchrun`:
#
# ```python
# import torch
# from recipes_lib.core import models, speed, train
# from recipes_lib.parallel import context, fsdp2, step
#
# ctx = context.setup()                                   # NCCL on GPUs, gloo on CPU
# model = train.LossModel(models.load_model("meta-llama/Llama-3.2-1B", dtype=torch.float32, hw=...))
# speed.compile_layers(model)                             # optional: torch.compile each decoder layer
# model = fsdp2.shard_fsdp2(model, mixed_precision=True)  # bf16 compute, fp32 shards and reductions
# optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
# for micro_batches in my_batches:                        # this rank's slice of each global batch
#     result = step.train_step(model, optimizer, micro_batches, ctx.device)  # loss, grad norm
# context.cleanup()
# ```
#
# Memory short? `--strategy fsdp2-qlora` (a 4-bit base, LoRA adapters) or `fsdp2-offload`. Input
# pipeline: `dataload.packed_dataset` once, then `dataload.efficient_loader`.

# %% [markdown]
# ## The GPU targets
# Set for 2 H200s; printed everywhere, and there a miss fails this cell (after every figure above has
# been measured and saved), so a missed target is shown, not hidden.

# %%
display(pd.DataFrame(targets.rows).set_index("target") if targets.rows else "no GPU here: no targets checked")
targets.assert_all()
