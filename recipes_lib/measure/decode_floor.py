"""The memory-bandwidth floor of decoding: the bytes one decode step must read, and the tokens/s that
reading them at the copy bandwidth allows.

At small batch a decode step reads every weight once to produce ``batch`` tokens, so no step can be
faster than ``bytes read / bandwidth``. ``step_bytes`` counts what a Llama-style step reads:

- every linear weight of the decoder layers and the LM head, in the weight ``fmt``: ``"bf16"`` (2 bytes
  a value), ``"int8"`` (1 byte, plus one bf16 scale per output row, as ``quantize.int8_weight_only``
  stores it) or ``"int4"`` (half a byte, plus a bf16 scale and zero per ``group_size`` inputs of each
  output row, torchao's tinygemm layout);
- one embedding row per sequence, and the RMSNorm weights (small);
- the KV cache: keys and values of ``context`` positions per sequence, every layer, in bf16.

Writes (the new token's keys and values, the logits) are small and not counted. ``floor_tokens_per_s``
is ``batch / (bytes / bandwidth)``; pass the bandwidth ``timing.copy_bandwidth`` measures on the GPU.
``act_bytes`` is the float size (2 for bf16; 4 for the fp32 models a CPU run uses).
"""

from __future__ import annotations

from . import flops

FORMATS = ("bf16", "int8", "int4")


def linear_bytes(d_in: int, d_out: int, fmt: str, group_size: int = 128, act_bytes: int = 2) -> float:
    """Bytes of one ``d_in x d_out`` linear weight stored in ``fmt``, its scales (and zeros) counted."""
    values = d_in * d_out
    if fmt == "bf16":
        return values * act_bytes
    if fmt == "int8":
        return values + d_out * act_bytes  # one scale per output row
    if fmt == "int4":
        return values / 2 + -(-d_in // group_size) * d_out * 2 * act_bytes  # a scale and a zero per group
    raise ValueError(f"fmt={fmt!r}; choose one of {FORMATS}")


def kv_heads_dim(config) -> tuple[int, int]:
    """(key/value heads, head_dim) of ``config``."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return getattr(config, "num_key_value_heads", None) or heads, head_dim


def layer_bytes(config, fmt: str = "bf16", batch: int = 1, context: float = 0, group_size: int = 128,
                act_bytes: int = 2) -> float:
    """Bytes one decoder layer reads per step: its linear weights in ``fmt``, its two norms, and the
    keys and values of ``context`` positions for each of ``batch`` sequences."""
    shapes = flops.linear_shapes(config)[: len(flops.linear_shapes(config)) // config.num_hidden_layers]
    n_kv, head_dim = kv_heads_dim(config)
    weights = sum(linear_bytes(i, o, fmt, group_size, act_bytes) for i, o in shapes)
    return weights + 2 * config.hidden_size * act_bytes + batch * context * 2 * n_kv * head_dim * act_bytes


def head_bytes(config, fmt: str = "bf16", batch: int = 1, group_size: int = 128, act_bytes: int = 2) -> float:
    """Bytes read once per step outside the layers: the LM head in ``fmt``, the final norm and one
    embedding row per sequence (the LM head is a linear layer, quantized like the others)."""
    d, vocab = config.hidden_size, config.vocab_size
    return (linear_bytes(d, vocab, fmt, group_size, act_bytes) + d * act_bytes
            + min(batch, vocab) * d * act_bytes)


def step_bytes(config, batch: int = 1, context: float = 0, fmt: str = "bf16", group_size: int = 128,
               act_bytes: int = 2) -> dict[str, float]:
    """Bytes one decode step reads, by part: ``linear`` (decoder layers' weights), ``lm_head``,
    ``embedding`` (one row per sequence), ``norms``, ``kv_cache``, and their ``total``."""
    layers, d = config.num_hidden_layers, config.hidden_size
    n_kv, head_dim = kv_heads_dim(config)
    parts = {
        "linear": sum(linear_bytes(i, o, fmt, group_size, act_bytes) for i, o in flops.linear_shapes(config)),
        "lm_head": linear_bytes(d, config.vocab_size, fmt, group_size, act_bytes),
        "embedding": min(batch, config.vocab_size) * d * act_bytes,
        "norms": (2 * layers + 1) * d * act_bytes,
        "kv_cache": batch * context * layers * 2 * n_kv * head_dim * act_bytes,
    }
    return {**parts, "total": sum(parts.values())}


def floor_tokens_per_s(config, batch: int, context: float, fmt: str, bandwidth: float,
                       group_size: int = 128, act_bytes: int = 2) -> float:
    """The most tokens/s a decode step can give when it reads ``step_bytes`` at ``bandwidth`` bytes/s."""
    return batch * bandwidth / step_bytes(config, batch, context, fmt, group_size, act_bytes)["total"]


def mean_context(prompt_len: int, new_tokens: int) -> float:
    """The positions a decode step attends, on average, over ``new_tokens`` steps after a prompt of
    ``prompt_len`` (step ``i`` attends ``prompt_len + i + 1``)."""
    return prompt_len + (new_tokens + 1) / 2


def parameter_count(config) -> int:
    """Parameters of a Llama-style ``config``: embeddings (and an untied LM head), layers, norms."""
    d, vocab = config.hidden_size, config.vocab_size
    linear = sum(i * o for i, o in flops.linear_shapes(config))
    head = 0 if getattr(config, "tie_word_embeddings", True) else vocab * d
    return vocab * d + head + linear + (2 * config.num_hidden_layers + 1) * d
