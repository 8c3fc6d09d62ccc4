# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
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
# **Status: work in progress.** This first part covers launching multi-process training from a
# notebook, checking that data-parallel training (DDP and FSDP2) trains the *same model* as one
# process, and what happens on bad input. Still to come, with measurements on 2 H200 GPUs: the
# per-GPU memory breakdown of DDP, FSDP2 (with and without resharding), CPU offload, FSDP-QLoRA and
# DeepSpeed ZeRO-2/3 next to predicted memory; tokens/s and MFU; the data-loading comparison; naive
# model parallelism. Those figures are not in this notebook yet.
#
# | engine | each GPU holds | communicates per step |
# | --- | --- | --- |
# | **DDP** | the whole model, its gradients and optimizer state | all-reduce of every gradient |
# | **FSDP2** (`fully_shard`, ZeRO-3-like) | `1/N` of every parameter, gradient and optimizer state; a layer's full weights only while it runs | all-gather of weights (forward and backward), reduce-scatter of gradients |
# | **FSDP2 without resharding** (ZeRO-2-like) | as FSDP2, but gathered weights stay from forward to backward | one all-gather fewer per layer |
#
# Multi-process training runs as separate processes, one per GPU, started by `torchrun`. A notebook
# cannot be those processes, so it *launches* them: `recipes_lib.launcher.launch` runs
# `torchrun scripts/train_distributed.py` as a subprocess, prints every worker's lines as they come,
# reads back the result each rank prints, and stops every process of a run that fails, hangs past
# its timeout, or is interrupted. The same script runs from a shell with `torchrun`, across nodes
# too (README: the multi-node command and a SLURM script). On a CPU it runs 2 processes with the
# gloo backend, so CI checks the same code that runs on GPUs with NCCL.

# %% [markdown]
# ## Setup
# On Colab this installs the package (leaving Colab's torch alone); elsewhere it does nothing.

# %%
import importlib.util
import os
import sys

if "google.colab" in sys.modules and importlib.util.find_spec("recipes_lib") is None:
    !git clone -q https://github.com/llm-acceleration-recipes/recipes /content/recipes  # noqa
    !pip install -q -e /content/recipes  # noqa
    sys.path.insert(0, "/content/recipes")

# %% tags=["parameters"]
PROFILE = "auto"  # "cpu": 2 gloo processes on the embedded model; "gpu": one process per GPU
MODEL = None      # override the profile's model: a hub id, a local path, or random:<shape>
PROFILES = {
    "cpu": dict(model="data/tiny-llama", seq_len=64, global_batch=8, micro_batch=2, steps=3, timeout_s=300),
    "gpu": dict(model="data/tiny-llama", seq_len=256, global_batch=16, micro_batch=4, steps=3, timeout_s=600),
}
NPROC = 2  # processes (one per GPU on a GPU machine)

# %%
import socket
import time

import recipes_lib

recipes_lib.quiet()  # before the libraries load: their load-time warnings and bars stay out of the outputs

import pandas as pd
import psutil
import torch
from IPython.display import display

from recipes_lib import distributed, hardware, launcher, models
from recipes_lib.measure import report

hw = hardware.detect()
profile = os.environ.get("RECIPES_PROFILE", PROFILE)
profile = ("gpu" if hw.cuda else "cpu") if profile == "auto" else profile
P = PROFILES[profile]
MODEL_NAME = MODEL or os.environ.get("RECIPES_MODEL") or P["model"]
ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
SCRIPT = os.path.join(ROOT, "scripts", "train_distributed.py")
BACKEND = "nccl" if hw.cuda else "gloo"
# The workers import recipes_lib from this checkout, whatever the kernel's working directory.
WORKER_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
print(hw.summary())
print(f"profile: {profile} | model: {MODEL_NAME} | {NPROC} processes, backend {BACKEND} | {P}")


def script_args(strategy, save_params=None, **overrides):
    """The training script's arguments for one run: the same global batches whatever the strategy."""
    values = {"model": MODEL_NAME, "strategy": strategy, "steps": P["steps"], "global-batch": P["global_batch"],
              "micro-batch": P["micro_batch"], "seq-len": P["seq_len"]} | overrides
    args = [x for key, value in values.items() for x in (f"--{key}", str(value))]
    return args + (["--save-params", save_params] if save_params else [])

