"""``recipes train``: build what a config describes and drive the one training loop with it.

The model comes from ``core.models`` (full weights in fp32 under autocast, or a frozen base with
LoRA adapters, or notebook 01's QLoRA), the batches from ``app.data``, the step from
``core.train.optimizer_step`` (token-normalised accumulation, clipping, fp16 loss scaling), the loop
from ``core.train.train``. Its ``on_step`` hook logs, evaluates and checkpoints; resuming restores
the weights, the optimizer, scheduler and scaler, every RNG and the data position, so the resumed
run repeats the uninterrupted one step for step.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attention import sliding
from ..core import checkpointing, hardware, losses, models, speed, train
from ..core.errors import RecipeError
from ..long_context import recipe
from ..measure import flops
from ..memory import offload, qlora
from ..parallel import context
from . import checkpoint, data, distributed, fast_path, logs, preflight
from .config import RunConfig

EMBEDDED_TOKENIZER = "data/tiny-llama"


def precision(cfg: RunConfig, hw: hardware.Hardware) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype, frozen-base dtype) for ``model.precision``."""
    wanted = cfg.model.precision
    if wanted == "auto":
        return hw.amp_dtype, hw.model_dtype
    if wanted == "fp32":
        return None, torch.float32
    if wanted == "bf16" and hw.cuda and not torch.cuda.is_bf16_supported():
        raise RecipeError(f"{hw.name} has no bf16: set model.precision: fp16 (with loss scaling) or auto")
    dtype = torch.bfloat16 if wanted == "bf16" else torch.float16
    return dtype, dtype if hw.cuda else torch.float32


def build_model(cfg: RunConfig, hw: hardware.Hardware) -> torch.nn.Module:
    """The model of ``cfg.model``: trainable weights in fp32, a frozen base in the compute dtype."""
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    _, base_dtype = precision(cfg, hw)
    attention = models.attention_implementation(m.attention)
    if m.method == "qlora":
        storage = torch.bfloat16 if cfg.train.strategy == "fsdp2" else torch.uint8  # FSDP2 shards bf16 words
        base, why = fast_path.nf4_base_choice(cfg, hw)
        if m.nf4_base == "auto":
            print(f"QLoRA base (model.nf4_base: auto): {why}")
        model = qlora.qlora_model(m.source, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                                  attn_implementation=attention, hw=hw, quant_storage=storage,
                                  base=base, compiled=False)  # compiled below, after checkpointing
    else:
        dtype = torch.float32 if m.method == "full" else base_dtype
        model = models.load_model(m.source, attn_implementation=attention, dtype=dtype, hw=hw)
        if m.method == "lora":
            model = qlora.add_lora(model, m.lora_r, m.lora_alpha, m.lora_dropout)
    if m.sliding_window:
        sliding.use_sliding_window(models.unwrap(model), m.sliding_window)
    if m.long_context:  # it checkpoints every checkpoint_every-th layer itself, the inputs offloaded
        print(recipe.describe(recipe.enable(model, cfg.data.seq_len, checkpoint_every=m.checkpoint_every)))
    elif m.checkpointing:
        checkpointing.enable_checkpointing(model, every=m.checkpoint_every, offload=m.offload_activations)
    compiled, why = fast_path.compile_choice(cfg, hw)
    if m.compile == "auto":
        print(f"decoder layers (model.compile: auto): {why}")
    if compiled:  # after adapters and checkpointing, before any sharding
        speed.compile_layers(model)
    return model.train()


def check_positions(model, cfg: RunConfig) -> None:
    """Refuse a ``data.seq_len`` over the model's position limit, naming the switch that extends it."""
    try:
        models.check_seq_len(models.unwrap(model), cfg.data.seq_len)
    except RecipeError as error:
        raise RecipeError(f"data.seq_len: {error} recipes train does both with model.long_context: true.") \
            from None


def tokenizer_for(cfg: RunConfig):
    name = cfg.model.tokenizer or (EMBEDDED_TOKENIZER if cfg.model.source.startswith("random:")
                                   else cfg.model.source)
    return models.load_tokenizer(name)


def build_optimizer(cfg: RunConfig, model, hw: hardware.Hardware):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim.offload:
        return offload.offloaded_adamw(params, hw.device, lr=cfg.optim.lr,
                                       weight_decay=cfg.optim.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                             fused=hw.cuda or None)


def _counted(batches: Iterator[dict], counter: list[int], pad_id: int) -> Iterator[dict]:
    """``batches``, adding each one's real tokens to ``counter`` (without an attention mask: those not
    ``pad_id``, so a packed row's padded tail is not counted)."""
    for batch in batches:
        mask = batch.get("attention_mask")
        counter[0] += int(mask.sum()) if mask is not None else int((batch["input_ids"] != pad_id).sum())
        yield batch


