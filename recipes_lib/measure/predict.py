"""Predicted bytes of model state (weights, gradients, optimizer) per GPU, before anything runs.
"""

from __future__ import annotations

from ..core.errors import RecipeError
from .flops import gated_mlp, linear_shapes, widths

NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks


def qlora_state_bytes(config, r: int | None, weight_bytes: int) -> dict[str, float]:
    """Parameters, gradients and AdamW state predicted from the config alone.

    Full fine-tuning (``r=None``): every weight in ``weight_bytes``, a gradient of the same size,
    and two AdamW moments of the same dtype. QLoRA: NF4 decoder linears, the rest in ``weight_bytes``,
    fp32 adapters with fp32 gradients and two fp32 moments.

    Each takes its own ``weight_bytes``: full fine-tuning's weights are in ``hw.model_dtype``, QLoRA's
    unquantized ones in ``qlora.unquantized_dtype(hw)``, and on a T4 the two differ (fp32, fp16).
    """
    shapes = linear_shapes(config)
    n_linear = sum(i * o for i, o in shapes)
    n_embed = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    n_norm = config.hidden_size * (2 * config.num_hidden_layers + 1)
    if r is None:
        n = n_linear + n_embed + n_norm
        return {"parameters": n * weight_bytes, "gradients": n * weight_bytes,
                "optimizer": 2 * n * weight_bytes}
    n_lora = r * sum(i + o for i, o in shapes)
    params = n_linear * NF4_BYTES_PER_PARAM + (n_embed + n_norm) * weight_bytes + n_lora * 4
    return {"parameters": params, "gradients": n_lora * 4, "optimizer": n_lora * 8}


def naive_mp_share(config, n_devices: int) -> float:
    """Share of a model's parameters on the fullest GPU of ``split_across_devices``: the first, which
    holds the embeddings, the final norm and the LM head beside its ``ceil(layers / n_devices)`` layers."""
    d, layers = config.hidden_size, config.num_hidden_layers
    per_layer = sum(i * o for i, o in linear_shapes(config)) / layers + 2 * d  # + its two norms
    embed = config.vocab_size * d * (1 if config.tie_word_embeddings else 2) + d
    first = embed + per_layer * -(-layers // n_devices)
    return first / (embed + per_layer * layers)


# Bytes per parameter of (weights, gradients, optimizer state) one rank holds, and whether each is
# sharded over the ranks. fp32 master weights throughout: bf16 compute is autocast (one process,
# DDP) or FSDP2's MixedPrecisionPolicy (bf16 all-gathers, fp32 shards); DeepSpeed's bf16 mode keeps
# bf16 weights in the model and the fp32 master copy inside its optimizer (ZeRO paper: 2 + 2 + 12).
STATE_LAYOUT = {
    "single": ((4, 4, 8), (False, False, False)),
    # DDP as parallel.ddp wraps it (gradient_as_bucket_view=True): each .grad is a view into its
    # all-reduce bucket, so the gradients are held once. (DDP's default keeps a second copy in the
    # buckets: 4 + 4 bytes of gradients per parameter.)
    "ddp": ((4, 4, 8), (False, False, False)),
    "fsdp2": ((4, 4, 8), (True, True, True)),
    "fsdp2-no-reshard": ((4, 4, 8), (True, True, True)),
    "fsdp2-offload": ((4, 4, 8), (True, True, True)),
    # Measured on 2 H200s (DeepSpeed 0.19.8, bf16): ZeRO-2 keeps its gradient partitions in bf16, ZeRO-3
    # in fp32.
    "deepspeed-zero2": ((2, 2, 12), (False, True, True)),
    "deepspeed-zero3": ((2, 4, 12), (True, True, True)),
    "naive-mp": ((4, 4, 8), (False, False, False)),  # per GPU: times naive_mp_share
}


def strategy_state_bytes(n_params: int, strategy: str, world_size: int) -> dict[str, int]:
    """Bytes of model state one rank holds: weights, gradients and AdamW state (``STATE_LAYOUT``).

    Activations and FSDP2's gathered layers come on top. ``fsdp2-offload`` holds its shards in host
    memory, none on the GPU. QLoRA's state: ``qlora_state_bytes``, divided by the ranks.
    """
    if strategy not in STATE_LAYOUT:
        raise RecipeError(f"strategy={strategy!r}; one of {', '.join(STATE_LAYOUT)}")
    (weight, grad, opt), sharded = STATE_LAYOUT[strategy]
    shares = [1 / world_size if s else 1.0 for s in sharded]
    state = {"parameters": round(n_params * weight * shares[0]),
             "gradients": round(n_params * grad * shares[1]),
             "optimizer": round(n_params * opt * shares[2])}
    state["total"] = sum(state.values())
    state["on device"] = 0 if strategy == "fsdp2-offload" else state["total"]
    return state


def predicted_run_state(result: dict, config, lora_r: int = 16) -> dict[str, float]:
    """Predicted weights, gradients and AdamW state on one GPU for a ``run`` result of the training script.

    Picks the model for the result's strategy: ``strategy_state_bytes`` for the full-weight
    strategies, the first (fullest) GPU's share for naive model parallelism, and QLoRA's count
    (``qlora_state_bytes``, 4-bit linears, the rest in the compute dtype) over the ranks for
    FSDP-QLoRA. ``config`` is the model's config (QLoRA and naive model parallelism count by layer).
    The GPUs a naive model-parallel run spread over: ``result["gpus"]`` if set, else one per entry
    of its ``device_peaks``.
    """
    gpus = result.get("gpus") or len(result.get("device_peaks") or ()) or 1
    strategy, world = result["strategy"], max(result["world_size"], gpus)
    if strategy == "naive-mp":
        share = naive_mp_share(config, world)
        return {k: v * share for k, v in strategy_state_bytes(result["n_params"], "naive-mp", 1).items()}
    if strategy != "fsdp2-qlora":
        return strategy_state_bytes(result["n_params"], strategy, world)
    weight_bytes = 2 if result.get("bf16") else 4  # embeddings and norms stay in the model's dtype
    state = {k: v / world for k, v in qlora_state_bytes(config, lora_r, weight_bytes).items()}
    return state | {"total": sum(state.values()), "on device": sum(state.values())}


def layer_activation_elements(config) -> int:
    """Elements per token one decoder layer saves for backward (bf16-sized, fused attention).

    Two norms (input and output each), q and k after RoPE, v, the attention output, and the MLP:
    gate, up, their activation and product for a gated MLP, else up and its activation.
    """
    d, q, kv, ffn = widths(config)
    return 4 * d + 2 * q + 2 * kv + (4 if gated_mlp(config) else 2) * ffn


def checkpointing_activation_cut(config) -> float:
    """Share of the layers' activations full checkpointing removes, predicted from the shape.

    Without it, ``L`` layers keep ``A`` elements per token each; with it each keeps its input (``d``) and
    one layer at a time is recomputed in backward: ``1 - (L * d + A) / (L * A)``. The LM head's and
    the loss's activations are not counted: they make the measured cut a little smaller.
    """
    layers, per_layer = config.num_hidden_layers, layer_activation_elements(config)
    return 1 - (layers * config.hidden_size + per_layer) / (layers * per_layer)
