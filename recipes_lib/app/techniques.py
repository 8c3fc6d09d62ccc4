"""The recipes of the four notebooks, each as a pair to measure: the technique and its plain reference.

A ``Technique`` names its notebook, what it changes, the reference it is measured against and how it
is measured (``kind``): ``train`` builds two ``measure.bench.Config``s for the notebooks' training-step
harness (``bench.run``: memory breakdown, tokens/s with its spread, MFU); the other kinds
(``decode``, ``kernel``, ``pipeline``, ``curriculum``, ``multi-gpu``) are measured by
``app.bench_runs`` through notebooks 02-04's harnesses. ``recipes bench --list`` prints this table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention import sliding
from ..core import checkpointing, models, speed, train
from ..core.errors import RecipeError
from ..core.hardware import Hardware
from ..inference import norms
from ..measure.bench import Config
from ..memory import offload, qlora

PROFILES = {  # the notebooks' CPU and GPU sizes; --model, --seq-len, --micro-batch, --steps override them
    "cpu": dict(model="data/tiny-llama", seq_len=128, micro_batch=4, steps=3, lora_r=8, prompt_len=32,
                new_tokens=8),
    "gpu": dict(model="random:llama-3.2-1b", seq_len=2048, micro_batch=4, steps=5, lora_r=16, prompt_len=512,
                new_tokens=64),
}


@dataclass(frozen=True)
class Settings:
    """What one bench run measures at: the model, the batch shape and how many timed steps."""

    hw: Hardware
    model: str
    seq_len: int
    micro_batch: int
    steps: int
    lora_r: int
    prompt_len: int
    new_tokens: int
    nproc: int


RATES = {"train": "trained tokens/s at the median optimizer step",
         "decode": "greedily decoded tokens/s at batch 1 (static KV cache)",
         "kernel": "tokens/s through one attention call",
         "pipeline": "trained tokens/s, waiting for data included (median of 3 runs)",
         "curriculum": "trained tokens/s over a whole run (median of 3 runs)",
         "multi-gpu": "trained tokens/s per GPU (per rank) at the median step"}


@dataclass(frozen=True)
class Technique:
    name: str
    notebook: str
    what: str
    reference: str
    kind: str  # train, decode, kernel, pipeline, curriculum, multi-gpu
    pair: Callable[[Settings], tuple[Config, Config]] | None = None  # for kind == "train"
    default_model: str | None = None  # a model the technique needs (rmsnorm: a LayerNorm model)

    @property
    def rate(self) -> str:
        """What its tokens/s counts."""
        return RATES[self.kind]


def _adamw(model, hw: Hardware):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                             fused=hw.cuda or None)


def _config(s: Settings, name: str, model_fn, micro_batch: int | None = None, optimizer_fn=None,
            **kw) -> Config:
    optimizer_fn = optimizer_fn or functools.partial(_adamw, hw=s.hw)
    return Config(name, model_fn, optimizer_fn, micro_batch or s.micro_batch, **kw)


def _full(s: Settings, **kw):
    return lambda: models.load_model(s.model, hw=s.hw, **kw)


BASE_NAMES = {"bitsandbytes": "bitsandbytes base", "torch": "PyTorch NF4 base", "torchao": "torchao NF4 base"}


def _path_name(base: str, compiled: bool) -> str:
    return f"{BASE_NAMES[base]}, {'compiled' if compiled else 'eager'} layers"


def _qlora(s):  # both sides on the library's default path (notebook 01's fastest steps; eager on a CPU)
    base, compiled, _ = qlora.default_path(s.hw)
    full_compiled = speed.default_compile(s.hw)[0]
    full = (lambda: speed.compile_layers(_full(s)())) if full_compiled else _full(s)
    layers = "compiled" if full_compiled else "eager"
    return (_config(s, f"full fine-tune (the model's own loss, {layers} layers)", full, fused_head=False),
            _config(s, f"QLoRA ({_path_name(base, compiled)})",
                    lambda: qlora.qlora_model(s.model, r=s.lora_r, hw=s.hw)))


def _qlora_compiled(s):
    """The default QLoRA path against bitsandbytes' eager base; where the default is eager (a CPU), the
    compiled PyTorch NF4 base stands in, so the row still shows what compiling buys."""
    base, compiled, _ = qlora.default_path(s.hw)
    base = base if compiled else "torch"

    def ours(base: str, compiled: bool):
        return qlora.qlora_model(s.model, r=s.lora_r, hw=s.hw, gradient_checkpointing=True, base=base,
                                 compiled=compiled)
    return (_config(s, "QLoRA, " + _path_name("bitsandbytes", False), lambda: ours("bitsandbytes", False),
                    fused_head=False),
            _config(s, "QLoRA, " + _path_name(base, True), lambda: ours(base, True), fused_head=False))


def _checkpointing(s):
    return (_config(s, "all activations kept", _full(s)),
            _config(s, "activation checkpointing", _full(s, gradient_checkpointing=True)))


def _accumulation(s):
    if s.micro_batch < 2:
        raise RecipeError("grad-accumulation splits the micro-batch: give --micro-batch 2 or more")
    k = max(d for d in (4, 2, 1) if s.micro_batch % d == 0)
    return (_config(s, f"{s.micro_batch} rows per forward", _full(s)),
            _config(s, f"{s.micro_batch // k} rows x {k} accumulated", _full(s), s.micro_batch // k,
                    accum_steps=k))


def _offload(s):
    def offloaded(model):
        return offload.offloaded_adamw(model.parameters(), s.hw.device, lr=1e-5)
    return (_config(s, "AdamW on the device", _full(s), max_grad_norm=None),
            _config(s, "AdamW offloaded to the host", _full(s), optimizer_fn=offloaded, max_grad_norm=None))


def _bf16(s):
    def step(dtype):
        return functools.partial(train.optimizer_step, autocast_dtype=dtype, max_grad_norm=1.0)
    fp32 = _full(s, dtype=torch.float32)
    return (_config(s, "fp32", fp32, step_fn=step(None)),
            _config(s, "bf16 autocast, fp32 master weights", fp32, step_fn=step(torch.bfloat16)))


def _flash(s):
    return (_config(s, "eager attention", _full(s, attn_implementation="eager")),
            _config(s, "SDPA (flash/cuDNN kernels)", _full(s, attn_implementation="sdpa")))


def _rmsnorm(s):
    def swapped():
        model = models.load_model(s.model, hw=s.hw)
        norms.swap_layernorm(model)
        return model
    return (_config(s, "LayerNorm", _full(s)), _config(s, "RMSNorm (swapped in)", swapped))


def _chunked_ce(s):
    return (_config(s, "full logits + cross-entropy", _full(s), fused_head=False),
            _config(s, "chunked fused LM head + CE", _full(s), fused_head=True))


def _activation_offload(s):
    def offloaded():
        model = models.load_model(s.model, hw=s.hw)
        checkpointing.enable_checkpointing(model, offload=True)
        return model
    return (_config(s, "checkpointing", _full(s, gradient_checkpointing=True)),
            _config(s, "checkpointing + inputs offloaded", offloaded))


def _sliding(s):
    window = max(16, s.seq_len // 4)

    def windowed():
        if s.hw.cuda:
            return sliding.use_sliding_window(models.load_model(s.model, hw=s.hw), window)
        return sliding.as_mistral(s.model, window, dtype=s.hw.model_dtype).to(s.hw.device).train()
    how = "FlexAttention" if s.hw.cuda else "Mistral's windowed SDPA mask: FlexAttention has no CPU backward"
    return (_config(s, "full causal attention (SDPA)", _full(s)),
            _config(s, f"sliding window of {window} ({how})", windowed))


TECHNIQUES = {t.name: t for t in [
    Technique("qlora", "01", "frozen 4-bit NF4 base + LoRA adapters", "full fine-tuning", "train", _qlora),
    Technique("qlora-compiled", "01", "QLoRA's default path with compiled layers (torchao's NF4 base on a "
              "bf16 GPU; where the default is eager, a CPU or a T4: the plain-PyTorch NF4 base, compiled)",
              "QLoRA on bitsandbytes' base, eager (both checkpointed)", "train", _qlora_compiled),
    Technique("checkpointing", "01", "recompute each layer's activations in backward", "all activations kept",
              "train", _checkpointing),
    Technique("grad-accumulation", "01", "the same rows per step in smaller micro-batches",
              "one micro-batch per step", "train", _accumulation),
    Technique("optimizer-offload", "01", "AdamW state and step in host memory (torchao)",
              "AdamW on the device", "train", _offload),
    Technique("fsdp2", "02", "parameters, gradients and AdamW sharded over the GPUs (fully_shard)",
              "DDP (gradient_as_bucket_view)", "multi-gpu"),
    Technique("bf16-mixed-precision", "02", "bf16 compute over fp32 master weights", "fp32", "train", _bf16),
    Technique("fsdp-qlora", "02", "FSDP2 over a 4-bit base with LoRA adapters", "FSDP2 full fine-tuning",
              "multi-gpu"),
    Technique("data-loading", "02", "tokenise once, pack, workers + pinned memory",
              "tokenise every row in the training loop", "pipeline", default_model="data/tiny-llama"),
    Technique("int8", "03", "int8 weight-only quantization (torchao or plain PyTorch)", "unquantized weights",
              "decode"),
    Technique("distillation", "03", "a student with half the layers, initialised from the teacher",
              "the teacher", "decode"),
    Technique("flash-attention", "03", "SDPA's fused attention kernels", "eager attention", "train", _flash),
    Technique("rmsnorm", "03", "LayerNorm swapped for RMSNorm", "LayerNorm", "train", _rmsnorm,
              default_model="data/tiny-gpt2"),
    Technique("sparse-attention", "04", "FlexAttention sliding-window kernel (skips masked tiles)",
              "SDPA causal kernel", "kernel"),
    Technique("chunked-ce", "04", "fused chunked LM head + cross-entropy, no full logits",
              "full logits + cross-entropy", "train", _chunked_ce),
    Technique("activation-offload", "04", "checkpointed layers' inputs in host memory", "checkpointing",
              "train", _activation_offload),
    Technique("curriculum", "04", "short sequences first, doubling to the target length",
              "the target length throughout", "curriculum"),
    Technique("sliding-window", "04", "every layer attends to the last N tokens (FlexAttention)",
              "full causal attention", "train", _sliding),
]}


def get(name: str) -> Technique:
    """The technique called ``name``, or one RecipeError that lists them all."""
    if name not in TECHNIQUES:
        raise RecipeError(f"unknown technique {name!r}; known: {', '.join(TECHNIQUES)} "
                          "(recipes bench --list describes each)")
    return TECHNIQUES[name]


def notes(t: Technique, s: Settings) -> list[str]:
    """What a reader of ``t``'s rows on this machine should know."""
    on_cpu = {"optimizer-offload": "on a CPU the optimizer state lives in host memory already: offloading "
                                   "changes nothing here",
              "bf16-mixed-precision": "a CPU has no bf16 matrix units: bf16 autocast is emulated and slower "
                                      "here; the speed-up is a GPU's",
              "sliding-window": "FlexAttention has no backward on a CPU: the window here is Mistral's mask "
                                "over SDPA (no memory saving); on a GPU it is FlexAttention",
              "sparse-attention": "FlexAttention has no backward on a CPU: forward only here"}
    found = [] if s.hw.cuda or t.name not in on_cpu else [on_cpu[t.name]]
    if s.hw.peak_flops is None:
        found.append(f"MFU: none on {s.hw.name} (no datasheet peak)")
    return found


def listing() -> str:
    """One line per technique: name, notebook, what it changes, against what, how it is measured."""
    lines = [f"{'technique':<22}{'nb':<4}{'measured by':<12}what it changes (against)"]
    lines += [f"{t.name:<22}{t.notebook:<4}{t.kind:<12}{t.what} (vs {t.reference})"
              for t in TECHNIQUES.values()]
    return "\n".join(lines)