def validation_batches(docs, cfg: RunConfig, pad_id: int) -> list[dict]:
    """Up to ``eval_batches`` fixed validation micro-batches, built before training so that a problem
    shows at the start; micro-batches of one row when the split is smaller than one micro-batch."""
    if not docs:
        return []
    for rows in dict.fromkeys((cfg.train.micro_batch, 1)):
        try:
            stream = data.micro_batches(docs, cfg.data, rows, pad_id, epoch_seed=-1)
        except RecipeError:
            continue
        return list(itertools.islice(stream, cfg.train.eval_batches))
    raise RecipeError(f"the validation split ({len(docs)} documents) fills no micro-batch: raise "
                      f"data.validation_fraction, or set it to 0 for no validation")


@torch.no_grad()
def evaluate(model, batches: list[dict], loss_of, autocast_dtype) -> float | None:
    """Mean loss per target token of the validation micro-batches (None without); on every rank (FSDP2)."""
    if not batches:
        return None
    model.eval()
    device = next(model.parameters()).device
    total, targets = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with train.autocast(device, autocast_dtype):
            total += loss_of(model, batch).item()
        targets += losses.count_targets(batch["labels"])
    model.train()
    return total / max(targets, 1)


def save_outputs(model, lm, tokenizer, cfg: RunConfig, out_dir: Path, hw: hardware.Hardware,
                 ctx=None) -> list[Path]:
    """The trained model, from the main process: adapters (peft ``save_pretrained``), optionally merged
    into the base; or the full model. FSDP2's and ZeRO's shards are gathered first (every rank takes part)."""
    state = distributed.full_trained_state(model, cfg) if ctx else None
    if ctx is not None and not ctx.is_main:
        return []
    folder = out_dir / ("model" if cfg.model.method == "full" else "adapter")
    lm.save_pretrained(folder, **({"state_dict": state} if state is not None else {}))
    tokenizer.save_pretrained(folder)
    written = [folder]
    if cfg.output.merge and cfg.model.method != "full":  # into an unquantized base: QLoRA's land on bf16
        _, dtype = precision(cfg, hw)
        base = models.load_model(cfg.model.source, dtype=dtype, hw=hw)
        if cfg.model.long_context:  # the positions the adapters were trained with
            recipe.extend_rope_for(base, cfg.data.seq_len)
        merged = qlora.load_adapter(base, folder).merge_and_unload()
        merged.save_pretrained(out_dir / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "merged")
        written.append(out_dir / "merged")
    return written


def run(cfg: RunConfig, resume_from: str | None = None) -> dict:
    """Train as ``cfg`` says, in this process or as one rank of a ``torchrun`` launch; returns
    ``training_duration.json``'s content."""
    ctx = distributed.setup(cfg)
    try:
        return _run(cfg, ctx, resume_from)
    except BaseException:
        if ctx is not None:
            context.cleanup(barrier=False)
        raise
    finally:
        if ctx is not None:
            context.cleanup()


