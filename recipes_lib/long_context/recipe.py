"""The long-context training recipe as one call: ``enable(model, seq_len)``.

What Arctic Long Sequence Training (ALST) does on one GPU, on a Hugging Face causal LM, in place:
- **fused attention**: eager attention (the ``[heads, seq, seq]`` scores) becomes SDPA; a fused kernel
  the model already uses (SDPA, flash, flex) stays;
- **RoPE extension** where ``seq_len`` is over the position limit (``rope.extend_context``, of the kind
  the model's own RoPE calls for: llama3 for a llama3-scaled model, else YaRN);
- **tiled MLP** (``tiling.tile_mlp``): by default chunks of ``seq_len x hidden / intermediate`` tokens,
  so that one chunk's ``[chunk, intermediate]`` tensors are about the size of one ``[seq, hidden]`` one;
- **activation checkpointing** of every layer (or every k-th), the saved layer inputs offloaded to
  pinned host memory (``core.checkpointing``).
The fourth part, the chunked loss that never holds the ``[seq, vocab]`` logits, is the training step's
(``core.train.loss_sum(..., fused_head=True)``): ``enable`` cannot switch it on in the model.
"""

from __future__ import annotations

import math

from ..core import checkpointing, models
from ..core.errors import RecipeError
from ..measure.flops import widths
from . import rope, tiling

FUSED = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def default_tile_tokens(config, seq_len: int) -> int:
    """Tokens per MLP chunk for ``seq_len``: the sequence split into ``intermediate / hidden`` equal pieces
    (4 for Llama), so that a chunk's ``[chunk, intermediate]`` tensor is about one ``[seq, hidden]``."""
    d, _, _, ffn = widths(config)
    pieces = max(1, round(ffn / d))
    return math.ceil(seq_len / pieces)


def extend_rope_for(model, seq_len: int) -> dict | None:
    """Extend ``model``'s RoPE to ``seq_len`` positions where that is over its limit (``rope.default_kind``);
    returns the kind, the old and new limits and the factor, or None where ``seq_len`` fits already."""
    config = model.config
    if seq_len <= config.max_position_embeddings:
        return None
    before, kind = config.max_position_embeddings, rope.default_kind(config)
    rope.extend_context(model, seq_len, kind)
    params = getattr(model.config, "rope_parameters", None) or model.config.rope_scaling
    return {"kind": kind, "from": before, "to": seq_len, "factor": params["factor"]}


def enable(model, seq_len: int, *, tile_tokens: int | None = None, offload: bool = True,
           checkpoint_every: int = 1) -> dict:
    """Apply the long-context recipe for sequences of ``seq_len`` tokens to ``model``; returns what it did.

    Args:
        tile_tokens: tokens per tiled-MLP chunk (default ``default_tile_tokens``).
        offload: keep the checkpointed layers' inputs in pinned host memory (on a CPU, host memory is
            the device's: nothing is saved there).
        checkpoint_every: checkpoint every k-th decoder layer (1: all, the least memory).

    Returns a dict for logging (``describe`` writes it as one line): ``attention``, ``rope`` (None, or the
    kind, the old and new position limits and the factor), ``tile_mlp_tokens``, ``tiled_mlps``,
    ``checkpointed_layers``, ``offload_activations`` and ``chunked_loss`` (the caller's to switch on).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise RecipeError(f"seq_len={seq_len!r}: the recipe is set up for a length: a positive whole number "
                          f"of tokens")
    config = model.config
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in FUSED:
        attention = models.attention_implementation("sdpa")
        model.set_attn_implementation(attention)
    extension = extend_rope_for(model, seq_len)
    tile = default_tile_tokens(model.config, seq_len) if tile_tokens is None else tile_tokens
    tiled = tiling.tile_mlp(model, tile)
    layers = checkpointing.enable_checkpointing(model, every=checkpoint_every, offload=offload)
    return {"seq_len": seq_len, "attention": attention, "rope": extension, "tile_mlp_tokens": tile,
            "tiled_mlps": tiled, "checkpointed_layers": len(layers), "offload_activations": offload,
            "chunked_loss": "the training step's (fused_head=True)"}


def describe(done: dict) -> str:
    """``enable``'s returned dict as one line for a log."""
    rope_part = ("RoPE as trained" if done["rope"] is None else
                 f"RoPE {done['rope']['kind']} x{done['rope']['factor']:g} "
                 f"({done['rope']['from']:,} -> {done['rope']['to']:,} positions)")
    return (f"long context for {done['seq_len']:,} tokens: {done['attention']} attention, {rope_part}, "
            f"{done['tiled_mlps']} MLPs tiled in chunks of {done['tile_mlp_tokens']:,} tokens, "
            f"{done['checkpointed_layers']} layers checkpointed"
            + (" (inputs offloaded to host memory)" if done["offload_activations"] else "")
            + ", the loss chunked by the step")
