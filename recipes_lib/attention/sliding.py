"""Attention for long sequences: SDPA kernels, FlexAttention block masks, sliding windows.

- ``attend`` runs one attention call with a named implementation (eager, an SDPA backend, or
  FlexAttention with a causal or sliding-window block mask), so the notebook can time each one
  against sequence length.
- ``use_sliding_window(model, window)`` makes any transformers model attend through a compiled
  FlexAttention sliding window: each query sees itself and the ``window - 1`` tokens before it.
  Blocks of the mask that are all masked out are skipped, so the cost grows as ``L * window``
  instead of ``L**2 / 2``.
- ``as_mistral`` loads a Llama checkpoint as Mistral (the same weights plus the architecture's own
  ``sliding_window``), the reference our FlexAttention window is checked against.
"""

from __future__ import annotations

import torch

from ..core.errors import RecipeError
from ..core.models import resolve
from .kernels import compile_flex, flex_kernel
from .masks import block_mask, check_window


def _sliding_attention_forward(window: int, compiled: bool | None, sinks: int):
    def forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        if query.shape[-2] != key.shape[-2]:
            raise RecipeError("the FlexAttention sliding window here scores whole sequences (training, "
                              "evaluation); for generation with a KV cache use the architecture's own "
                              "sliding_window (sliding.as_mistral)")
        if dropout or kwargs.get("softcap") or kwargs.get("sinks") is not None:
            raise RecipeError("the sliding-window attention has no attention dropout, logit softcapping or "
                              "learned sinks; use the model's own attention for this architecture")
        short = window >= query.shape[-2]  # a row no longer than the window: plain causal
        mask = block_mask(query.shape[-2], None if short else window, str(query.device), sinks)
        out = flex_kernel(compile_flex(query, compiled))(
            query, key, value, block_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    return forward


def _check_rows(module, args, kwargs):
    """Refuse what the windowed attention cannot see: left padding and packed rows."""
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and mask.dim() == 2 and not bool((mask.cummin(dim=-1).values == mask).all()):
        raise RecipeError("the sliding-window attention takes unpadded or right-padded rows: this "
                          "attention_mask has padding before real tokens (left padding). Pad on the right, "
                          "or pass no mask.")
    if positions is not None:
        expected = torch.arange(positions.shape[-1], device=positions.device)
        if not bool((positions == expected).all()):
            raise RecipeError("the sliding-window attention does not separate packed documents: pass rows "
                              "whose position_ids are 0, 1, 2, ... (or none)")


def use_sliding_window(model, window: int, compiled: bool | None = None, sinks: int = 0):
    """Make ``model`` attend through a FlexAttention sliding window of ``window`` tokens (in place).

    Args:
        compiled: see ``flex``; pass False when row lengths vary a lot (each length compiles anew).
        sinks: keep the first ``sinks`` tokens visible to every query (StreamingLLM's attention sinks).
    """
    from transformers import AttentionInterface
    check_window(window)
    name = f"recipes_sliding_{window}_sinks_{sinks}_{'auto' if compiled is None else int(compiled)}"
    AttentionInterface.register(name, _sliding_attention_forward(window, compiled, sinks))
    model.set_attn_implementation(name)
    if not getattr(model, "_recipes_rows_checked", False):  # transformers hands custom attention no mask
        model.register_forward_pre_hook(_check_rows, with_kwargs=True)
        model._recipes_rows_checked = True
    return model


def as_mistral(name: str, sliding_window: int | None, **kwargs):
    """Load a Llama checkpoint as Mistral, whose architecture has its own ``sliding_window``.

    Mistral is Llama plus a sliding window, with the same parameter names, so the weights load as
    they are. transformers builds the windowed mask itself (for SDPA, eager, flex and generation).
    """
    from transformers import AutoConfig, MistralConfig, MistralForCausalLM

    path = resolve(name)
    llama = AutoConfig.from_pretrained(path)
    if llama.model_type not in ("llama", "mistral"):
        raise RecipeError(f"as_mistral loads Llama-architecture checkpoints; {name!r} is "
                          f"{llama.model_type!r}")
    dropped = ("model_type", "architectures", "sliding_window")
    fields = {k: v for k, v in llama.to_dict().items() if k not in dropped}
    config = MistralConfig(**fields, sliding_window=sliding_window)
    return MistralForCausalLM.from_pretrained(path, config=config, **kwargs)
