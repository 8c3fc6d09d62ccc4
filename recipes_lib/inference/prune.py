"""A narrower, shallower student cut out of its teacher by structured pruning (Minitron-style).

``decode_cost.choose_student`` picks a student shape (depth and key/value heads; the width follows the
heads) for a large teacher. ``scaled_shape`` carries that shape's fractions over to a small teacher,
and ``prune_student`` cuts a student of that shape out of the teacher, so distillation starts from
the teacher's own weights rather than from random ones (Muralidharan et al., 2024, "Compact Language
Models via Pruning and Knowledge Distillation").

What to keep is ranked by the activations the teacher produces on a few calibration batches (forward
hooks, no gradients), each a mean over the batches' real (unpadded) tokens:

- residual-stream channels: the mean |x| at the input of every RMSNorm (every layer's two norms and the
  final one), summed; the channels kept are cut from the embeddings, every projection, every norm and
  the LM head;
- attention: per kept layer, the L2 norm of each key/value head's group (the key/value head and the
  query heads that share it) at the input of ``o_proj``; whole groups are kept, so the query/key-value
  head ratio and ``head_dim`` stay;
- MLP: per kept layer, the mean |act_fn(gate) * up| of each neuron (the input of ``down_proj``).

An RMSNorm of the student divides by the RMS of the kept channels only, which the kept (largest)
channels make larger than the teacher's. ``rescale_norms=True`` scales each norm's weight by the ratio
of the two RMS measured on the calibration batches; it is off by default, since on the embedded teacher
it made every width-pruned start's loss worse (for 2 layers and 2 of 4 key/value heads, 11.4 instead of
9.6 nats per token; the teacher's is 1.4).

Depth is cut as ``distill.make_student`` cuts it: evenly spaced teacher layers (``distill.layer_map``).
With as many key/value heads as the teacher, nothing is cut in width and the student is exactly
``make_student``'s depth-only copy.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import RecipeError
from ..measure import decode_cost, decode_floor, decode_sweep
from . import distill

_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                "post_attention_layernorm")


def _get(config_or_dict, key: str):
    return config_or_dict[key] if isinstance(config_or_dict, dict) else getattr(config_or_dict, key)


def scaled_shape(choice, teacher_big_config, small_teacher_config) -> tuple[int, int]:
    """(layers, key/value heads) for ``small_teacher_config``: the fractions of ``teacher_big_config``'s
    depth and key/value heads that ``choice`` (a student config, or ``decode_sweep.analyse``'s
    ``student`` dict) has, rounded half up, at least 1 and at most the small teacher's."""
    depth = _get(choice, "layers" if isinstance(choice, dict) else "num_hidden_layers")
    fractions = (depth / teacher_big_config.num_hidden_layers,
                 _get(choice, "num_key_value_heads") / teacher_big_config.num_key_value_heads)
    small = (small_teacher_config.num_hidden_layers, small_teacher_config.num_key_value_heads)
    return tuple(min(n, max(1, math.floor(f * n + 0.5))) for f, n in zip(fractions, small))


def _check_llama(teacher) -> None:
    needed = ["model.embed_tokens", "model.norm", "lm_head", *(f"model.layers.0.{p}" for p in _LAYER_PARTS)]
    missing = [name for name in needed if not _has(teacher, name)]
    if missing:
        raise RecipeError(f"prune_student handles Llama-family models (LlamaForCausalLM: embed_tokens, "
                          f"layers of q/k/v/o_proj, gate/up/down_proj and two RMSNorms, a final norm, "
                          f"lm_head); {type(teacher).__name__} has no {', '.join(missing)}: use "
                          f"distill.make_student for a depth-only student")


def _has(module, dotted: str) -> bool:
    for name in dotted.split("."):
        module = getattr(module, name, None)
    return module is not None