# %% [markdown]
# ## 1 · Launching from a notebook
#
# One FSDP2 run of 2 processes. Each line a worker prints arrives prefixed with its rank; the
# `RESULT` line each rank prints at the end (losses, memory, tokens/s) comes back as a dict.

# %%
start = time.perf_counter()
fsdp2_results = launcher.launch(SCRIPT, NPROC, script_args("fsdp2"), timeout_s=P["timeout_s"], backend=BACKEND,
                                env=WORKER_ENV)
report("FSDP2 run", **{"ranks": len(fsdp2_results), "seconds": time.perf_counter() - start,
                       "loss per step": [round(x, 4) for x in fsdp2_results[0]["losses"]]})
display(pd.DataFrame(fsdp2_results)[["rank", "strategy", "world_size", "device", "param_bytes", "optimizer_bytes"]])

# %%
assert [r["rank"] for r in fsdp2_results] == list(range(NPROC))
assert all(r["world_size"] == NPROC for r in fsdp2_results)
assert fsdp2_results[0]["losses"] == fsdp2_results[1]["losses"], "every rank reports the same global loss"

# %% [markdown]
# ## 2 · Correctness: the same model as one process
#
# Data parallelism should change *where* the work runs, not *what* is trained. Each step's global
# batch (padded rows of documents of random length, so the ranks hold different numbers of real
# tokens) is the same for 1 or `N` processes; each rank divides its summed loss by the target tokens
# of **all** ranks, and the gradients are **summed** over ranks (FSDP2's and DDP's default is a mean,
# which is only right when every rank holds the same number of tokens). So the step is the one
# process's step, up to the order of floating-point additions.
#
# Runs in fp32 (on a GPU too) for a tight check: losses and gradient norms within `rtol` of the
# one-process run, every final parameter within `atol`, after AdamW steps at lr 1e-3. On CPU the
# runs agree to a few fp32 ulps (largest parameter difference measured in the tests: 3.2e-6). On GPUs,
# NCCL's reduction order adds rounding of the same size per step, so the tolerance is wider there.

# %%
LOSS_RTOL, PARAM_ATOL = (1e-5, 1e-5) if not hw.cuda else (1e-4, 1e-4)
os.makedirs("outputs", exist_ok=True)
runs = {}
for strategy, nproc in [("single", 1), ("fsdp2", NPROC), ("fsdp2-no-reshard", NPROC), ("ddp", NPROC)]:
    path = os.path.abspath(f"outputs/02_params_{strategy}.pt")
    result = launcher.launch(SCRIPT, nproc, script_args(strategy, save_params=path), timeout_s=P["timeout_s"],
                             env=WORKER_ENV, echo=False)
    runs[strategy] = (result[0], torch.load(path))
reference, reference_params = runs["single"]
agreement = []
for strategy, (result, params) in runs.items():
    worst = max((params[k] - reference_params[k]).abs().max().item() for k in reference_params)
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"]))
    norm_rel = max(abs(a - b) / abs(b) for a, b in zip(result["grad_norms"], reference["grad_norms"]))
    agreement.append({"strategy": strategy, "processes": result["world_size"], "max loss rel. diff": loss_rel,
                      "max grad-norm rel. diff": norm_rel, "max parameter diff": worst,
                      "param bytes / rank": result["param_bytes"], "optimizer bytes / rank": result["optimizer_bytes"]})
display(pd.DataFrame(agreement).set_index("strategy"))

# %%
for row in agreement:
    assert row["max loss rel. diff"] <= LOSS_RTOL, f"{row['strategy']}: loss differs from one process"
    assert row["max grad-norm rel. diff"] <= LOSS_RTOL, f"{row['strategy']}: gradient norm differs (mean vs sum?)"
    assert row["max parameter diff"] <= PARAM_ATOL, f"{row['strategy']}: final parameters differ"
