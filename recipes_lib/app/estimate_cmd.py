"""``recipes estimate [CONFIG] [key=value ...] [flags]``: predicted memory per GPU, and the OOM advisor.

The run comes from a ``recipes train`` config, from flags, or both (a flag overrides the config).
It prints the peak per GPU split into weights, gradients, optimizer state, activations, loss/logits
and workspace, each with its formula, and with ``--gpu NAME|SIZE`` whether it fits there and, if not,
the cheapest recipe changes that make it fit (``measure.advisor``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from ..core.errors import RecipeError
from ..long_context import recipe
from ..measure import advisor
from ..measure.estimate import (
    ATTENTIONS,
    METHODS,
    NF4_BASES,
    OPTIMIZERS,
    PRECISIONS,
    STRATEGIES,
    Plan,
    estimate,
    model_config,
)
from ..measure.memory import GiB
from . import config as run_config
from . import fast_path, preflight

FLAGS = {  # flag: (Plan field, type, help)
    "--model": ("model", str, "model folder, hub id or random:<shape>"),
    "--method": ("method", str, f"one of {', '.join(METHODS)}"),
    "--precision": ("precision", str, f"one of {', '.join(PRECISIONS)}: bf16 weights and AdamW state | fp32 "
                                      "weights under bf16 autocast (recipes train) | fp32 throughout"),
    "--strategy": ("strategy", str, f"one of {', '.join(STRATEGIES)}"),
    "--gpus": ("gpus", int, "GPUs (ranks) the run uses"),
    "--micro-batch": ("micro_batch", int, "sequences per forward pass, per GPU"),
    "--seq-len": ("seq_len", int, "tokens per sequence"),
    "--accum": ("accum_steps", int, "micro-batches accumulated per optimizer step"),
    "--checkpoint-every": ("checkpoint_every", int, "activation checkpointing of every k-th layer (0: none)"),
    "--chunk-size": ("chunk_size", int, "tokens per chunk of the chunked loss"),
    "--attention": ("attention", str, f"one of {', '.join(ATTENTIONS)}"),
    "--optimizer": ("optimizer", str, f"AdamW: one of {', '.join(OPTIMIZERS)} (offload: state on the CPU)"),
    "--lora-r": ("lora_r", int, "adapter rank (lora, qlora)"),
    "--lora-dropout": ("lora_dropout", float, "adapter dropout (its masks and inputs are kept)"),
    "--tile-mlp-tokens": ("tile_mlp_tokens", int, "tiled MLP: tokens per chunk (0: the MLP whole)"),
    "--rope-positions": ("rope_positions", int, "RoPE extended to this many positions (0: as trained)"),
    "--nf4-base": ("nf4_base", str, f"qlora's 4-bit base: one of {', '.join(NF4_BASES)} (compiled on "
                   "torchao's, each layer keeps its weights dequantized for backward)"),
}
SWITCHES = {  # flag: (Plan field, help); each also has --no-<flag>
    "--checkpointing": ("checkpoint_every", "checkpoint every decoder layer (--checkpoint-every 1)"),
    "--offload-activations": ("offload_activations", "checkpointed layers' inputs in host memory"),
    "--chunked-loss": ("chunked_loss", "fused chunked LM head + cross-entropy instead of full logits"),
    "--packed": ("packed", "documents packed with position_ids, or padded: attention gets a mask"),
    "--upcast-fp32": ("upcast_fp32", "prepare_model_for_kbit_training: embeddings, norms, head in fp32"),
    "--compiled": ("compiled", "torch.compile'd decoder layers (modelled with fused attention and no adapter "
                   "dropout; a recomputed adapter layer counts eager's tensors)"),
}
STRATEGY = {"single": "single", "ddp": "ddp", "zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3"}


def add_parser(commands) -> None:
    """The ``estimate`` subcommand with every flag."""
    cmd = commands.add_parser("estimate", help="predicted memory per GPU; --gpu: does it fit, what to change",
                              description=__doc__.split("\n\n", 1)[1].replace("``", "`"),
                              epilog="without a config, the defaults: " + ", ".join(
                                  f"{key}={value}" for key, value in vars(Plan()).items()),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("config", nargs="?", help="a recipes train YAML config (optional)")
    cmd.add_argument("overrides", nargs="*", help="key=value overrides of the config (train.micro_batch=2)")
    for flag, (_, kind, text) in FLAGS.items():
        cmd.add_argument(flag, type=kind, default=None, help=text)
    for flag, (_, text) in SWITCHES.items():
        cmd.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    cmd.add_argument("--gpu", default=None, help="a GPU name (" + ", ".join(advisor.GPUS) + ") or a size "
                     "(24GiB, 80GB): does it fit, and if not, the cheapest changes that make it fit")
    cmd.add_argument("--json", action="store_true", help="print the estimate as JSON")
    cmd.set_defaults(handler=main)


def plan_of(cfg: run_config.RunConfig, gpus: int = 1) -> Plan:
    """The plan a ``recipes train`` config describes, on ``gpus`` ranks (the trainer's choices:
    trainable weights in fp32 under bf16 autocast, fused AdamW or torchao's offload, packed rows; with
    ``model.long_context``, what ``long_context.recipe.enable`` sets for ``data.seq_len``)."""
    m, t = cfg.model, cfg.train
    strategy = STRATEGY.get(t.strategy) or ("fsdp2-offload" if t.cpu_offload else
                                           "fsdp2" if t.reshard else "fsdp2-no-reshard")
    long = {}
    if m.long_context:
        seq = cfg.data.seq_len
        long = dict(checkpoint_every=m.checkpoint_every, offload_activations=True, rope_positions=seq,
                    tile_mlp_tokens=recipe.default_tile_tokens(model_config(m.source), seq))
        long |= {"attention": "sdpa"} if m.attention == "eager" else {}
    plan = Plan(model=m.source, method=m.method, precision="fp32" if m.precision == "fp32" else "mixed",
                strategy=strategy, gpus=gpus, micro_batch=t.micro_batch, seq_len=cfg.data.seq_len,
                accum_steps=max(t.global_batch // (t.micro_batch * gpus), 1),
                checkpoint_every=m.checkpoint_every if m.checkpointing else 0,
                offload_activations=m.offload_activations, chunked_loss=m.chunked_loss,
                attention="flash_attention_2" if m.attention == "flex_attention" else m.attention,
                packed=True, optimizer="offload" if cfg.optim.offload else "fused", lora_r=m.lora_r,
                lora_dropout=m.lora_dropout,  # compile auto: compiled on a bf16 GPU (fast_path), the target
                compiled=m.compile is True or (m.compile == "auto" and not fast_path.unmeasured(cfg)))
    fastest = plan.compiled and strategy == "single"  # auto: torchao's base with compiled layers on one GPU
    base = m.nf4_base if m.nf4_base != "auto" else "torchao" if fastest else "bitsandbytes"
    return replace(plan, nf4_base=base, **long)


def _plan(args) -> Plan:
    values = {}
    if args.config is not None or args.overrides:
        values = vars(plan_of(run_config.load(args.config, args.overrides), args.gpus or 1))
    for flag, (name, _, _) in FLAGS.items():
        given = getattr(args, flag[2:].replace("-", "_"))
        values |= {} if given is None else {name: given}
    for flag, (name, _) in SWITCHES.items():
        given = getattr(args, flag[2:].replace("-", "_"))
        if given is not None:
            values[name] = (1 if given else 0) if name == "checkpoint_every" else given
    return Plan(**values).check()


def describe(result) -> str:
    """The estimate as text: the plan, the peak and its moment, each part with its formulas."""
    p = result.plan
    lines = [f"{p.model}: {p.method}, {p.precision}, {p.strategy} on {p.gpus} GPU(s), "
             f"micro-batch {p.micro_batch} x {p.seq_len} tokens, accumulation {p.accum_steps}, checkpointing "
             f"{'every ' + str(p.checkpoint_every) if p.checkpoint_every else 'off'}, "
             f"{'chunked loss' if p.chunked_loss else 'full logits'}, {p.attention}, AdamW {p.optimizer}"
             + (f", MLP tiled in chunks of {p.tile_mlp_tokens:,} tokens" if p.tile_mlp_tokens else "")
             + (f", RoPE extended to {p.rope_positions:,} positions" if p.rope_positions else ""),
             f"predicted peak per GPU: {result.peak / GiB:.2f} GiB, at the {result.moment}"]
    for part, value in result.parts.items():
        lines.append(f"  {part:12s} {value / GiB:9.3f} GiB")
        lines += [f"      {t.name}: {t.formula} = {t.value / GiB:.3f} GiB"
                  for t in result.formulas.get(part, [])]
    lines.append("moments (GiB): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in result.moments.items()))
    if result.host_formulas:
        lines.append(f"host memory: {result.host / GiB:.2f} GiB")
        lines += [f"      {t.name}: {t.formula} = {t.value / GiB:.3f} GiB" for t in result.host_formulas]
    return "\n".join(lines)


def main(args) -> int:
    """Run ``recipes estimate`` with parsed ``args``; 0 on success, 2 on a RecipeError (printed)."""
    try:
        plan = _plan(args)
        preflight.local_model(plan.model, "the model (--model or model.source)", paths=False)
        config = model_config(plan.model)
        result = estimate(plan, config)
        advice = advisor.advice_text(plan, args.gpu, config) if args.gpu else None
    except RecipeError as error:
        print(f"recipes estimate: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"plan": vars(plan), "peak_bytes": result.peak, "moment": result.moment,
                          "parts_bytes": result.parts, "moments_bytes": result.moments,
                          "host_bytes": result.host, "advice": advice},
                         indent=1))
    else:
        print(describe(result) + (f"\n\n{advice}" if advice else ""))
    return 0
