"""One compact training loop: token-normalised gradient accumulation, autocast, a progress bar.

Accumulation divides every micro-batch's *summed* loss by the number of target tokens in the whole
optimizer step, so ``accum_steps`` micro-batches give the same gradient as one large batch, even
when padding makes micro-batches hold different numbers of real tokens. (Averaging each
micro-batch's mean loss, the common shortcut, weights a token in a short micro-batch more.)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import loss_scaling, losses

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class TrainStats:
    """Losses per step, tokens, step times; fp16: steps GradScaler skipped, inf/NaN steps it let through."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    skipped_steps: int = 0
    unskipped_nonfinite: int = 0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(len(self.losses), 1)


def _split_lm(model: torch.nn.Module):
    """(decoder, lm_head) of a causal LM, looking through a peft wrapper; None if not separable."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "final_logit_softcapping", None) or not hasattr(base, "get_decoder"):
        return None
    head = base.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return None
    return base.get_decoder(), head


def loss_sum(model: torch.nn.Module, batch: dict, fused_head: bool = True,
             chunk_size: int = 1024, head_loss: Callable | None = None) -> torch.Tensor:
    """Summed next-token loss of one micro-batch (fused chunked LM head + CE where possible).

    ``head_loss``: ``(hidden, head_weight, labels) -> summed loss`` in place of our chunked one (e.g.
    ``losses.liger_linear_cross_entropy``, the maintained fused kernel).
    """
    # No KV cache: with one, transformers skips the packed-sequence (block-diagonal) mask.
    inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch} | {"use_cache": False}
    parts = _split_lm(model) if fused_head else None
    if parts is None:
        return losses.cross_entropy_sum(model(**inputs).logits, batch["labels"])
    decoder, head = parts
    hidden = decoder(**inputs).last_hidden_state
    if head_loss is not None:
        return head_loss(hidden, head.weight, batch["labels"])
    return losses.linear_cross_entropy(hidden, head.weight, batch["labels"], chunk_size)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in ``dtype`` on ``device``; none when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding in a micro-batch."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"].sum())
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[dict],
                         autocast_dtype: torch.dtype | None = None, fused_head: bool = True,
                         scaler: torch.amp.GradScaler | None = None, loss_fn: LossFn | None = None,
                         total_targets: int | None = None, backward: Callable | None = None,
                         micro_context: Callable[[bool], contextlib.AbstractContextManager] | None = None,
                         device: torch.device | None = None) -> torch.Tensor:
    """Forward and backward over ``micro_batches``, the loss normalised by their total target tokens.

    Returns the step's mean loss per target token (what the large batch would report), on the
    device: summed there, so the host does not wait for the GPU after every micro-batch.

    Args:
        loss_fn: ``(model, micro_batch) -> summed loss`` (default: ``loss_sum``, the next-token
            cross-entropy); distillation passes its KL + CE here.
        total_targets: the target tokens to divide by (default: those of ``micro_batches``; data
            parallelism passes the count over all ranks).
        backward: ``loss -> None`` in place of ``loss.backward()`` (DeepSpeed's engine).
        micro_context: ``is_last -> context`` entered around each micro-batch (DDP's ``no_sync``).
        device: where the micro-batches go (default: the model's first parameter's device; FSDP2's
            CPU offload keeps its parameters on the host but computes on the GPU).
    """
    if total_targets is None:
        total_targets = sum(losses.count_targets(mb["labels"]) for mb in micro_batches)
    if total_targets == 0:
        raise ValueError("no target tokens in this step: every label is -100")
    loss_fn = loss_fn or functools.partial(loss_sum, fused_head=fused_head)
    device = device or next(model.parameters()).device
    step_loss = torch.zeros((), device=device, dtype=torch.float32)
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        last = i == len(micro_batches) - 1
        with micro_context(last) if micro_context else contextlib.nullcontext():
            with autocast(device, autocast_dtype):
                loss = loss_fn(model, mb) / total_targets
            if backward is not None:
                backward(loss)
            else:
                (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += loss.detach().float()
    return step_loss


def _chunks(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[dict],
                   autocast_dtype: torch.dtype | None = None, max_grad_norm: float | None = 1.0,
                   fused_head: bool = True, scaler: torch.amp.GradScaler | None = None,
                   loss_fn: LossFn | None = None, grad_norms: list | None = None) -> float:
    """One optimizer step: accumulate over ``micro_batches``, clip, step, zero; returns the step's loss.

    ``grad_norms``: a list that gets the step's gradient norm before clipping (a device tensor: read it
    when you log, not every step).
    """
    loss = accumulate_gradients(model, micro_batches, autocast_dtype, fused_head, scaler, loss_fn)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        trained = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
        if grad_norms is not None:
            grad_norms.append(norm.detach())
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[dict],
               max_grad_norm: float | None = 1.0) -> float:
    """The step of a plain transformers loop, the reference ours is measured against.

    What ``Trainer`` does with its defaults, less its bookkeeping: the model's own loss (full logits,
    upcast to fp32, mean per micro-batch divided by the number of micro-batches), no autocast (the
    weights' dtype), gradient clipping at 1.0, the optimizer's step; one ``.item()`` per step.
    """
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for mb in micro_batches:
        inputs = {k: mb[k].to(device) for k in _MODEL_INPUTS if k in mb}
        loss = model(**inputs, labels=mb["labels"].to(device), use_cache=False).loss / len(micro_batches)
        loss.backward()
        total += loss.detach().float()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total.item()


StepFn = Callable[[torch.nn.Module, torch.optim.Optimizer, Sequence[dict]], float]


def show_progress(progress: bool | None) -> bool:
    """Whether to draw a progress bar: the caller's choice, else yes unless ``RECIPES_PROGRESS=0``
    (set for headless notebook runs, where a bar would be saved in its first state)."""
    return os.environ.get("RECIPES_PROGRESS", "1") != "0" if progress is None else progress


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[dict],
          steps: int, accum_steps: int = 1, autocast_dtype: torch.dtype | None = None,
          max_grad_norm: float | None = 1.0, fused_head: bool = True, scheduler=None,
          progress: bool | None = None, desc: str = "train", loss_fn: LossFn | None = None,
          clock: Callable[[Callable[[], object]], float] | None = None,
          on_step: Callable[[int, float], None] | None = None, step_fn: StepFn | None = None) -> TrainStats:
    """Run ``steps`` optimizer steps of ``accum_steps`` micro-batches each: the one training loop.

    Args:
        batches: an iterable of micro-batches (``input_ids``, ``labels``, optional
            ``attention_mask``/``position_ids``); it must yield ``steps * accum_steps`` of them.
        autocast_dtype: ``torch.bfloat16``/``torch.float16`` for mixed precision, None for none.
            fp16 turns on loss scaling.
        fused_head: compute the loss with the chunked fused LM head (no full logits).
        loss_fn: ``(model, micro_batch) -> summed loss``, in place of the next-token cross-entropy.
        clock: ``fn -> seconds`` that runs and times one optimizer step (``measure.timing.stepper``);
            None leaves ``step_seconds`` empty.
        on_step: ``(step_index, loss) -> None`` after every optimizer step (evaluation, logging).
        step_fn: ``(model, optimizer, micro_batches) -> loss`` in place of ``optimizer_step`` (the
            benchmarks time ``plain_step``, the plain transformers step, through the same loop).
        progress: show a progress bar; None means yes unless ``RECIPES_PROGRESS=0``.
    """
    if max_grad_norm is not None and hasattr(optimizer, "optim_dict"):  # torchao CPUOffloadOptimizer
        raise ValueError("an offloaded optimizer copies gradients to the host during backward, so clipping "
                         "the device gradients would do nothing: pass max_grad_norm=None")
    model.train()  # from_pretrained returns eval mode, where transformers skips checkpointing
    device = next(model.parameters()).device
    scaler = loss_scaling.scaler_for(device, autocast_dtype)
    watch = loss_scaling.StepWatch(scaler)
    step_fn = step_fn or functools.partial(optimizer_step, autocast_dtype=autocast_dtype,
                                           max_grad_norm=max_grad_norm, fused_head=fused_head, scaler=scaler,
                                           loss_fn=loss_fn)
    stats = TrainStats()
    bar = tqdm(total=steps, desc=desc, disable=not show_progress(progress), leave=False)
    for index, micro_batches in enumerate(itertools.islice(_chunks(batches, accum_steps), steps)):
        result = []

        def one_step(micro_batches=micro_batches, result=result):
            result.append(step_fn(model, optimizer, micro_batches))

        watch.before()
        if clock is not None:
            stats.step_seconds.append(clock(one_step))
        else:
            one_step()
        stats.skipped_steps += (skipped := watch.skipped(index))
        stats.unskipped_nonfinite += not skipped and not math.isfinite(result[0])
        if scheduler is not None:
            scheduler.step()
        stats.tokens += sum(real_tokens(mb) for mb in micro_batches)
        stats.losses.append(result[0])
        if on_step is not None:
            on_step(index, result[0])
        bar.update(1)
        bar.set_postfix(loss=f"{result[0]:.3f}")
    bar.close()
    if len(stats.losses) < steps:
        raise ValueError(f"batches ran out after {len(stats.losses)} of {steps} steps "
                         f"({accum_steps} micro-batches per step)")
    return stats


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 0):
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LossModel(torch.nn.Module):
    """A causal LM whose forward returns the summed next-token loss of a micro-batch.

    With ``fused_head`` the loss is the fused chunked LM head + cross-entropy, which never holds the
    ``[tokens, vocab]`` logits. Making the loss part of the module that FSDP2, DDP or DeepSpeed wrap
    is what lets FSDP2's root unit gather the embeddings and LM head for it: calling the decoder
    directly from outside would bypass the root's hooks.
    """

    def __init__(self, lm: torch.nn.Module, fused_head: bool = True):
        super().__init__()
        self.lm = lm
        self.fused_head = fused_head

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "position_ids": position_ids}
        present = {k: v for k, v in batch.items() if v is not None}
        return loss_sum(self.lm, present, fused_head=self.fused_head)
