"""The generation benchmark: its decode loop is greedy decoding, and its record says how it measured."""

import torch
from conftest import tiny_model

from recipes_lib.core import hardware
from recipes_lib.inference import generate
from recipes_lib.measure import decode


def test_decode_loop_matches_generate():
    model = tiny_model(eos_token_id=None).eval()  # no end-of-sequence: both decode all 8 tokens
    prompt = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    ours = generate.greedy_tokens(model, prompt, 8)
    reference = model.generate(prompt, max_new_tokens=8, do_sample=False,
                               attention_mask=torch.ones_like(prompt), pad_token_id=0)[:, prompt.shape[1]:]
    assert torch.equal(ours, reference)


def test_benchmark_record():
    row = decode.benchmark(tiny_model(), hardware.detect("cpu"), batch=2, prompt_len=8, new_tokens=4,
                             repeats=2, warmup=1, name="tiny")
    assert row["compiled"] is False and row["batch"] == 2 and row["new_tokens"] == 4
    assert row["decode_tokens_per_s"] == 2 * 4 / row["decode_s"] > 0
    assert "static KV cache" in decode.describe(row) and "median of 2" in decode.describe(row)


def test_tune_applies_only_to_a_compiled_step():
    row = decode.benchmark(tiny_model(), hardware.detect("cpu"), batch=1, prompt_len=4, new_tokens=2,
                             repeats=1, warmup=1, tune=True)
    assert row["tuned"] is False and "tuned" not in decode.describe(row)


def test_compiled_benchmark_needs_warmup():
    import pytest

    with pytest.raises(ValueError, match="warmup"):
        decode.benchmark(tiny_model(), hardware.detect("cpu"), batch=1, prompt_len=4, new_tokens=2,
                           compile=True, warmup=0)