def importance(teacher, calibration_batches, layers: list[int]) -> dict:
    """Activation-based importance on ``calibration_batches``: ``hidden`` [hidden_size] (residual
    channels), and per teacher layer in ``layers``, ``groups`` [kv_heads] and ``neurons`` [ffn]."""
    _check_llama(teacher)
    n_kv = decode_floor.kv_heads_dim(teacher.config)[0]
    sums: dict = {"hidden": 0.0, "squares": {}, "groups": dict.fromkeys(layers, 0.0),
                  "neurons": dict.fromkeys(layers, 0.0)}
    real = {}  # the current batch's real tokens (attention mask), flattened

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[real["mask"]].float()

    def norm_hook(name):
        def hook(module, args):
            x = tokens(args[0])
            sums["hidden"] = sums["hidden"] + x.abs().sum(0)
            sums["squares"][name] = sums["squares"].get(name, 0.0) + x.square().sum(0)
        return hook

    def group_hook(index):
        def hook(module, args):
            x = tokens(args[0])
            sums["groups"][index] = sums["groups"][index] + x.reshape(len(x), n_kv, -1).norm(dim=-1).sum(0)
        return hook

    def neuron_hook(index):
        def hook(module, args):
            sums["neurons"][index] = sums["neurons"][index] + tokens(args[0]).abs().sum(0)
        return hook

    blocks = teacher.model.layers
    norms = {f"model.layers.{i}.{n}": getattr(layer, n) for i, layer in enumerate(blocks)
             for n in ("input_layernorm", "post_attention_layernorm")} | {"model.norm": teacher.model.norm}
    handles = [m.register_forward_pre_hook(norm_hook(name)) for name, m in norms.items()]
    handles += [blocks[i].self_attn.o_proj.register_forward_pre_hook(group_hook(i)) for i in layers]
    handles += [blocks[i].mlp.down_proj.register_forward_pre_hook(neuron_hook(i)) for i in layers]
    was_training, count, device = teacher.training, 0, next(teacher.parameters()).device
    teacher.eval()
    try:
        with torch.no_grad():
            for batch in calibration_batches:
                ids, mask = batch["input_ids"].to(device), batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                real["mask"] = mask.reshape(-1).bool()
                count += int(real["mask"].sum())
                teacher(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
    if count == 0:
        raise RecipeError("the calibration batches hold no real token: pass a few batches of text")
    return {"hidden": sums["hidden"] / count, "squares": {k: s / count for k, s in sums["squares"].items()},
            "groups": {i: s / count for i, s in sums["groups"].items()},
            "neurons": {i: s / count for i, s in sums["neurons"].items()}}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in their original order (ties: the lower index)."""
    order = torch.sort(-scores.cpu(), stable=True).indices[:k]
    return order.sort().values


def _rows(groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """The rows of a projection that belong to ``groups`` of ``per_group`` rows each."""
    return (groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)


def prune_student(teacher, layers: int, kv_heads: int, calibration_batches, seed: int = 0,
                  rescale_norms: bool = False):
    """A model of ``teacher``'s class shaped ``decode_cost.student_config(teacher.config, layers,
    kv_heads)``, its weights cut from the teacher's most important channels, heads and neurons on
    ``calibration_batches`` (see the module docstring). Returns it in the teacher's device and dtype.

    Raises:
        RecipeError: for a model that is not Llama-shaped, or a student not smaller than its teacher.
    """
    _check_llama(teacher)
    t_config = teacher.config
    n_kv, head_dim = decode_floor.kv_heads_dim(t_config)
    config = decode_cost.student_config(t_config, layers, kv_heads)
    if not (1 <= layers <= t_config.num_hidden_layers and 1 <= kv_heads <= n_kv) \
            or config.hidden_size > t_config.hidden_size:
        raise RecipeError(f"a student of {layers} layers and {kv_heads} key/value heads does not fit in its "
                          f"teacher ({t_config.num_hidden_layers} layers, {n_kv} key/value heads)")
    kept = distill.layer_map(t_config.num_hidden_layers, layers)
    score = importance(teacher, calibration_batches, sorted(set(kept)))
    student = distill.build_student(teacher, config, seed)
    hidden = _top(score["hidden"], config.hidden_size)
    q_per_kv = t_config.num_attention_heads // n_kv
    cuts = {}  # student layer -> (query rows, key/value rows, MLP neurons) of its teacher layer
    for s, t in enumerate(kept):
        groups = _top(score["groups"][t], kv_heads)
        cuts[s] = (_rows(groups, q_per_kv * head_dim), _rows(groups, head_dim),
                   _top(score["neurons"][t], config.intermediate_size))
    t_state, state = teacher.state_dict(), {}
    for key in student.state_dict():
        source, index = key, None
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            source = f"model.layers.{kept[int(index)]}.{rest}"
        if source not in t_state:
            raise RecipeError(f"cannot prune {type(teacher).__name__}: the student's {key} has no "
                              f"teacher weight")
        state[key] = _slice(key, t_state[source], hidden, cuts.get(int(index)) if index else None)
        squares = score["squares"].get(source.removesuffix(".weight"))
        if rescale_norms and squares is not None and len(hidden) < len(squares):
            # the norm now divides by the RMS of the kept channels only: scale it back to the teacher's
            state[key] = state[key] * (squares[hidden].mean() / squares.mean()).sqrt().to(state[key].dtype)
    student.load_state_dict(state)
    return student


def _slice(key: str, weight: torch.Tensor, hidden: torch.Tensor, cut) -> torch.Tensor:
    """``weight`` cut to the kept residual channels and, in a layer, its kept heads' rows and neurons."""
    hidden = hidden.to(weight.device)
    name = key.rsplit(".", 2)[-2] if key.endswith((".weight", ".bias")) else key
    is_bias = key.endswith(".bias")
    if cut is None:  # embeddings, final norm, LM head: the residual channels are their last dimension
        if name in ("embed_tokens", "lm_head", "norm"):
            return weight.index_select(-1, hidden).clone()
        raise RecipeError(f"cannot prune a weight named {key}: prune_student handles Llama-family models")
    q_rows, kv_rows, neurons = (c.to(weight.device) for c in cut)
    outputs = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "gate_proj": neurons,
               "up_proj": neurons, "o_proj": hidden, "down_proj": hidden, "input_layernorm": hidden,
               "post_attention_layernorm": hidden, "q_norm": None, "k_norm": None}
    inputs = {"o_proj": q_rows, "down_proj": neurons}
    if name not in outputs:
        raise RecipeError(f"cannot prune a weight named {key}: prune_student handles Llama-family models")
    if outputs[name] is None:  # per-head norms (Qwen3): head_dim is kept whole
        return weight.clone()
    weight = weight.index_select(0, outputs[name])
    if weight.dim() == 2 and not is_bias:
        weight = weight.index_select(1, inputs.get(name, hidden))
    return weight.clone()


