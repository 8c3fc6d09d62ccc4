"""What each notebook's profile computes and moves, roughly: the work behind the runtime each states.

``notebook.state_runtime(P, *workload.notebook01(P, config))`` prints how long that work takes at the
datasheet rates of the profile's GPU class (a T4 for the ``t4`` profile), the figure the small
classes' profiles are sized by. Counts are of the dominant loops only, each named below; model
loading, compilation and Python overheads are not in them.
"""

from __future__ import annotations

import itertools

from . import decode_floor, decode_sweep, flops


def weight_bytes(config, bytes_per_value: int = 2) -> float:
    """Bytes of the model's weights (``decode_floor.parameter_count``) at ``bytes_per_value`` each."""
    return bytes_per_value * decode_floor.parameter_count(config)


def notebook01(P: dict, config) -> tuple[float, float]:
    """About 30 training configurations (the ladder, the speed rows, issue 18's levers and QLoRA
    candidates), each 1-3 warm-up steps, ``steps`` timed steps, a memory step and 2 profiled steps of
    ``micro_batch`` rows of ``seq_len`` tokens (recomputation counted as a fifth more), each step
    reading the weights three times (forward, backward, recompute). Compiling is host time, not counted."""
    steps = 30 * (P["steps"] + 5)
    tokens = steps * P["micro_batch"] * P["seq_len"]
    training = tokens * 1.2 * flops.training_flops_per_token(config, P["seq_len"])
    return training, steps * 3 * weight_bytes(config)


def notebook02(P: dict, config, data_params: int, on_gpus: bool) -> tuple[float, float]:
    """Sections 1-3 on one process per GPU (about 10 scale runs of ``steps + warmup`` steps of
    ``micro_batch x accum`` rows; nothing on a GPU when they run on the CPU), and section 4's two
    pipelines training the embedded model (``data_params`` parameters)."""
    scale = 10 * (P["steps"] + P["warmup"]) * P["micro_batch"] * P["accum"] * P["seq_len"]
    dist = scale * flops.training_flops_per_token(config, P["seq_len"]) if on_gpus else 0.0
    D = P["data"]
    return dist + 2 * D["steps"] * D["batch"] * D["seq_len"] * 6 * data_params, 0.0


def decode_sweep_work(S: dict) -> tuple[float, float]:
    """``decode_sweep.run(**S)``: for each shape, depth, format and batch, ``repeats`` timed and 2 warm-up
    calls, each a prefill of ``prompt_len`` tokens and ``new_tokens`` decode steps (2 FLOPs per parameter
    per token), each step reading ``decode_floor.step_bytes`` in that format (bf16 activations). Skipped
    rows (no kernel, no room) are counted too: the figure is the most the sweep can do."""
    calls, context = S["repeats"] + 2, decode_floor.mean_context(S["prompt_len"], S["new_tokens"])
    flops_done = bytes_read = 0.0
    for shape in S["shapes"]:
        for layers in decode_sweep.depths_of(decode_sweep.shape_config(shape), S["depth_fractions"]):
            config = decode_sweep.shape_config(shape, layers)
            for fmt, batch in itertools.product(S["formats"], S["batches"]):
                tokens = calls * batch * (S["prompt_len"] + S["new_tokens"])
                flops_done += 2 * decode_floor.parameter_count(config) * tokens
                step = decode_floor.step_bytes(config, batch, context, fmt)["total"]
                bytes_read += calls * S["new_tokens"] * step
    return flops_done, bytes_read


def notebook03(P: dict, config) -> tuple[float, float]:
    """Decoding reads the weights once per step: about 10 models or kernels at each batch size,
    ``repeats`` x (``new_tokens`` + 1) steps, after a prompt of ``prompt_len`` (2 FLOPs per weight per
    token). Healing trains the GPT-2 model of section 4 (1024 tokens a row). The size sweep
    (``decode_sweep_work(P["sweep"])``) decodes its shapes the same way. Distilling the embedded
    models costs little beside them."""
    weights = weight_bytes(config)
    decode_steps = 10 * len(P["batches"]) * P["repeats"] * (P["new_tokens"] + 1)
    prefill = 10 * sum(P["batches"]) * P["repeats"] * P["prompt_len"] * weights  # 2 FLOPs x values
    gpt2 = P["e2e_norm_shape"] or dict(n_layer=2, n_embd=256)
    heal = P["heal_steps"] * P["heal_batch"] * 1024 * 6 * 12 * gpt2["n_layer"] * gpt2["n_embd"] ** 2
    sweep_flops, sweep_bytes = decode_sweep_work(P["sweep"])
    return prefill + heal + sweep_flops, decode_steps * weights + sweep_bytes


def notebook04(P: dict, config) -> tuple[float, float]:
    """The ladder's probes (6 rungs x 3 steps at each doubling length up to ``ladder_limit`` or the model's
    position limit, and one rung up to ``rope_positions``, recomputation counted; one more step at the
    longest of those, profiled for the step-time split), the kernel timings
    (about 20 forward+backward calls per length), the curriculum's two runs of its small model, and the
    long-context fine-tune of the embedded model (about 3.3M parameters, rows of 1024 tokens)."""
    limit = min(P["ladder_limit"], config.max_position_embeddings)
    short = [n for n in (P["ladder_start"] * 2**i for i in range(24)) if n <= limit]
    long = [n for n in (P["ladder_start"] * 2**i for i in range(24)) if n <= max(limit, P["rope_positions"])]
    steps = [(6, n) for n in short] + [(1, n) for n in long]
    steps_at = [(rungs * 3, n) for rungs, n in steps] + [(1, long[-1])]  # (+ the profiled step)
    ladder = sum(k * 1.33 * n * flops.training_flops_per_token(config, n) for k, n in steps_at)
    attention = sum(20 * flops.attention_flops(n, P["attn_heads"], P["head_dim"], backward=True)
                    for n in P["attn_lengths"])
    C, K = P["curriculum"], P["long_kv"]
    small = 12 * C["model"].get("hidden_size", 512) ** 2 * C["model"].get("num_hidden_layers", 8)
    curriculum = 2 * C["steps"] * C["tokens_per_step"] * 6 * small
    finetune = K["steps"] * K["batch"] * 1024 * 6 * 3.3e6
    weight_reads = sum(k * 3 for k, _ in steps_at) * weight_bytes(config)
    return ladder + attention + curriculum + finetune, weight_reads
