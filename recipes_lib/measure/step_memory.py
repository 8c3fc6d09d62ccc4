"""The moments of a training step and what is alive at each: the sums behind ``estimate.estimate``.

Given the model state on one GPU (weights, gradients, AdamW state) and the activation and loss terms
of ``measure.activations``, each moment of the step (see ``estimate``'s docstring) is a sum of parts:
weights (with autocast's bf16 copies of fp32 weights, FSDP2's gathered layers), gradients (kept from
earlier micro-batches, growing during backward, FSDP2's unsharded layer gradients), optimizer state
(with the step's temporaries), activations (saved, recomputed, a layer's backward temporaries) and the
loss, plus a fixed CUDA workspace. The peak is the largest moment. Host memory is counted apart: the
checkpointed layers' inputs that activation offloading keeps there (AdamW's or FSDP2's offloaded state
is not counted in it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import activations as act
from . import loss_memory
from .memory import GiB

CUDA_WORKSPACE = 64 * 2**20  # cuBLAS and cuBLASLt workspaces (32 MiB each on Hopper), in PyTorch's allocator


@dataclass(frozen=True)
class Counts:
    """Parameter counts from the shape."""

    layer: int   # one decoder layer's weights (linears and norms)
    linear: int  # of which in linear layers
    other: int   # embeddings, final norm, an untied head
    embed: int   # vocab x hidden
    lora: int    # adapter parameters over all layers


@dataclass
class Estimate:
    """Predicted bytes per GPU: the peak, its split, every moment's total and the formulas; and the bytes
    of host memory the step holds (offloaded activations), with theirs."""

    plan: object
    peak: float
    moment: str
    parts: dict[str, float]
    moments: dict[str, float]
    formulas: dict[str, list[act.Term]] = field(default_factory=dict)
    host: float = 0.0
    host_formulas: list[act.Term] = field(default_factory=list)

    def gib(self) -> dict[str, float]:
        return {k: v / GiB for k, v in self.parts.items()} | {"peak": self.peak / GiB}


def _scaled(terms: list[act.Term], factor: float, how: str) -> list[act.Term]:
    return [act.Term(t.name, t.value * factor, f"({t.formula}) x {how}") for t in terms if t.value]


def moments(plan, s: act.Shape, lay: act.Layout, c: Counts, states: list[act.Term]) -> Estimate:
    """Every moment's parts for ``plan``; the peak is the largest (see the module docstring). Each part is
    the sum of its formula terms, so the breakdown printed is the one added up."""
    weights, grads, opt = (t.value for t in states)
    n, layers = plan.micro_batch * plan.seq_len, s.layers
    if plan.strategy == "naive-mp":  # the first GPU: the embeddings, the loss and its share of the layers
        layers = -(-s.layers // plan.gpus)
    every, cuda = plan.checkpoint_every, plan.device == "cuda"
    checkpointed = [every > 0 and i % every == 0 for i in range(layers)]
    layer_terms = act.layer_terms(s, lay, plan.seq_len)
    kept = act.checkpointed_layer(s, lay, plan.offload_activations and cuda)  # on a CPU, host = device
    non_layer = act.non_layer_terms(s, lay, plan.chunked_loss, 1 if plan.packed else plan.micro_batch)
    def saving(recomputed: bool) -> act.Term:
        kept_less = act.first_layer_saving(s, lay, recomputed)
        return act.Term(kept_less.name, -kept_less.value, f"-({kept_less.formula})")

    transient = _transient(plan, s, lay, n)

    def tokens(terms, how=""):
        return _scaled(terms, n, f"tokens({n}){how}")

    def layer_set(count, how, terms=layer_terms):
        return _scaled(terms, n * count, f"tokens({n}) x {how}") if count else []

    n_kept, n_ckpt = layers - sum(checkpointed), sum(checkpointed)
    stored = (layer_set(n_kept, f"{n_kept} layers") + _scaled([kept], n * n_ckpt, f"tokens({n}) x {n_ckpt} "
                                                               "checkpointed layers")
              + ([] if checkpointed[0] else tokens([saving(False)])))
    recomputed = act.recomputed_terms(s, lay, plan.seq_len)
    last = layer_set(1, "the last layer, recomputed", recomputed) if checkpointed[-1] else []
    first = (layer_set(1, "the first layer" + (", recomputed" if checkpointed[0] else ""),
                       recomputed if checkpointed[0] else layer_terms)
             + tokens([saving(checkpointed[0])]) + (tokens([kept]) if checkpointed[0] else []))
    if plan.chunked_loss:
        head_bytes = 4 if plan.precision in ("fp32", "mixed") and not _sharded_mp(plan) else 2
        loss = loss_memory.chunked_loss(s, lay, n, plan.chunk_size, plan.method == "full", head_bytes, cuda)
    else:
        loss = loss_memory.full_logits_loss(s, n, lay.compute)

    copies = _weight_copies(plan, s, c, layers, checkpointed)
    kept_grads = grads if plan.accum_steps > 1 or plan.strategy == "ddp" else 0
    if plan.strategy == "ddp" and not plan.ddp_bucket_view and plan.accum_steps == 1:
        kept_grads = grads / 2  # the buckets exist from the start; the .grad copies after the first backward
    grad_bytes = _grad_bytes(plan)
    head_grad = c.embed * grad_bytes if plan.method == "full" else 0
    layer_grad = (c.layer if plan.method == "full" else c.lora / s.layers) * grad_bytes
    unsharded = 0.0
    if plan.strategy.startswith(("fsdp2", "deepspeed")) and plan.precision != "fp32":
        unsharded = head_grad / 2 * (plan.method == "full") + layer_grad / 4 * 6  # bf16 grads + fp32 copy
        head_grad = layer_grad = 0
    step_temp = _optimizer_temporary(plan, opt, c, s)
    workspace = [act.Term("CUDA workspaces", CUDA_WORKSPACE, "cuBLAS/cuBLASLt, 64 MiB")] if cuda else []

    def moment(copy, grad_now, grad_note, activations, loss_terms, temporaries=0.0):
        return {"weights": states[:1] + ([act.Term("copies", copy, _copies_note(plan))] if copy else []),
                "gradients": [act.Term("gradients now", grad_now, f"{states[1].formula} when all exist; "
                                                                    f"now: {grad_note}")],
                "optimizer": states[2:] + ([act.Term("step temporaries", temporaries, "foreach AdamW: one "
                                                     "moment-sized tensor")] if temporaries else []),
                "activations": activations, "loss/logits": [t for t in loss_terms if t.value],
                "workspace": workspace}

    before = "kept from earlier micro-batches" if plan.accum_steps > 1 else (
        "DDP's buckets" if plan.strategy == "ddp" else "none yet")
    table = {
        "forward (at the loss)": moment(copies[0], kept_grads, before, stored + tokens(non_layer),
                                        [loss.held, loss.forward]),
        "loss backward": moment(copies[1], kept_grads, before, stored + tokens(non_layer),
                                [loss.held, loss.backward]),
        "backward, last layer": moment(copies[1], max(kept_grads, head_grad + layer_grad) + unsharded,
                                       "the head's and the last layer's" + (" (unsharded, bf16 and fp32)"
                                                                             if unsharded else ""),
                                       stored + tokens(non_layer[1:]) + last + transient, []),
        "backward, first layer": moment(copies[2], max(grads + unsharded - layer_grad, kept_grads),
                                        "all but the first layer's",
                                        first + transient + tokens(non_layer[1:]), []),
        "optimizer step": moment(0, grads, "all", [], [], step_temp),
    }
    sums = {name: {part: sum(t.value for t in terms) for part, terms in parts.items()}
            for name, parts in table.items()}
    totals = {name: sum(parts.values()) for name, parts in sums.items()}
    peak = max(totals, key=totals.get)
    host = _host(plan, s, lay, n, n_ckpt) if plan.offload_activations and cuda else []
    return Estimate(plan, totals[peak], peak, sums[peak], totals, table[peak],
                    sum(t.value for t in host), host)


def _transient(plan, s: act.Shape, lay: act.Layout, n: int) -> list[act.Term]:
    """One layer's backward temporaries (bytes): its MLP's (a tiled MLP's with one chunk's tensors and its
    weight-gradient sums) or its attention's, whichever is larger."""
    def scaled(term: act.Term) -> act.Term:
        return act.Term(f"{term.name} (one layer)", term.value * n, f"({term.formula}) x tokens({n})")

    mlp = [scaled(act.backward_transient(s, lay, plan.seq_len))]
    if lay.tiled_mlp:
        per_linear = s.d * s.ffn if plan.method == "full" else plan.lora_r * (s.d + s.ffn)  # weight or A + B
        trained = (3 if s.gated else 2) * per_linear
        mlp.append(act.tiled_mlp_backward(s, lay, min(plan.tile_mlp_tokens, n), trained, _grad_bytes(plan)))
    attention = scaled(act.attention_backward(s, lay))
    return [attention] if attention.value > sum(t.value for t in mlp) else mlp


