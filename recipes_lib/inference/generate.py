"""Greedy decoding with a static KV cache: the one-token step that ``measure.decode`` times.

A ``StaticCache`` has a fixed size, so the step's shapes never change: ``torch.compile`` can turn
it into one CUDA graph. ``greedy_tokens`` runs the same step eagerly, to check it against
``transformers``' ``generate``.
"""

from __future__ import annotations

import torch
from transformers import StaticCache


def static_cache(model, max_len: int) -> StaticCache:
    """A fixed-size KV cache of ``max_len`` positions (its tensors are allocated on first use)."""
    return StaticCache(config=model.config, max_cache_len=max_len)


def decode_step(model, tokens: torch.Tensor, cache_position: torch.Tensor,
                cache: StaticCache) -> torch.Tensor:
    """One forward into the cache; returns the greedy next token of every row, ``[batch, 1]``."""
    logits = model(input_ids=tokens, cache_position=cache_position, past_key_values=cache,
                   use_cache=True).logits
    return logits[:, -1].argmax(dim=-1, keepdim=True)


@torch.no_grad()
def greedy_tokens(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The tokens the benchmark's decode loop produces (eager), ``[batch, new_tokens]``: for checking it."""
    model.eval()
    length = prompt.shape[1]
    cache = static_cache(model, length + new_tokens)
    token = decode_step(model, prompt, torch.arange(length, device=prompt.device), cache)
    out = [token]
    for i in range(new_tokens - 1):
        token = decode_step(model, token, torch.tensor([length + i], device=prompt.device), cache)
        out.append(token)
    return torch.cat(out, dim=1)
