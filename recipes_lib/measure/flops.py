"""FLOP counts: training FLOPs per token (causal attention counted as half), attention FLOPs, MFU.
"""

from __future__ import annotations

NON_GATED_MLP = ("gpt_neox", "gpt2", "gptj", "gpt_bigcode", "phi", "opt", "falcon", "bloom", "mpt",
                 "starcoder2")
FUSED_QKV = ("gpt_neox", "gpt_bigcode", "falcon", "bloom", "mpt")  # one query_key_value linear


def gated_mlp(config) -> bool:
    """True for a gated MLP (Llama's SwiGLU: gate, up, down), False for a plain up-activation-down one."""
    return config.model_type not in NON_GATED_MLP


def widths(config) -> tuple[int, int, int, int]:
    """``(hidden, query, key/value, ffn)`` output widths of a decoder layer's projections."""
    d = config.hidden_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or d // n_heads
    ffn = getattr(config, "intermediate_size", None) or 4 * d
    return d, n_heads * head_dim, n_kv * head_dim, ffn


def linear_shapes(config) -> list[tuple[int, int]]:
    """(d_in, d_out) of each decoder linear layer: q, k, v (or one fused qkv), o, then gate, up, down
    (up, down if not gated)."""
    d, q, kv, ffn = widths(config)
    attention = [(d, q + 2 * kv)] if config.model_type in FUSED_QKV else [(d, q), (d, kv), (d, kv)]
    mlp = [(d, ffn), (d, ffn), (ffn, d)] if gated_mlp(config) else [(d, ffn), (ffn, d)]
    return [*attention, (q, d), *mlp] * config.num_hidden_layers


def training_flops_per_token(config, seq_len: int, trainable_fraction: float = 1.0) -> float:
    """Model FLOPs per trained token: ``6N`` for the weights plus causal attention (no recomputation).

    Attention counts the query-key pairs a causal mask keeps, about half of ``T**2`` (``attention_flops``,
    the formula the attention benchmarks use), times 3 for forward and backward, as the weights are:
    ``6 L h d_h (T + 1)`` per token, half of PaLM's non-causal ``12 L h d_h T``. With a frozen base
    (LoRA), weight gradients of frozen matrices are skipped, so the base costs ``4N`` (forward 2N +
    input gradients 2N) and only the trainable fraction costs ``6N``.
    """
    d, layers, n_heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // n_heads
    n_matmul = sum(i * o for i, o in linear_shapes(config)) + config.vocab_size * d  # + the LM head
    weights = n_matmul * (4 + 2 * trainable_fraction)
    attention = layers * 3 * attention_flops(seq_len, n_heads, head_dim) / seq_len
    return weights + attention


def scaled_step_seconds(config, seq_len: int, measured_len: int, measured_seconds: float) -> float:
    """A batch-1 step's seconds at ``seq_len`` from one measured at ``measured_len``, in proportion to their
    model FLOPs (the weights' linear term and causal attention's quadratic one, ``training_flops_per_token``):
    the measured step's MFU carried over to the other length."""
    def work(n: int) -> float:
        return n * training_flops_per_token(config, n)

    return measured_seconds * work(seq_len) / work(measured_len)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None if the peak is unknown)."""
    if not peak_flops:
        return None
    return tokens_per_second * flops_per_token / peak_flops


def attention_flops(seq_len: int, heads: int, head_dim: int, window: int | None = None,
                    backward: bool = False) -> float:
    """Matmul FLOPs of causal (or windowed) attention over ``seq_len`` tokens: 4 * pairs * head_dim per head.

    ``pairs`` are the query-key pairs the mask keeps (about half of ``seq_len**2`` when causal). With
    ``backward`` the count is what a fused kernel executes: the backward recomputes the scores, so
    forward + backward is 3.5 forwards (FlashAttention's convention).
    """
    window = None if window is None or window >= seq_len else window
    pairs = seq_len * (seq_len + 1) / 2 if window is None else seq_len * window - window * (window - 1) / 2
    forward = 4 * pairs * head_dim * heads
    return forward * (3.5 if backward else 1.0)