by = {row["strategy"]: row for row in agreement}
for strategy in ("fsdp2", "fsdp2-no-reshard"):  # each rank holds 1/N of every parameter and of Adam's state
    assert abs(by[strategy]["param bytes / rank"] * NPROC / by["single"]["param bytes / rank"] - 1) < 0.01
    assert abs(by[strategy]["optimizer bytes / rank"] * NPROC / by["single"]["optimizer bytes / rank"] - 1) < 0.01
assert by["ddp"]["param bytes / rank"] == by["single"]["param bytes / rank"], "DDP replicates the whole model"

# %% [markdown]
# ### Model state per rank: predicted and measured
# Between steps each rank holds fp32 master weights and AdamW's two fp32 moments (gradients live
# during the step only): `4 + 8` bytes per parameter on every DDP rank, `1/N` of that per FSDP2
# rank. `distributed.predicted_state_bytes` says so in numbers; the runs above measured the bytes
# each rank actually held (the local shards of FSDP2's `DTensor`s).

# %%
n_params = sum(p.numel() for p in models.load_model(MODEL_NAME, dtype=torch.float32).parameters())
memory_rows = []
for strategy, (result, _) in runs.items():
    predicted = distributed.predicted_state_bytes(n_params, strategy, result["world_size"])
    memory_rows.append({"strategy": strategy, "processes": result["world_size"],
                        "weights predicted (MiB)": predicted["parameters"] / 2**20,
                        "weights measured (MiB)": result["param_bytes"] / 2**20,
                        "Adam state predicted (MiB)": predicted["optimizer"] / 2**20,
                        "Adam state measured (MiB)": result["optimizer_bytes"] / 2**20})
display(pd.DataFrame(memory_rows).set_index("strategy").round(3))

# %%
for row in memory_rows:
    for what in ("weights", "Adam state"):
        ratio = row[f"{what} measured (MiB)"] / row[f"{what} predicted (MiB)"]
        assert abs(ratio - 1) < 0.01, f"{row['strategy']}: {what} measured {ratio:.3f}x the prediction"

# %% [markdown]
# ## Bad input: a clear message, nothing left running
#
# Each case below must raise `RecipeError` with a message that says what to change, and leave no
# process of the run behind (checked by listing this kernel's child processes afterwards).

# %%
def attempt(label, fn):
    try:
        fn()
        outcome = "no error"
    except hardware.RecipeError as error:
        outcome = error
    print(f"{label}: {type(outcome).__name__}: {str(outcome).splitlines()[0][:200]}")
    return outcome


def children():
    return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


before = {p.pid for p in children()}
failing = os.path.abspath("outputs/02_failing_worker.py")
with open(failing, "w") as f:
    f.write("import os\nraise ValueError('bad value on rank ' + os.environ['RANK'])\n")
hung = os.path.abspath("outputs/02_hung_worker.py")
with open(hung, "w") as f:
    f.write("import time\ntime.sleep(600)\n")
busy = socket.socket()  # a port something else listens on
busy.bind(("127.0.0.1", 0))
busy.listen()
cases = {
    "more processes than GPUs": attempt("more processes than GPUs", lambda: launcher.launch(
        SCRIPT, torch.cuda.device_count() + 1, backend="nccl")) if hw.cuda else None,
    "NCCL on a machine without CUDA": None if hw.cuda else attempt(
        "NCCL on a machine without CUDA", lambda: launcher.launch(SCRIPT, 2, backend="nccl")),
    "a port in use": attempt("a port in use", lambda: launcher.launch(SCRIPT, 2, port=busy.getsockname()[1])),
    "a failing worker": attempt("a failing worker", lambda: launcher.launch(failing, 2, timeout_s=120, echo=False)),
    "a hung worker (timeout 5 s)": attempt("a hung worker (timeout 5 s)",
                                           lambda: launcher.launch(hung, 2, timeout_s=5, echo=False)),
}
busy.close()
time.sleep(1)
left = [p for p in children() if p.pid not in before]

# %%
for label, outcome in cases.items():
    if outcome is not None:
        assert isinstance(outcome, hardware.RecipeError), f"{label}: expected a RecipeError"
assert "ValueError: bad value on rank" in str(cases["a failing worker"]), "the workers' traceback is shown"
assert "timeout_s=5" in str(cases["a hung worker (timeout 5 s)"])
assert not left, f"processes left running: {[p.cmdline() for p in left]}"
