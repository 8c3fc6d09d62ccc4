"""Build the embedded LayerNorm model: a tiny GPT-2 pre-trained on the synthetic tasks.

    python scripts/build_layernorm_model.py --out data/tiny-gpt2 --minutes 3

Notebook 03 swaps its LayerNorms for RMSNorm and heals the swap with a short fine-tune, so it needs
a model that (a) uses LayerNorm, as GPT-2 does, and (b) has learned its tasks, so the quality drop
and its recovery mean something. Same tokenizer and corpus as ``data/tiny-llama``; saved with
``save_pretrained`` (safetensors, fp32) with ``eval.json`` holding its held-out task scores.
Runs on a GPU when there is one (bf16 autocast), else on the CPU (pass a small --minutes budget).
"""

from __future__ import annotations

import torch
from build_default_model import describe, pretrain_and_save, pretraining_parser  # scripts/ is on sys.path
from transformers import GPT2Config, GPT2LMHeadModel

from recipes_lib.core import batches, hardware, models, tasks


def build_model(tokenizer, args) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.positions, n_embd=args.hidden,
                        n_layer=args.layers, n_head=args.hidden // 32, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def main() -> None:
    parser = pretraining_parser(__doc__, "data/tiny-gpt2", minutes=3.0, batch=64, max_steps=20000)
    parser.add_argument("--tokenizer", default=models.DEFAULT_MODEL,
                        help="reuse the embedded model's tokenizer")
    parser.add_argument("--positions", type=int, default=512)
    args = parser.parse_args()
    hw = hardware.detect()

    tokenizer = models.load_tokenizer(args.tokenizer)
    model = build_model(tokenizer, args).to(hw.device)
    describe(model, tokenizer)

    docs = batches.encode(tokenizer, tasks.make_examples(200_000, seed=1), train_on_prompt=True)
    pretrain_and_save(model, tokenizer, docs, args, hw)  # the same recipe and report as data/tiny-llama


if __name__ == "__main__":
    main()
