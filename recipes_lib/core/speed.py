"""Step-speed levers applied to a loaded model: regional compilation and Liger Kernel's fused kernels.

- ``compile_layers(model)``: ``torch.compile`` each decoder layer (regional compilation, as torchtitan
  and the PyTorch recipes do: the identical layers share one compiled graph, so it compiles once, in
  seconds rather than minutes, and FSDP's gathers and the loss stay outside). It fuses the norms, RoPE,
  SwiGLU, residual adds and, on a QLoRA model, the adapters' elementwise work and the 4-bit base's
  dequantization where its kernels are traceable. It works under activation checkpointing, which
  transformers applies around the compiled layer (5.17) or inside its traced call (later 5.x). In the
  second case transformers' output-capturing hooks set a global inside each layer's forward, a side
  effect torch.compile refuses to replay in the recomputation unless
  ``skip_fwd_side_effects_in_bwd_under_checkpoint`` is set; it is safe to skip here, since replaying
  it would only record the layer's output a second time.

  Each call starts from a fresh compiler cache (``torch._dynamo.reset()``: models compiled earlier
  recompile on their next call), so models built one after another, as a benchmark builds them, do not
  share and exhaust one recompile budget; and a layer that still hits the budget raises
  (``fail_on_recompile_limit_hit``) instead of silently running eager under a "compiled" label.
- ``apply_liger(model)``: Liger Kernel's Triton kernels (RMSNorm, SwiGLU MLP, RoPE and, for the model's
  own loss, fused linear cross-entropy) patched into a Llama-family model instance, the maintained peer
  our own kernels are measured beside (``pip install liger-kernel``; CUDA only).
"""

from __future__ import annotations

import importlib.util

import torch

from .errors import RecipeError
from .models import decoder_layers, unwrap


def compile_layers(model: torch.nn.Module, **options) -> torch.nn.Module:
    """``torch.compile`` every decoder layer of ``model`` in place (``options`` go to ``compile``, e.g.
    ``mode="max-autotune-no-cudagraphs"``); returns ``model``. Call it after quantizing, adding adapters
    and enabling checkpointing, and before sharding with FSDP2."""
    torch._dynamo.reset()  # process-wide settings and cache: see the module docstring
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for layer in decoder_layers(model):
        layer.compile(**options)
    return model


def default_compile(hw) -> tuple[bool, str]:
    """Whether the library's default training path compiles each decoder layer on ``hw``, and why.

    On a bf16 GPU it does: notebook 01 measured our full fine-tuning step with compiled layers at 1.30x
    plain transformers' (H100, 1B shape, 4 x 2048 tokens; issue 18), and QLoRA's fastest step compiles them
    too. Elsewhere it does not: on a CPU compiling takes longer than the short runs it would speed up, and
    a GPU without bf16 (a T4, fp16) was not measured."""
    if not hw.cuda:
        return False, "eager: compiled decoder layers (the fastest step measured, notebook 01) need a GPU"
    if hw.compute_dtype != torch.bfloat16:
        return False, "eager: compiled decoder layers were measured on bf16 GPUs only (not fp16)"
    return True, "compiled decoder layers (the fastest step measured, notebook 01)"


LIGER_PATCHES = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
                 "qwen2": "apply_liger_kernel_to_qwen2", "qwen3": "apply_liger_kernel_to_qwen3"}
_PATCHED_NAMES = ("apply_rotary_pos_emb", "{cls}RMSNorm", "{cls}MLP")  # what Liger swaps module-wide
_originals: dict = {}


def apply_liger(model: torch.nn.Module, fused_loss: bool = True) -> torch.nn.Module:
    """Liger Kernel's RMSNorm, SwiGLU and RoPE kernels in ``model`` (in place; a peft model's base is
    patched), and with ``fused_loss`` its fused linear cross-entropy for the model's own loss (the
    ``labels=`` path; our chunked loss does not go through it). Returns ``model``.

    Liger also swaps the RoPE function and the norm and MLP classes of the model's transformers module,
    for every model of that family built afterwards in this process: ``remove_liger()`` puts them back."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise RecipeError("Liger Kernel is not installed: pip install liger-kernel (it needs a CUDA GPU)")
    if next(model.parameters()).device.type != "cuda":
        raise RecipeError("Liger Kernel's Triton kernels run on CUDA GPUs only; on CPU leave them out")
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    kind = base.config.model_type
    if kind not in LIGER_PATCHES:
        raise RecipeError(f"no Liger Kernel patch is wired here for model_type {kind!r}; "
                          f"known: {', '.join(LIGER_PATCHES)}")
    from liger_kernel import transformers as liger

    module = importlib.import_module(type(base).__module__)
    prefix = type(base).__name__.removesuffix("ForCausalLM")
    for name in (n.format(cls=prefix) for n in _PATCHED_NAMES):
        _originals.setdefault((module, name), getattr(module, name, None))
    getattr(liger, LIGER_PATCHES[kind])(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=fused_loss, model=base)
    return model


def remove_liger() -> None:
    """Undo ``apply_liger``'s module-wide swaps (models already patched keep their kernels)."""
    for (module, name), original in _originals.items():
        if original is not None:
            setattr(module, name, original)
    _originals.clear()
