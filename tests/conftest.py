"""Shared fixtures: a tiny BPE tokenizer and a tiny random Llama saved to a temp folder (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recipes_lib.core import tasks
from recipes_lib.core.tokenizer import build_tokenizer

# One thread: these models are tiny, and with 2 cores shared with other work, more threads only spin.
torch.set_num_threads(1)


def tiny_config(vocab_size: int = 64, **overrides) -> LlamaConfig:
    """The tiny Llama shape every test uses (2 layers, d=32, GQA 4 heads / 2 kv heads)."""
    fields = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_model(vocab_size: int = 64, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size, **overrides))


@pytest.fixture(scope="session")
def tokenizer():
    texts = [ex.text for ex in tasks.make_examples(300, seed=1)]
    return build_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random Llama with the test tokenizer, saved with save_pretrained (loadable by models.*)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def fresh_tokenizer(tiny_model_dir):
    """A private copy of the tokenizer for tests that mutate it (e.g. padding_side)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def checkpointing_on(model) -> bool:
    """Whether activation (gradient) checkpointing is enabled, across transformers' renames."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or hasattr(model, attr):
            return bool(getattr(model, attr))
    raise AttributeError("no checkpointing flag on this model")
