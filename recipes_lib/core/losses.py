"""Causal-LM losses that sum over target tokens, so accumulation can normalise by the global count.

``linear_cross_entropy`` fuses the LM head with the loss and walks the tokens in chunks: the full
``[tokens, vocab]`` logits never exist (at Llama-3's 128k vocabulary and 2048 tokens they would be
1 GiB in fp32). It computes each chunk's gradient during the forward pass, so the backward pass
costs no recomputation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .errors import RecipeError

IGNORE_INDEX = -100
# The profiler range around the chunked loss's forward and backward: ``measure.step_split`` counts what
# runs there as the loss's time (a range costs nothing when no profiler runs).
LOSS_RANGE = "recipes::loss"


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction: position t is scored against token t+1."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(labels: torch.Tensor) -> int:
    """Number of tokens that contribute to the loss (after the shift)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference loss: summed next-token cross-entropy in fp32 from full logits."""
    targets = shift_labels(labels).reshape(-1)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets,
                           ignore_index=IGNORE_INDEX, reduction="sum")


@contextlib.contextmanager
def _tf32_if(enabled: bool):
    """TF32 tensor cores for fp32 matmuls inside (CUDA); plain fp32 otherwise.

    In a bf16 run the fp32 weight-gradient matmul of the LM head would otherwise run on the GPU's
    fp32 units, about ten times slower than bf16 tensor cores: at a 128k vocabulary and hidden 2048
    it is 2 TFLOP per 4096 tokens, some 40 ms on an H100's fp32 units. TF32 keeps fp32 accumulation
    and 10 of fp32's 23 mantissa bits, more than the bf16 inputs carry.
    """
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        with torch.profiler.record_function(LOSS_RANGE):
            return _LinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk_size)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_size):
        valid = targets != IGNORE_INDEX
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        w = weight.to(hidden.dtype)
        mixed = hidden.dtype != torch.float32 or torch.is_autocast_enabled(hidden.device.type)
        loss = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t, v = targets[start:start + chunk_size], valid[start:start + chunk_size]
            probs = (h @ w.T).float()  # the chunk's logits, turned into d(loss)/d(logits) in place below
            lse = torch.logsumexp(probs, dim=-1)
            safe_t = t.clamp_min(0)
            loss += ((lse - probs.gather(1, safe_t[:, None]).squeeze(1)) * v).sum()
            probs.sub_(lse[:, None]).exp_()  # softmax
            probs.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse[:, None]))  # - onehot
            probs.mul_(v[:, None])
            grad_hidden[start:start + chunk_size] = (probs.to(h.dtype) @ w).to(hidden.dtype)
            if grad_weight is not None:
                with _tf32_if(mixed):
                    grad_weight.addmm_(probs.T, h.float())  # in place: no [vocab, hidden] temporary
            del probs, lse  # free this chunk before the next one allocates
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else hidden.new_empty(0))
        ctx.weight_dtype, ctx.weight_trainable = weight.dtype, grad_weight is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.profiler.record_function(LOSS_RANGE):
            return _LinearCrossEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        if getattr(ctx, "done", False):
            raise RuntimeError("linear_cross_entropy's backward runs once: "
                               "its saved gradients are scaled in place")
        ctx.done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: the saved gradients are used once, and a copy of the fp32 weight gradient would
        # be the largest allocation of the whole loss at a 128k vocabulary.
        gw = grad_weight.mul_(grad_loss).to(ctx.weight_dtype) if ctx.weight_trainable else None
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), gw, None, None


@torch.no_grad()
def _chunked_loss_only(hidden, weight, targets, chunk_size):
    w = weight.to(hidden.dtype)
    loss = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        t = targets[start:start + chunk_size]
        logits = (hidden[start:start + chunk_size] @ w.T).float()
        loss += F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy of ``hidden @ weight.T`` without materialising the logits.

    Args:
        hidden: final hidden states ``[batch, seq, hidden]``.
        weight: LM-head weight ``[vocab, hidden]``.
        labels: ``[batch, seq]`` token ids aligned with the inputs (-100 = ignore), shifted here.
        chunk_size: tokens per chunk; the loss needs about ``chunk_size * vocab * (4 + 2)`` bytes at
            a time (fp32 logits, turned into their gradient in place, and the bf16 matmul output),
            plus the gradient of ``hidden`` (and of ``weight`` in fp32, if it is trained). It need
            not divide the number of tokens: the last chunk is simply shorter.

    Without autograd (``torch.no_grad()``, or nothing requires a gradient) only the loss is computed.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r}: a chunk is a positive whole number of tokens "
                         f"(1024 is a good default; the last chunk may be shorter)")
    targets = shift_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _chunked_loss_only(flat, weight, targets, chunk_size)
    return _LinearCrossEntropy.apply(flat, weight, targets, chunk_size)


def _shifted(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden.reshape(-1, hidden.shape[-1]), shift_labels(labels).reshape(-1)


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                               labels: torch.Tensor) -> torch.Tensor:
    """``linear_cross_entropy`` by Liger Kernel's fused Triton kernel (``pip install liger-kernel``; CUDA)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        raise RecipeError("Liger Kernel's fused linear cross-entropy: pip install liger-kernel") from error
    if hidden.device.type != "cuda":
        raise RecipeError("Liger Kernel's Triton kernels run on GPUs only")
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, *_shifted(hidden, labels))


def cce_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    """``linear_cross_entropy`` by Apple's Cut Cross-Entropy kernel (``pip install cut-cross-entropy``; CUDA),
    with its documented default gradient filtering (``filter_eps="high"``)."""
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as error:
        raise RecipeError("Cut Cross-Entropy: pip install cut-cross-entropy") from error
    if hidden.device.type != "cuda":
        raise RecipeError("Cut Cross-Entropy's Triton kernels run on GPUs only")
    flat, targets = _shifted(hidden, labels)
    return cce(flat, weight, targets, reduction="sum")
