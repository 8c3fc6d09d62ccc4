"""The generation benchmark: its decode loop is greedy decoding, and its record says how it measured."""

import pytest
import torch
from conftest import tiny_model

from recipes_lib.core import hardware
from recipes_lib.inference import generate
from recipes_lib.measure import bench, decode


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


def test_benchmark_rows_carry_the_spread_of_their_timed_repeats():
    row = decode.benchmark(tiny_model(), hardware.detect("cpu"), batch=2, prompt_len=8, new_tokens=4,
                           repeats=5, warmup=1, name="tiny")
    for phase in ("prefill", "decode"):  # slowest repeat <= median <= fastest, in tokens/s
        assert 0 < row[f"{phase}_tokens_per_s_min"] <= row[f"{phase}_tokens_per_s"] \
            <= row[f"{phase}_tokens_per_s_max"]
    assert row["decode_tokens_per_s_min"] < row["decode_tokens_per_s_max"]  # five timings never all equal
    record = decode.table([row])[0]
    low, high = row["decode_tokens_per_s_min"], row["decode_tokens_per_s_max"]
    assert record["decode min-max"] == f"{low:,.0f}-{high:,.0f}"
    assert record["prefill min-max"].startswith(f"{row['prefill_tokens_per_s_min']:,.0f}-")


def test_speed_ratio_of_decode_rows_spans_slowest_over_fastest():
    def row(median, low, high):  # prefill twice as fast as decode
        return {f"{phase}_tokens_per_s{end}": scale * value
                for phase, scale in (("decode", 1), ("prefill", 2))
                for end, value in (("", median), ("_min", low), ("_max", high))}
    int8, bf16 = row(150, 140, 160), row(100, 95, 105)
    assert decode.speed_ratio(int8, bf16) == pytest.approx((1.5, 140 / 105, 160 / 95))
    assert decode.speed_ratio(int8, row(50, 40, 60), "prefill") == pytest.approx((3.0, 280 / 120, 320 / 80))
    overlapping = decode.speed_ratio(row(104, 90, 110), bf16)
    assert bench.describe_ratio(*overlapping).startswith("no measurable difference (1.04x")


def test_tune_applies_only_to_a_compiled_step():
    row = decode.benchmark(tiny_model(), hardware.detect("cpu"), batch=1, prompt_len=4, new_tokens=2,
                             repeats=1, warmup=1, tune=True)
    assert row["tuned"] is False and "tuned" not in decode.describe(row)


def test_compiled_benchmark_needs_warmup():
    with pytest.raises(ValueError, match="warmup"):
        decode.benchmark(tiny_model(), hardware.detect("cpu"), batch=1, prompt_len=4, new_tokens=2,
                           compile=True, warmup=0)


def test_sweep_rows_per_batch_with_weights_counted_once():
    model = tiny_model(tie_word_embeddings=True)
    rows = decode.sweep(model, hardware.detect("cpu"), [1, 2], prompt_len=4, new_tokens=2, repeats=1,
                        name="tiny")
    stored = {p.data_ptr(): p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()]}
    assert [r["batch"] for r in rows] == [1, 2] and all(r["name"] == "tiny" for r in rows)
    assert all(r["weight_bytes"] == sum(stored.values()) for r in rows)  # the tied embedding once


def test_step_split_recovers_fixed_and_per_layer_time():
    deep, shallow = {"ms_per_decode_step": 0.5 + 16 * 0.1}, {"ms_per_decode_step": 0.5 + 8 * 0.1}
    split = decode.step_split(deep, shallow, (16, 8))
    assert split["fixed_ms"] == pytest.approx(0.5) and split["ms_per_layer"] == pytest.approx(0.1)
    assert 0.5 + split["layers_for_2x"] * 0.1 == pytest.approx(deep["ms_per_decode_step"] / 2)


def test_slower_names_only_the_rows_under_their_baseline():
    base = [{"prefill_tokens_per_s": 100, "decode_tokens_per_s": 10}]
    row = [{"name": "x", "batch": 1, "prefill_tokens_per_s": 99, "decode_tokens_per_s": 5}]
    assert decode.slower(row, base) == ["slower than its baseline: x decode at batch 1: 0.50x"]


def test_benchmark_each_times_every_model_and_lets_go_of_them():
    hw = hardware.detect("cpu")
    models = {"teacher": tiny_model(), "student": tiny_model(num_hidden_layers=1)}
    rows = decode.benchmark_each(models, hw, prompt_len=8, new_tokens=4, repeats=2)
    assert list(rows) == ["teacher", "student"] and not models  # popped as they were timed
    assert all(r["name"] == name and r["decode_tokens_per_s"] > 0 for name, r in rows.items())