def _host(plan, s: act.Shape, lay: act.Layout, n: int, checkpointed: int) -> list[act.Term]:
    """Pinned host memory of the offloaded checkpointed inputs: CUDA's pinned allocator rounds each block
    up to a power of two, and keeps it cached for the next step."""
    if not checkpointed:
        return []
    block = lay.residual * s.d * n
    pinned = 2 ** math.ceil(math.log2(block))
    return [act.Term("offloaded checkpointed inputs (pinned)", checkpointed * pinned,
                     f"{checkpointed} layers x {lay.residual} x d({s.d}) x tokens({n}) = {block:,} B each, "
                     f"{pinned:,} B pinned (rounded up to a power of two)")]


def _sharded_mp(plan) -> bool:
    return plan.strategy.startswith(("fsdp2", "deepspeed"))


def _grad_bytes(plan) -> int:
    if plan.method != "full":
        return 4
    return 2 if plan.precision == "bf16" or _sharded_mp(plan) else 4


def _weight_copies(plan, s: act.Shape, c: Counts, layers: int, checkpointed: list[bool]):
    """Extra weight bytes at the forward's end, in the last layer's backward and in the first's:
    autocast's cached bf16 copies of fp32 weights, compiled layers' dequantized weights on torchao's NF4
    base (``_dequantized_kept``), or the layers FSDP2 / ZeRO-3 hold gathered."""
    compute = 4 if plan.precision == "fp32" else 2
    if plan.strategy.startswith(("fsdp2", "deepspeed-zero3")):
        if plan.method == "qlora":
            layer = c.linear * 0.5 + (2 * s.d + c.lora / s.layers) * compute
        else:
            layer = (c.layer + (c.lora / s.layers if plan.method == "lora" else 0)) * compute
        root = c.other * compute
        if plan.strategy == "fsdp2-no-reshard":
            return root + s.layers * layer, root + s.layers * layer, root + layer
        return root, root + 2 * layer, root + layer
    dequantized = _dequantized_kept(plan, s, c, checkpointed)
    if plan.precision == "fp32" or plan.strategy.startswith("deepspeed"):
        return dequantized
    # A tiled MLP's linears run without autograd in forward: autocast caches their copies until the forward
    # ends, but backward keeps none (it casts again, one chunk at a time).
    tiled = _tiled_mlp_linears(plan, s)  # linears of the MLP, untiled: none
    if plan.method != "full":  # fp32 adapters' bf16 copies; an upcast fp32 head's, kept with full logits
        head = 2 * c.embed if plan.upcast_fp32 else 0
        kept = 2 * (c.lora - tiled * plan.lora_r * (s.d + s.ffn) * s.layers)
        at_end, in_last, in_first = dequantized
        return 2 * c.lora + head + at_end, kept + (0 if plan.chunked_loss else head) + in_last, in_first
    if plan.precision != "mixed":
        return 0, 0, 0
    kept_layers = sum(not ck for ck in checkpointed)
    head, kept = c.embed * 2, 2 * (c.linear - tiled * s.d * s.ffn) * kept_layers
    return 2 * c.linear * layers + head, kept + (0 if plan.chunked_loss else head), 0


