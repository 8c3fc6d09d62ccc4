"""The one generation benchmark: prefill and decode tokens/s, measured the same way for every model.

``benchmark`` fills a static KV cache with a random prompt of ``prompt_len`` tokens (prefill), then
greedily decodes ``new_tokens`` tokens one at a time. On a GPU the one-token step is compiled with
``torch.compile(mode="reduce-overhead")`` (Inductor kernels replayed as a CUDA graph), so the host
launches one graph per token and decode is bound by the GPU, not by Python; ``transformers``'
``generate`` loop adds per-token host work (logits processors, stopping checks) that hides the
difference between a bf16 and an int8 model. Times are CUDA events on a GPU, ``perf_counter`` on
CPU, after warm-up, median of ``repeats``. Prefill runs eagerly (one forward over the prompt).
``tune=True`` compiles the step with Inductor's coordinate-descent tuning of its kernels' launch
parameters (what torchao and gpt-fast recommend for decode): faster small-batch decode kernels for a
longer compile. Compare models under the same ``tune``.
"""

from __future__ import annotations

import torch
from transformers import StaticCache

pass


def static_cache(model, max_len: int) -> StaticCache:
    """A fixed-size KV cache of ``max_len`` positions (its tensors are allocated on first use)."""
    return StaticCache(config=model.config, max_cache_len=max_len)


def decode_step(model, tokens: torch.Tensor, cache_position: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    """One forward into the cache; returns the greedy next token of every row, ``[batch, 1]``."""
    logits = model(input_ids=tokens, cache_position=cache_position, past_key_values=cache, use_cache=True).logits
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
