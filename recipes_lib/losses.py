"""Causal-LM losses that sum over target tokens, so accumulation can normalise by the global count.

``linear_cross_entropy`` fuses the LM head with the loss and walks the tokens in chunks: the full
``[tokens, vocab]`` logits never exist (at Llama-3's 128k vocabulary and 2048 tokens they would be
1 GiB in fp32). It computes each chunk's gradient during the forward pass, so the backward pass
costs no recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        valid = targets != IGNORE_INDEX
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        w = weight.to(hidden.dtype)
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
                grad_weight += probs.T @ h.float()
            del probs, lse  # free this chunk before the next one allocates
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else hidden.new_empty(0))
        ctx.weight_dtype, ctx.weight_trainable = weight.dtype, grad_weight is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.weight_trainable else None
        return grad_hidden * grad_loss.to(grad_hidden.dtype), gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token cross-entropy of ``hidden @ weight.T`` without materialising the logits.

    Args:
        hidden: final hidden states ``[batch, seq, hidden]``.
        weight: LM-head weight ``[vocab, hidden]``.
        labels: ``[batch, seq]`` token ids aligned with the inputs (-100 = ignore), shifted here.
        chunk_size: tokens per chunk; the loss needs about ``chunk_size * vocab * (4 + 2)`` bytes at
            a time (fp32 logits, turned into their gradient in place, and the bf16 matmul output),
            plus the gradient of ``hidden`` (and of ``weight`` in fp32, if it is trained).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    targets = shift_labels(labels).reshape(-1)
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, chunk_size)
