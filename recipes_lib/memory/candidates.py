"""The QLoRA step candidates that notebook 01 measures against the documented set-up (issue 18).

Each candidate is our QLoRA set-up (``qlora.qlora_model`` with activation checkpointing: bf16 weights,
no adapter dropout, non-reentrant recomputation) with one thing changed, so that each is measured on
its own against the same baseline:

- ``ours``: as is, bitsandbytes' ``Linear4bit`` base;
- compiled decoder layers (``core.speed.compile_layers``), on the bitsandbytes base and on our
  plain-PyTorch NF4 base (``memory.nf4``), which the compiler can fuse; the PyTorch base eager too;
- the PyTorch base with each weight dequantized once per optimizer step (``nf4.cache_per_step``;
  eager: a compiled layer does not read the cache, see ``memory.nf4``), at the memory of a bf16 copy;
- on a GPU: the compiled PyTorch base replayed as CUDA graphs (``mode="reduce-overhead"``: a step the
  profile finds host-bound loses its launch overhead), and FlexAttention in place of SDPA (packed rows
  give SDPA a dense block-diagonal mask, which rules out its flash kernel; FlexAttention's block mask
  skips the tiles between documents);
- where installed: torchao's ``NF4Tensor`` base, compiled (torchtune's way), also with each MLP as one
  autograd function with a hand-written backward (``lora_mlp``, Unsloth's LoRA MLP approach), and Liger
  Kernel's RMSNorm, SwiGLU and RoPE kernels in our model.

``full_step_peers`` gives notebook 01's Speed 1 the maintained peers of our full fine-tuning step (Liger
Kernel's kernels, Apple's Cut Cross-Entropy) where this machine can run them. ``qlora_candidates`` returns
the QLoRA candidates by name as ``(model factory, optimizer factory)``: the model factory
takes the model's name (so one candidate can be built on another model: the notebook trains the
fastest one on the embedded task), the optimizer factory ``(model, lr) -> optimizer``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

from ..core import losses, speed, train
from ..core.hardware import Hardware
from . import lora_mlp, nf4, qlora

Factory = tuple[Callable[..., torch.nn.Module], Callable[..., object]]


def ours(name: str, r: int, hw: Hardware, base: str = "bitsandbytes", compiled: bool = False,
         attn: str = "sdpa", **options) -> torch.nn.Module:
    """Our QLoRA set-up with checkpointing on ``base``, its decoder layers compiled (``options`` go to
    ``torch.compile``) if ``compiled``, attending through ``attn``."""
    model = qlora.qlora_model(name, r=r, gradient_checkpointing=True, base=base, attn_implementation=attn,
                              hw=hw)
    return speed.compile_layers(model, **options) if compiled else model


def cached(optimizer_fn: Callable[..., object]) -> Callable[..., object]:
    """``optimizer_fn`` whose optimizer empties ``nf4.cache_per_step``'s cache after each step."""
    def make(model, *args, **kwargs):
        return nf4.cache_per_step(model, optimizer_fn(model, *args, **kwargs))
    return make


def qlora_candidates(r: int, hw: Hardware, optimizer_fn: Callable[..., object]) -> dict[str, Factory]:
    """The candidates this machine can run (module docstring), by name: ``(model_fn(name), optimizer_fn)``."""
    def variant(**changes):
        return lambda name: ours(name, r, hw, **changes)

    found = {"ours": (variant(), optimizer_fn),
             "ours + compiled layers": (variant(compiled=True), optimizer_fn),
             "ours, PyTorch NF4 base": (variant(base="torch"), optimizer_fn),
             "ours, PyTorch NF4 + compiled": (variant(base="torch", compiled=True), optimizer_fn),
             "ours, PyTorch NF4 + dequantize once per step": (variant(base="torch"), cached(optimizer_fn))}
    optional = [  # (unavailable()'s key, candidate, model factory): kept where this machine can run it
        ("CUDA graphs", "ours, PyTorch NF4 + compiled, CUDA graphs",
         variant(base="torch", compiled=True, mode="reduce-overhead")),
        ("FlexAttention", "ours + FlexAttention (document mask)", variant(attn="flex_attention")),
        ("torchao NF4", "ours, torchao NF4 + compiled", variant(base="torchao", compiled=True)),
        ("torchao NF4", "ours, torchao NF4 + compiled, fused LoRA MLP",
         lambda name: speed.compile_layers(lora_mlp.fuse(ours(name, r, hw, base="torchao")))),
        ("Liger kernels", "ours + Liger kernels",
         lambda name: speed.apply_liger(ours(name, r, hw), fused_loss=False))]
    missing = unavailable(hw)
    return found | {name: (model_fn, optimizer_fn) for key, name, model_fn in optional if key not in missing}


def full_step_peers(model_fn: Callable[[], torch.nn.Module], hw: Hardware) -> dict[str, tuple]:
    """The maintained peers of our full fine-tuning step that this machine can run, as notebook 01's Speed 1
    rows ``name: (model factory, bench.Config options)``: the plain transformers step with Liger Kernel's
    kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy), and our step with Apple's Cut Cross-Entropy
    as its loss, eager and with compiled layers. ``model_fn`` builds the eager model."""
    missing, peers = unavailable(hw), {}
    if "Cut Cross-Entropy" not in missing:  # first: Liger's patch reaches every model built after it
        cce = functools.partial(train.loss_sum, head_loss=losses.cce_linear_cross_entropy)
        peers["Cut Cross-Entropy as our step's loss"] = (model_fn, dict(loss_fn=cce, may_fail=True))
        peers["Cut Cross-Entropy as our compiled step's loss"] = (lambda: speed.compile_layers(model_fn()),
                                                                  dict(loss_fn=cce, may_fail=True))
    if "Liger kernels" not in missing:  # last, and the notebook calls speed.remove_liger() after it
        peers["plain transformers + Liger kernels"] = (lambda: speed.apply_liger(model_fn()),
                                                       dict(step_fn=train.plain_step, may_fail=True))
    return peers


def unavailable(hw: Hardware) -> dict[str, str]:
    """The optional kernels this machine cannot run, and why (for the notebook to say): the QLoRA candidates
    ``qlora_candidates`` leaves out, and the peers ``full_step_peers`` leaves out."""
    gpu, found = hw.cuda, importlib.util.find_spec
    why = {"CUDA graphs": None if gpu else "CUDA graphs need a GPU",
           "FlexAttention": None if gpu else "FlexAttention has no backward on a CPU",
           "torchao NF4": None if found("torchao") else "torchao is not installed (pip install torchao)",
           "Liger kernels": None if gpu and found("liger_kernel") else
           "Liger Kernel's Triton kernels need a GPU" if not gpu else "pip install liger-kernel",
           "Cut Cross-Entropy": None if gpu and found("cut_cross_entropy") else  # a loss (Speed 1)
           "Cut Cross-Entropy's Triton kernels need a GPU" if not gpu else "pip install cut-cross-entropy"}
    return {name: reason for name, reason in why.items() if reason}