def student_from_choice(teacher, analysis: dict, calibration_batches, fallback_layers: int):
    """The student to distil and a line saying what it is: pruned to ``scaled_shape`` of ``analysis``'s
    ``student`` (``decode_sweep.analyse``) when it chose one; else, saying why, ``make_student``'s
    ``fallback_layers``-layer depth-only copy."""
    choice, why = analysis.get("student", "no bf16 batch-1 cost model"), None
    if isinstance(choice, dict):
        big = decode_sweep.shape_config(analysis["largest"])
        layers, kv = scaled_shape(choice, big, teacher.config)
        try:
            student = prune_student(teacher, layers, kv, calibration_batches)
        except RecipeError as error:
            why = str(error)
        else:
            return student, (f"chosen for {analysis['largest']}: {choice['layers']} of "
                             f"{big.num_hidden_layers} layers, {choice['num_key_value_heads']} of "
                             f"{big.num_key_value_heads} key/value heads (hidden {choice['hidden_size']}, "
                             f"MLP {choice['intermediate_size']}); "
                             f"scaled down: {layers} of {teacher.config.num_hidden_layers} layers, {kv} of "
                             f"{teacher.config.num_key_value_heads} key/value heads (hidden "
                             f"{student.config.hidden_size}, MLP {student.config.intermediate_size}), pruned")
    student = distill.make_student(teacher, fallback_layers)
    return student, (f"no chosen shape ({why or choice}): depth-only student, {fallback_layers} layers from "
                     f"teacher layers {distill.layer_map(teacher.config.num_hidden_layers, fallback_layers)}")


def speed_models(analysis: dict, hw, fallback) -> dict:
    """``{"teacher (L layers, d=D)": model, "student (...)": model}`` to time: the size sweep's largest
    shape and the student shape ``analysis`` (``decode_sweep.analyse``) chose for it, random weights
    (``decode_sweep.build``); without a chosen shape, the pair ``fallback()`` returns."""
    choice = analysis.get("student")
    if isinstance(choice, dict):
        big = decode_sweep.shape_config(analysis["largest"])
        student = decode_cost.student_config(big, choice["layers"], choice["num_key_value_heads"])
        pair = decode_sweep.build(big, hw), decode_sweep.build(student, hw)
    else:
        pair = fallback()
    return {f"{role} ({m.config.num_hidden_layers} layers, d={m.config.hidden_size})": m
            for role, m in zip(("teacher", "student"), pair)}
