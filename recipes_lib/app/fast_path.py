"""What ``recipes train`` builds for ``model.compile: auto`` and ``model.nf4_base: auto``: the library's
default path, notebook 01's fastest measured steps (issue 18), where the run is one it was measured on.

On a bf16 GPU, in one process, with SDPA: full fine-tuning and QLoRA compile each decoder layer
(``speed.default_compile``), and QLoRA's base is torchao's ``NF4Tensor`` (``qlora.default_path``) where
the model's layers fit its blocks. Anything else keeps eager layers on bitsandbytes' base, and each
choice comes with the reason the run prints.
"""

from __future__ import annotations

from transformers import AutoConfig

from ..core import models, speed
from ..memory import qlora
from .config import RunConfig


def unmeasured(cfg: RunConfig) -> list[str]:
    """The settings of ``cfg`` the compiled default path (notebook 01's fastest steps) was not measured
    with: ``auto`` leaves the layers eager and bitsandbytes' base in place when any is set."""
    m = cfg.model
    found = {"model.method: lora": m.method == "lora", f"train.strategy: {cfg.train.strategy}":
             cfg.train.strategy != "single", "model.long_context": m.long_context,
             "model.sliding_window": bool(m.sliding_window),
             "model.offload_activations": m.offload_activations,
             f"model.attention: {m.attention}": m.attention != "sdpa",
             f"model.precision: {m.precision}": m.precision not in ("auto", "bf16")}
    return [name for name, on in found.items() if on]


def compile_choice(cfg: RunConfig, hw) -> tuple[bool, str]:
    """Whether ``build_model`` compiles the decoder layers, and why: ``model.compile`` if true or false;
    for ``auto``, ``speed.default_compile`` where nothing ``unmeasured`` is set (full fine-tuning and
    QLoRA, one process, SDPA, bf16), else eager."""
    m = cfg.model
    if m.compile != "auto":
        return bool(m.compile), f"model.compile: {str(m.compile).lower()}"
    found = unmeasured(cfg)
    if found:
        return False, (f"eager: compiled layers were not measured with {', '.join(found)} "
                       "(model.compile: true to try)")
    return speed.default_compile(hw)


def nf4_base_choice(cfg: RunConfig, hw) -> tuple[str, str]:
    """QLoRA's 4-bit base for ``cfg`` on ``hw``, and why: ``model.nf4_base`` unless ``auto``, which takes
    ``qlora.default_path``'s base (torchao's, which pays compiled: notebook 01) where ``auto`` would compile
    the layers and the model fits torchao's blocks, and bitsandbytes' otherwise (as fast eager, and the
    one DDP and FSDP2 take)."""
    if cfg.model.nf4_base != "auto":
        return cfg.model.nf4_base, f"model.nf4_base: {cfg.model.nf4_base}"
    found = unmeasured(cfg)  # several processes among them: DDP and FSDP2 take bitsandbytes' base only
    compiled, reason = compile_choice(cfg, hw)
    if found or not compiled:
        why = (f"not measured with {', '.join(found)}" if found else
               reason if cfg.model.compile is False else f"the layers stay {reason}")
        return "bitsandbytes", f"bitsandbytes' base: torchao's pays with compiled layers, and here {why}"
    config = AutoConfig.from_pretrained(models.resolve(cfg.model.source))
    base, _, why = qlora.default_path(hw, config=config)
    return base, why
