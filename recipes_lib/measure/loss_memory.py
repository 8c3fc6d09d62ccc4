"""Memory of the loss of one training micro-batch: what it keeps from forward into backward, and what it
holds at the forward's and the backward's peak, for our chunked loss and for full logits (the companion of
``measure.activations``, which counts the decoder layers)."""

from __future__ import annotations

from dataclasses import dataclass

from .activations import Layout, Shape, Term


@dataclass(frozen=True)
class LossMemory:
    """Bytes of the loss: kept from its forward into its backward (``held``), and the extra at the
    forward's and at the backward's peak (``forward``, ``backward``)."""

    held: Term
    forward: Term
    backward: Term


def chunked_loss(s: Shape, lay: Layout, tokens: int, chunk: int, head_trainable: bool,
                 head_bytes: int, kernel_temporaries: bool = True) -> LossMemory:
    """``core.losses.linear_cross_entropy``: one chunk's logits at a time; the hidden states' gradient
    and (trained head) the head's fp32 gradient, computed in forward and kept for backward.

    ``kernel_temporaries``: count logsumexp's internal ``x - max`` (CUDA's allocator sees it; the CPU
    ``AllocationTracker``, which counts the outputs of operators, does not)."""
    c, v, d, r = min(chunk, tokens), s.vocab, s.d, lay.residual
    weight = 4 * v * d if head_trainable else 0
    held = Term("hidden-state gradient" + (" + head gradient in fp32" if head_trainable else ""),
                r * tokens * d + weight, f"{r} x tokens({tokens}) x d({d})"
                + (f" + 4 x vocab({v}) x d" if head_trainable else ""))
    if kernel_temporaries:  # fp32 logits and logsumexp's fp32 (x - max): more than logits + fp32 copy
        forward = Term("one chunk: fp32 logits + logsumexp temporary", 8 * c * v,
                       f"8 x chunk({c}) x vocab({v})")
    else:
        both = 4 + (lay.compute if lay.compute != 4 else 0)
        forward = Term("one chunk of logits" + (" + fp32 copy" if both > 4 else ""), both * c * v,
                       f"{both} x chunk({c}) x vocab({v})")
    cast = v * d * head_bytes if head_trainable and head_bytes != 4 else 0
    backward = Term("head gradient cast to the weight dtype", cast,
                    f"{head_bytes} x vocab({v}) x d({d})" if cast else "0")
    return LossMemory(held, forward, backward)


def full_logits_loss(s: Shape, tokens: int, logits_bytes: int) -> LossMemory:
    """The model's logits and an fp32 cross-entropy (``core.losses.cross_entropy_sum``, transformers'
    loss): the log-softmax is kept; forward also holds the logits and their fp32 copy, backward two
    fp32 gradients of the logits' size."""
    nv, v = tokens * s.vocab, s.vocab
    up = 4 if logits_bytes != 4 else 0
    held = Term("fp32 log-softmax", 4 * nv, f"4 x tokens({tokens}) x vocab({v})")
    forward = Term("logits" + (" + fp32 copy" if up else ""), (logits_bytes + up) * nv,
                   f"({logits_bytes}{' + 4' if up else ''}) x tokens({tokens}) x vocab({v})")
    backward = Term("2 fp32 gradients of the logits", 8 * nv, f"8 x tokens({tokens}) x vocab({v})")
    return LossMemory(held, forward, backward)