def _run(cfg: RunConfig, ctx, resume_from: str | None) -> dict:
    hw = hardware.detect(str(ctx.device)) if ctx else hardware.detect()
    world = ctx.world_size if ctx else 1
    out_dir = Path(cfg.output.dir)
    preflight.train(cfg, resume_from)
    accum = cfg.train.global_batch // (cfg.train.micro_batch * world)
    tokenizer = tokenizer_for(cfg)
    train_docs, val_docs = data.load_documents(cfg.data, tokenizer)
    validation = validation_batches(val_docs, cfg, tokenizer.pad_token_id)
    lm = build_model(cfg, hw)
    check_positions(lm, cfg)
    per_token = flops.training_flops_per_token(models.unwrap(lm).config, cfg.data.seq_len,
                                               _trainable_fraction(lm))  # before ZeRO-3 partitions it
    autocast_dtype, _ = precision(cfg, hw)
    model, step_dtype = distributed.wrap(lm, cfg, ctx, accum, autocast_dtype) if ctx else (lm, autocast_dtype)
    optimizer = build_optimizer(cfg, model, hw)  # after FSDP2 has made the parameters shards
    scheduler = train.cosine_schedule(optimizer, cfg.train.max_steps, warmup=cfg.optim.warmup_steps)
    if ctx is not None:  # DeepSpeed takes the model and its optimizer together
        model, optimizer = distributed.engine(model, optimizer, cfg, ctx, accum, autocast_dtype)
    autocast_dtype = step_dtype
    scaler = torch.amp.GradScaler(hw.device.type) if autocast_dtype == torch.float16 else None
    start = {"step": 0, "data_position": 0}
    source = resume_from or (checkpoint.latest(out_dir) if cfg.checkpoint.resume else None)
    if source is not None:
        start = checkpoint.load(source, lm, optimizer, scheduler, scaler, cfg, model=model)
        print(f"resumed from {source} at step {start['step']}")
    remaining = cfg.train.max_steps - start["step"]
    if remaining <= 0:
        raise RecipeError(f"the checkpoint is at step {start['step']} and train.max_steps="
                          f"{cfg.train.max_steps}: raise train.max_steps to train further")
    tokens = [0]
    stream = data.micro_batches(train_docs, cfg.data, cfg.train.micro_batch, tokenizer.pad_token_id,
                                epoch_seed=cfg.train.seed, skip=start["data_position"])
    batches = _counted(distributed.rank_share(stream, ctx) if ctx else stream, tokens, tokenizer.pad_token_id)
    norms: list[torch.Tensor] = []
    if ctx is not None:
        step_fn = distributed.step_fn(hw.device, autocast_dtype, cfg.optim.max_grad_norm, norms)
    else:
        step_fn = functools.partial(train.optimizer_step, autocast_dtype=autocast_dtype,
                                    max_grad_norm=cfg.optim.max_grad_norm, fused_head=cfg.model.chunked_loss,
                                    scaler=scaler, grad_norms=norms)
    main = ctx is None or ctx.is_main
    log = logs.RunLog(out_dir, main=main, tensorboard=cfg.log.tensorboard, first_step=start["step"])
    hook = _StepHook(cfg, model, lm, optimizer, scheduler, scaler, log, hw, ctx, tokens, norms, start, accum,
                     validation, autocast_dtype, per_token)
    train.train(model, optimizer, batches, steps=remaining, accum_steps=accum, scheduler=scheduler,
                progress=cfg.log.progress and main, on_step=hook, step_fn=step_fn,
                desc=f"train (steps {start['step'] + 1}-{cfg.train.max_steps})" if start["step"] else "train")
    written = save_outputs(model, lm, tokenizer, cfg, out_dir, hw, ctx)
    total = context.all_ranks_sum(tokens[0], hw.device, torch.int64) if ctx else tokens[0]
    return log.finish(hw, int(total), remaining, first_step=start["step"], ranks=world,
                      outputs=[str(p) for p in written], final_loss=hook.last_loss)


def _trainable_fraction(model) -> float:
    trainable, total = models.count_parameters(model)
    return trainable / total if total else 1.0


@dataclass
class _StepHook:
    """After each optimizer step: log, evaluate and checkpoint as the config says."""

    cfg: RunConfig
    model: torch.nn.Module
    lm: torch.nn.Module
    optimizer: object
    scheduler: object
    scaler: object
    log: logs.RunLog
    hw: hardware.Hardware
    ctx: object
    tokens: list
    norms: list
    start: dict
    accum: int
    validation: list
    autocast_dtype: torch.dtype | None
    flops_per_token: float
    last_tokens: int = 0
    last_time: float = field(default_factory=time.perf_counter)
    last_loss: float = math.nan

    def __call__(self, index: int, loss: float) -> None:
        cfg, step = self.cfg, self.start["step"] + index + 1
        self.last_loss = loss
        last = step == cfg.train.max_steps
        if step % cfg.log.every == 0 or last:
            self._log(step, loss)
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last:
            val = evaluate(self.model, self.validation, self._loss, self.autocast_dtype)
            self.log.log(step, eval_loss=val)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last:
            world = self.ctx.world_size if self.ctx else 1
            checkpoint.save(cfg.output.dir, step, self.lm, self.optimizer, self.scheduler, self.scaler, cfg,
                            data_position=step * self.accum * world, keep_last=cfg.checkpoint.keep_last,
                            model=self.model, ctx=self.ctx)

    def _loss(self, model, batch: dict) -> torch.Tensor:
        if self.ctx is not None:  # a wrapped LossModel: the loss is its forward
            return model(**batch)
        return train.loss_sum(model, batch, fused_head=self.cfg.model.chunked_loss)

    def _log(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        seen = self.tokens[0]
        if self.ctx is not None:
            seen = context.all_ranks_sum(seen, self.hw.device, torch.int64)
        tokens_per_s = (seen - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_tokens, self.last_time = seen, now
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.hw.cuda else None
        mfu = flops.mfu(tokens_per_s, self.flops_per_token, self.hw.peak_flops)
        self.log.log(step, loss=loss, lr=self.scheduler.get_last_lr()[0],
                     grad_norm=self.norms[-1].item() if self.norms else None, tokens_per_s=tokens_per_s,
                     mfu=mfu, peak_memory_gib=peak)
