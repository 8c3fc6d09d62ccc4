"""QLoRA: a frozen 4-bit NF4 base plus small trainable low-rank adapters on every linear layer.

Memory per base parameter drops from 2 (bf16) + 2 (grad) + 4 (AdamW state in bf16) = 8 bytes to
about 0.5 byte (NF4, 64-value blocks, double-quantized scales: +0.127 bit/param); only the adapters
(``r * (d_in + d_out)`` per layer) carry gradients and optimizer state.
"""

from __future__ import annotations

import importlib.util

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig

from ..core import speed
from ..core.errors import RecipeError
from ..core.hardware import Hardware, detect
from ..core.models import DEFAULT_MODEL, load_model, resolve
from ..measure import memory
from . import nf4, nf4_torchao


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0) -> LoraConfig:
    """LoRA on all linear layers except the LM head, as the QLoRA paper recommends."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.0):
    """Freeze ``model`` and wrap it with LoRA adapters; returns the peft model."""
    return get_peft_model(model, lora_config(r, alpha, dropout))


BASES = ("bitsandbytes", "torch", "torchao")


def default_path(hw: Hardware, sharded: bool = False, config=None) -> tuple[str, bool, str]:
    """The QLoRA step ``qlora_model(base="auto")`` builds on ``hw``: ``(base, compiled, why)``.

    The fastest step notebook 01 measured (H100, 1B shape, 2048 tokens; issue 18) is torchao's ``NF4Tensor``
    base with compiled decoder layers: 2.2x the documented transformers + peft + bitsandbytes step with
    packing, where bitsandbytes' eager base is 1.0-1.4x from run to run (host-bound). It needs a bf16 GPU
    (the compiler's Triton kernels; it was not measured in fp16) and torchao. Elsewhere the path falls back,
    and ``why`` says to what: bitsandbytes' base with compiled layers (a bf16 GPU without torchao: 2.05x in
    the same run), or eager (a CPU, a GPU without bf16, or a base FSDP2 shards, ``sharded``: stored in bf16
    words, which only bitsandbytes' does).
    With the model's ``config``, a model torchao's base cannot take (``nf4_torchao.unsupported``) gets
    bitsandbytes' base, compiled.
    """
    fastest = "torchao's NF4 base with compiled decoder layers (the fastest step measured, notebook 01)"
    if sharded:
        return "bitsandbytes", False, "bitsandbytes' base, eager: the base FSDP2 shards here"
    compiled, why = speed.default_compile(hw)
    if not compiled:
        return "bitsandbytes", False, f"bitsandbytes' base, {why}"
    if importlib.util.find_spec("torchao") is None:
        return "bitsandbytes", True, f"bitsandbytes' base, compiled layers: {fastest} needs torchao " \
            "(pip install torchao)"
    why_not = nf4_torchao.unsupported(config) if config is not None else None
    if why_not:
        return "bitsandbytes", True, (f"bitsandbytes' base, compiled layers: torchao's cannot take this "
                                      f"model ({why_not})")
    return "torchao", True, fastest


def base_of(model: torch.nn.Module) -> str | None:
    """Which 4-bit base ``model`` holds (``BASES``), or None for a model without one."""
    kinds = {type(m).__name__ for m in model.modules()}
    found = [base for base, kind in (("torchao", "TorchaoNF4Linear"), ("torch", "NF4Linear"),
                                     ("bitsandbytes", "Linear4bit")) if kind in kinds]
    return found[0] if found else None


def unquantized_dtype(hw: Hardware) -> torch.dtype:
    """The dtype ``qlora_model`` keeps the weights it does not quantize in (embeddings, norms, LM head), on
    every base: ``hw.compute_dtype``, so bf16 on a bf16 GPU, fp16 on a GPU without bf16 (a T4), fp32 on a CPU.

    Full fine-tuning holds its weights in ``hw.model_dtype`` instead, fp32 on a T4 (fp16 AMP needs fp32
    masters), which a frozen base does not need: predict each with its own (``predict.qlora_state_bytes``).
    """
    return hw.compute_dtype


def qlora_model(name: str = DEFAULT_MODEL, r: int = 16, alpha: int = 32, dropout: float = 0.0,
                gradient_checkpointing: bool = False, attn_implementation: str = "sdpa", hw=None,
                quant_storage: torch.dtype = torch.uint8, base: str = "auto", compiled: bool | None = None):
    """Our QLoRA: NF4 base (double quantization), bf16 compute (fp16 on a GPU without bf16, a T4), LoRA on
    all linear layers (adapters in fp32, peft's default).

    Unlike ``prepare_model_for_kbit_training`` it keeps the unquantized weights (embeddings, norms,
    LM head) in that compute dtype (``unquantized_dtype``): upcasting them to fp32 costs memory and makes
    the LM head an fp32 matmul.
    ``quant_storage=torch.bfloat16`` packs the NF4 values into bf16 words, which FSDP can shard.

    Args:
        base: who holds and runs the 4-bit base: ``"bitsandbytes"`` (``Linear4bit``, through transformers'
            ``BitsAndBytesConfig``), ``"torch"`` (``memory.nf4``: the same code in plain PyTorch ops,
            fused by ``torch.compile``; fp32 block scales) or ``"torchao"`` (torchao's ``NF4Tensor``, as
            torchtune uses it). All three quantize every linear layer but the LM head, in 64-value blocks.
            ``"auto"`` (the default): the fastest this machine can run, ``default_path(hw)``.
        compiled: ``torch.compile`` each decoder layer (``speed.compile_layers``), after the adapters and
            checkpointing. ``None`` (the default): as ``default_path`` says with ``base="auto"``, else off.
    """
    if base not in (*BASES, "auto"):
        raise RecipeError(f"base={base!r}: pick one of auto, {', '.join(BASES)}")
    hw = hw or detect()
    if base == "auto":
        config = AutoConfig.from_pretrained(resolve(name))
        base, auto_compiled, _ = default_path(hw, sharded=quant_storage != torch.uint8, config=config)
        compiled = auto_compiled if compiled is None else compiled
    model = quantized_base(name, base, hw, gradient_checkpointing=gradient_checkpointing,
                           attn_implementation=attn_implementation, quant_storage=quant_storage)
    model = add_lora(model, r, alpha, dropout)
    for param in model.parameters():  # adapters in fp32 whatever the base's dtype (torchao's reads as bf16)
        if param.requires_grad:
            param.data = param.data.float()
    return speed.compile_layers(model) if compiled else model


def quantized_base(name: str, base: str, hw: Hardware, quant_storage: torch.dtype = torch.uint8, **load):
    """The model ``name`` with every linear layer but the LM head on the 4-bit ``base`` (``BASES``), computing
    in ``hw.compute_dtype``, the rest kept in ``unquantized_dtype(hw)``; ``load`` goes to ``load_model``. No
    adapters: ``qlora_model`` adds them, and ``recipes eval`` loads a run's base with it to put the run's
    adapters back on."""
    if base == "bitsandbytes":
        return load_model(name, quantization="nf4", dtype=unquantized_dtype(hw), hw=hw,
                          quant_storage=quant_storage, **load)
    model = load_model(name, dtype=unquantized_dtype(hw), hw=hw, **load)
    (nf4 if base == "torch" else nf4_torchao).quantize_model(model, hw.compute_dtype)
    memory.free_memory()  # the unquantized weights just dropped
    return model


def docs_qlora_model(name: str = DEFAULT_MODEL, r: int = 16, alpha: int = 32, dropout: float = 0.05, hw=None,
                     upcast_fp32: bool = True, use_reentrant: bool | None = None):
    """The plain transformers + peft + bitsandbytes QLoRA set-up as their documentation shows it.

    ``BitsAndBytesConfig`` NF4 + double quantization, ``prepare_model_for_kbit_training`` (fp32
    upcast of non-quantized weights, gradient checkpointing on), LoRA on all linear layers with
    dropout. The baseline our recipe is measured against; the switches undo one documented choice
    at a time, for the ablation:

    Args:
        upcast_fp32: False keeps embeddings, norms and the LM head in bf16 (everything else
            ``prepare_model_for_kbit_training`` does still happens).
        use_reentrant: passed to gradient checkpointing; None leaves peft's and torch's default.
    """
    model = load_model(name, quantization="nf4", hw=hw)
    kwargs = {} if use_reentrant is None else {"use_reentrant": use_reentrant}
    if upcast_fp32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=kwargs)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if kwargs.get("use_reentrant", True):  # reentrant checkpointing needs inputs that require grad
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return get_peft_model(model, lora_config(r, alpha, dropout))


def load_adapter(base, path):
    """``base`` with the adapters saved (``save_pretrained``) in ``path``, for inference or merging."""
    return PeftModel.from_pretrained(base, str(path))
