"""Build the embedded default: a tokenizer and a tiny Llama pre-trained on the synthetic tasks.

    python scripts/build_default_model.py --out data/tiny-llama --minutes 20

Trains a byte-level BPE tokenizer (digits split one per token) with `tokenizers`, pre-trains a
~3M-parameter Llama-architecture model on packed task text, reports held-out task scores, and
saves both with `save_pretrained` (safetensors, fp32) plus `eval.json` with the scores. Runs on a
GPU when there is one (bf16 autocast; about a minute on an H100), else on the CPU (slower: pass a
smaller --minutes budget and expect lower scores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from recipes_lib.core import batches, hardware, models, tasks, train
from recipes_lib.core.tokenizer import build_tokenizer
from recipes_lib.measure import quality, timing


def build_model(tokenizer: PreTrainedTokenizerFast, args) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def pretraining_parser(doc: str, out: str, minutes: float, batch: int, max_steps: int):
    """The command line both embedded-model builders share: where to save, size, and training budget."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=out)
    parser.add_argument("--minutes", type=float, default=minutes, help="training time budget")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=max_steps)
    return parser


def describe(model, tokenizer) -> None:
    """Print the model's size and vocabulary."""
    print(f"model: {models.count_parameters(model)[1] / 1e6:.2f}M parameters, vocab {len(tokenizer)}")


def main() -> None:
    args = pretraining_parser(__doc__, "data/tiny-llama", minutes=20.0, batch=32, max_steps=4000).parse_args()
    hw = hardware.detect()

    corpus = tasks.make_examples(200_000, seed=1)
    tokenizer = build_tokenizer([ex.text for ex in corpus[:20_000]], vocab_size=512)
    model = build_model(tokenizer, args).to(hw.device)
    describe(model, tokenizer)

    docs = batches.encode(tokenizer, corpus, train_on_prompt=True)
    pretrain_and_save(model, tokenizer, docs, args, hw)


def pretrain_and_save(model, tokenizer, docs, args, hw) -> None:
    """Pre-train on packed ``docs`` for ``--minutes``, score held-out tasks, save model + eval.json."""
    n_params = models.count_parameters(model)[1]
    rows = batches.packed_batches(docs, args.seq_len, args.batch, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    # Time-boxed: estimate the step time on a few steps, then fit the schedule to the budget.
    probe = train.train(model, optimizer, rows, steps=10, autocast_dtype=hw.amp_dtype, progress=False,
                        clock=timing.stepper(hw.device))
    step_s = timing.Timing.of(probe.step_seconds, skip=5).median
    steps = min(args.max_steps, int(args.minutes * 60 / step_s))
    print(f"training {steps} steps of {args.batch}x{args.seq_len} tokens")
    scheduler = train.cosine_schedule(optimizer, steps, warmup=min(100, steps // 10))
    start = time.time()
    stats = train.train(model, optimizer, rows, steps=steps, scheduler=scheduler,
                        autocast_dtype=hw.amp_dtype, desc="pretrain")
    print(f"final loss {stats.losses[-1]:.3f} after {time.time() - start:.0f}s")

    held_out = tasks.make_examples(500, seed=12345)
    scores = quality.task_scores(model, tokenizer, held_out, progress=True)
    print("held-out scores:", json.dumps({k: round(v, 3) for k, v in scores.items()}))

    out = Path(args.out)
    model.float().cpu().save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"held_out_scores": scores, "n_params": n_params, "steps": steps, "device": hw.name,
              "tokens": stats.tokens, "final_loss": stats.losses[-1],
              "seconds": round(time.time() - start), "args": vars(args)}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