def _keeps_dequantized(plan) -> bool:
    """Compiled QLoRA layers on torchao's NF4 base: they keep their weights dequantized for backward."""
    return plan.method == "qlora" and plan.compiled and plan.nf4_base == "torchao"


def _tiled_mlp_linears(plan, s: act.Shape) -> int:
    """How many of a layer's linears run without autograd, in a tiled MLP (keeping no weight copies): 0
    where the MLP is whole."""
    return (3 if s.gated else 2) * bool(plan.tile_mlp_tokens)


def _dequantized_kept(plan, s: act.Shape, c: Counts, checkpointed: list[bool]) -> tuple[float, float, float]:
    """A compiled layer on torchao's NF4 base keeps its weights dequantized to the compute dtype for backward
    (the min-cut partitioner saves the dequantized weight rather than recompute the NF4 lookup); the first
    layer, whose input needs no gradient, keeps o's and the MLP's only. At the forward's end, in the last
    layer's backward and in the first's; a checkpointed layer's recompute is not modelled (none)."""
    if not _keeps_dequantized(plan):
        return 0, 0, 0
    compute, mlp = 4 if plan.precision == "fp32" else 2, _tiled_mlp_linears(plan, s) * s.d * s.ffn
    layer, first = (c.linear - mlp) * compute, (c.linear - mlp - s.d * (s.q + 2 * s.kv)) * compute
    kept = [0 if ck else (first if i == 0 else layer) for i, ck in enumerate(checkpointed)]
    return sum(kept), sum(kept), kept[0]


def _optimizer_temporary(plan, opt: float, c: Counts, s: act.Shape) -> float:
    if plan.optimizer == "foreach" and not plan.strategy.startswith("deepspeed"):
        return opt / 2  # torch's foreach AdamW: sqrt(exp_avg_sq) for every parameter at once
    if plan.optimizer == "loop" and plan.method == "full":
        return opt / 2 * c.embed / (c.layer * s.layers + c.other)  # one tensor at a time: the largest
    return 0


def _copies_note(plan) -> str:
    if plan.strategy.startswith(("fsdp2", "deepspeed-zero3")):
        return "gathered root (embeddings, norm) and decoder layers in the compute dtype"
    if _keeps_dequantized(plan):
        copies = "" if plan.precision == "fp32" else "autocast's bf16 copies of the fp32 adapters, and "
        return copies + ("the compiled layers' dequantized NF4 weights (not checkpointed ones'), "
                         "kept for backward")
    return "autocast's bf16 copies of the fp32 weights, kept for backward"
