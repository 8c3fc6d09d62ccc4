"""Predicted peak memory per GPU of a training run, before anything runs: ``estimate(Plan(...))``.

The peak is the largest of five moments of a step, each the sum of what is alive then:
- **forward**, at the loss: weights, optimizer state, gradients kept from earlier micro-batches, every
  layer's saved activations, the loss's forward;
- **loss backward**: the same, with the loss's backward instead;
- **backward, last layer**: the activations still all there, the head's and one layer's gradients,
  one layer's backward temporaries (and its recomputation under checkpointing);
- **backward, first layer**: nearly every gradient, one layer's activations and temporaries;
- **optimizer step**: weights, gradients, optimizer state and the step's temporaries (foreach AdamW
  allocates one state-sized tensor; the fused step none).
Activations come from ``measure.activations`` (the model's shape, tensor by tensor), model state from
the parameter count; on CUDA a fixed ``CUDA_WORKSPACE`` covers cuBLAS' and the kernels' workspaces.
No term is fitted to a measurement: ``tests/test_estimate.py`` compares the result with every
committed GPU row and with steps measured on CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch
from transformers import AutoConfig

from ..core import models
from ..core.errors import RecipeError
from . import activations as act
from .predict import NF4_BYTES_PER_PARAM, naive_mp_share
from .step_memory import CUDA_WORKSPACE, Counts, Estimate, moments  # noqa: F401 (re-exported)

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("bf16", "mixed", "fp32")  # bf16 weights | fp32 weights under bf16 autocast | fp32 throughout
STRATEGIES = ("single", "ddp", "fsdp2", "fsdp2-no-reshard", "fsdp2-offload", "deepspeed-zero2",
              "deepspeed-zero3", "naive-mp")
ATTENTIONS = ("sdpa", "flash_attention_2", "eager")
OPTIMIZERS = ("fused", "foreach", "loop", "offload")  # AdamW: fused, foreach, per tensor, torchao offload
NF4_BASES = ("torchao", "bitsandbytes", "torch")  # memory.qlora.BASES: who holds QLoRA's 4-bit base


@dataclass(frozen=True)
class Plan:
    """A training run as the estimate sees it (the defaults are ``recipes train``'s)."""

    model: str = models.DEFAULT_MODEL
    method: str = "lora"
    precision: str = "mixed"
    strategy: str = "single"
    gpus: int = 1
    micro_batch: int = 4
    seq_len: int = 512
    accum_steps: int = 1
    checkpoint_every: int = 0      # 0: none; k: every k-th decoder layer
    offload_activations: bool = False
    chunked_loss: bool = True
    chunk_size: int = 1024
    attention: str = "sdpa"
    packed: bool = True            # packed documents (position_ids) or padding: attention takes a mask
    optimizer: str = "fused"
    lora_r: int = 16
    lora_dropout: float = 0.0
    upcast_fp32: bool = False      # peft's prepare_model_for_kbit_training: embeddings, norms, head in fp32
    ddp_bucket_view: bool = True   # False: DDP's default, a second copy of the gradients in its buckets
    compiled: bool = False         # torch.compile'd decoder layers: Inductor keeps fewer tensors
    nf4_base: str = "torchao"      # QLoRA's base: compiled on torchao's, layers keep dequantized weights
    tile_mlp_tokens: int = 0       # 0: the MLP whole; n: tiled in chunks of n tokens (long_context.tiling)
    rope_positions: int = 0        # 0: the model's position limit; n: RoPE extended to n positions
    device: str = "cuda"

    def check(self) -> Plan:
        """This plan, or one RecipeError naming the bad value and the choices."""
        for key, choices in (("method", METHODS), ("precision", PRECISIONS), ("strategy", STRATEGIES),
                             ("attention", ATTENTIONS), ("optimizer", OPTIMIZERS), ("nf4_base", NF4_BASES)):
            if getattr(self, key) not in choices:
                raise RecipeError(f"{key}={getattr(self, key)!r}; choose one of {', '.join(choices)}")
        for key in ("gpus", "micro_batch", "seq_len", "accum_steps", "chunk_size", "lora_r"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{key}={getattr(self, key)}: a positive whole number")
        for key in ("tile_mlp_tokens", "rope_positions"):
            if getattr(self, key) < 0:
                raise RecipeError(f"{key}={getattr(self, key)}: 0 (off) or a positive whole number of tokens")
        if self.checkpoint_every < 0:
            raise RecipeError(f"checkpoint_every={self.checkpoint_every}: 0 (none) or every k-th layer")
        if self.offload_activations and not self.checkpoint_every:
            raise RecipeError("offload_activations moves the checkpointed layers' inputs: set checkpointing")
        if self.strategy == "single" and self.gpus > 1:
            raise RecipeError(f"strategy=single runs on one GPU, not gpus={self.gpus}: choose ddp or fsdp2")
        return self


def model_config(name: str):
    """The config of a model folder, a hub id (from the HF cache or the hub) or ``random:<shape>``."""
    if name.startswith("random:"):
        shape = name.removeprefix("random:")
        path = models.SHAPES_DIR / f"{shape}.json"
        if not path.exists():
            raise RecipeError(f"unknown shape {shape!r}; known: {models.known_shapes()}")
        fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        return AutoConfig.for_model(**fields)
    try:
        return AutoConfig.from_pretrained(models.resolve(name))
    except (OSError, ValueError) as error:
        raise RecipeError(f"model={name!r}: no config.json could be read ({type(error).__name__}). Give a "
                          f"model folder, a hub id, or random:<shape> with a shape from "
                          f"{models.known_shapes()}.") from None


def layout(plan: Plan, s: act.Shape) -> act.Layout:
    """Which tensors the plan's layers keep, and their sizes (see ``measure.activations``)."""
    compute = 4 if plan.precision == "fp32" else 2
    sharded_mp = plan.strategy.startswith(("fsdp2", "deepspeed"))  # they cast the weights to bf16 themselves
    fp32_residual = compute == 4 or plan.upcast_fp32 or (
        plan.method == "full" and plan.precision == "mixed" and not sharded_mp)
    autocast = compute == 2 and not sharded_mp
    residual = 4 if fp32_residual else 2
    return act.Layout(compute, residual, plan.method == "full", plan.method != "full",
                      plan.method != "full" and autocast and (plan.method == "lora" or plan.upcast_fp32),
                      plan.lora_dropout > 0, plan.lora_r, plan.attention,
                      plan.packed and plan.attention != "flash_attention_2",
                      residual if plan.method == "qlora" else compute, compiled=plan.compiled,
                      tiled_mlp=plan.tile_mlp_tokens > 0)


def _counts(config, s: act.Shape, r: int) -> Counts:
    shapes = [(s.d, s.q), (s.d, s.kv), (s.d, s.kv), (s.q, s.d)]
    shapes += [(s.d, s.ffn), (s.d, s.ffn), (s.ffn, s.d)] if s.gated else [(s.d, s.ffn), (s.ffn, s.d)]
    linear = sum(i * o for i, o in shapes)
    embed = s.vocab * s.d
    other = embed * (1 if getattr(config, "tie_word_embeddings", True) else 2) + s.d
    return Counts(linear + 2 * s.d, linear, other, embed, r * sum(i + o for i, o in shapes) * s.layers)


def _states(plan: Plan, c: Counts, s: act.Shape, config) -> list[act.Term]:
    """Weights, gradients and AdamW state on one GPU, each with its formula."""
    n = c.layer * s.layers + c.other
    base = 4 if plan.precision == "fp32" else 2
    if plan.method == "full":
        w = g = 2 if plan.precision == "bf16" else 4
        o, trainable = 2 * w, n
        if plan.strategy.startswith("deepspeed"):  # bf16 weights; fp32 master and moments in the optimizer
            w, g, o = 2, (2 if plan.strategy == "deepspeed-zero2" else 4), 12
        weights, held = n * w, f"{n:,} parameters x {w} B"
    else:
        nf4 = NF4_BYTES_PER_PARAM if plan.method == "qlora" else base
        rest, rest_bytes = c.other + 2 * s.d * s.layers, 4 if plan.upcast_fp32 else base
        weights = c.linear * s.layers * nf4 + rest * rest_bytes + 4 * c.lora
        held = (f"{c.linear * s.layers:,} linear x {nf4:.3g} B + {rest:,} other x {rest_bytes} B "
                f"+ {c.lora:,} adapters (r={plan.lora_r}) x 4 B")
        trainable, g, o = c.lora, 4, 8
    grads, opt = trainable * g, trainable * o
    share, where = 1.0, ""
    if plan.strategy == "naive-mp":
        share, where = naive_mp_share(config, plan.gpus), " x the first GPU's share"
    elif plan.strategy.startswith(("fsdp2", "deepspeed")):
        share, where = 1 / plan.gpus, f" / {plan.gpus} GPUs"
    weights *= 1 if plan.strategy == "deepspeed-zero2" else share
    grads, opt = grads * share, opt * share
    copies = 2 if plan.strategy == "ddp" and not plan.ddp_bucket_view else 1
    if plan.strategy == "fsdp2-offload":
        weights = grads = opt = 0
    return [act.Term("weights", weights, held + ("" if plan.strategy == "deepspeed-zero2" else where)
                     + (" (on the host)" if plan.strategy == "fsdp2-offload" else "")),
            act.Term("gradients", grads * copies, f"{trainable:,} trainable x {g} B{where}"
                     + (" x 2 (DDP's buckets hold a copy)" if copies == 2 else "")),
            act.Term("AdamW moments", 0 if plan.optimizer == "offload" else opt,
                     f"{trainable:,} trainable x {o} B{where}"
                     + (" (on the host)" if "offload" in (plan.optimizer, plan.strategy[6:]) else ""))]


def estimate(plan: Plan, config=None) -> Estimate:
    """Predicted peak bytes per GPU of ``plan`` (``config``: the model's; None reads ``plan.model``'s)."""
    plan.check()
    config = config or model_config(plan.model)
    s = act.Shape.of(config)
    if plan.seq_len > max(getattr(config, "max_position_embeddings", math.inf), plan.rope_positions):
        raise RecipeError(f"seq_len={plan.seq_len} is over this model's limit of "
                          f"{config.max_position_embeddings} positions: lower it, or extend RoPE first "
                          f"(rope_positions, --rope-positions)")
    if plan.tile_mlp_tokens and not s.gated:
        raise RecipeError(f"tile_mlp_tokens={plan.tile_mlp_tokens}: only a gated MLP (Llama, Qwen, Mistral) "
                          f"is tiled; {config.model_type}'s is not: set it to 0")
    lay = layout(plan, s)
    counts = _counts(config, s, plan.lora_r)
    return moments(plan, s, lay, counts, _states(plan, counts, s, config))


def for_hardware(plan: Plan, hw) -> Plan:
    """``plan`` as the machine ``hw`` (``core.hardware.detect()``) runs it: its device and weights' dtype, and
    the fallbacks: without bitsandbytes a bitsandbytes QLoRA base stays unquantized (torchao's and ours need
    none); on a CPU, AdamW steps one tensor at a time and has no state to offload. On a GPU without bf16 (a
    T4), full fine-tuning keeps fp32 weights under fp16 autocast ("mixed"), while QLoRA's frozen base is held
    in fp16 (``models.load_model``), as many bytes as bf16."""
    if hw.model_dtype == torch.bfloat16:
        precision = plan.precision
    elif hw.amp_dtype is not None:
        precision = "bf16" if plan.method == "qlora" else "mixed"
    else:
        precision = "fp32"
    changes = {"device": hw.device.type, "precision": precision}
    if plan.method == "qlora" and plan.nf4_base == "bitsandbytes" and not hw.bitsandbytes:
        changes["method"] = "lora"
    if not hw.cuda:
        changes["optimizer"] = "loop"
    return replace(plan, **changes).check()


def with_changes(plan: Plan, **changes) -> Plan:
    """``plan`` with ``changes``, checked."""
    return replace(plan, **changes).check()
