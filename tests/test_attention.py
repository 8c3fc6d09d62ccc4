"""Attention implementations against dense-mask SDPA, and the model-level sliding window."""

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from recipes_lib.attention import kernels, masks, sliding
from recipes_lib.core import errors, hardware, models
from recipes_lib.measure import attention_bench, flops


def _qkv(seq_len=70, heads=2, kv_heads=2, dim=8):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, heads, seq_len, dim, generator=gen),
            torch.randn(1, kv_heads, seq_len, dim, generator=gen),
            torch.randn(1, kv_heads, seq_len, dim, generator=gen))


@pytest.mark.parametrize("window", [None, 1, 9, 69])
@pytest.mark.parametrize("impl", ["eager", "sdpa-math", "flex"])
def test_implementations_match_dense_mask(impl, window):
    q, k, v = _qkv()
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.dense_mask(70, window))
    if impl == "flex":
        impl = "flex-causal" if window is None else "flex-sliding"
    torch.testing.assert_close(kernels.attend(impl, q, k, v, window), reference, atol=1e-5, rtol=1e-5)


def test_dense_mask_window_counts():
    mask = masks.dense_mask(10, 3)
    assert mask.sum(1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    assert flops.attention_flops(10, 1, 1, 3) == 4 * int(mask.sum())
    assert flops.attention_flops(10, 1, 1) == 4 * int(masks.dense_mask(10, None).sum())


def test_flex_grouped_query():
    q, k, v = _qkv(heads=4, kv_heads=2)
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                               attn_mask=masks.dense_mask(70, 5))
    torch.testing.assert_close(kernels.flex(q, k, v, 5), reference, atol=1e-5, rtol=1e-5)


def test_bad_windows():
    q, k, v = _qkv()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(errors.RecipeError, match="positive whole number"):
            masks.check_window(bad)
    with pytest.warns(UserWarning, match="covers the whole sequence"):
        wide = kernels.flex(q, k, v, 500)
    torch.testing.assert_close(wide, kernels.flex(q, k, v, None))
    with pytest.raises(errors.RecipeError, match="unknown attention"):
        kernels.attend("nope", q, k, v)


def test_model_window_matches_mistral_and_full_when_wide():
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = models.load_model().eval()(ids).logits
        windowed = sliding.use_sliding_window(models.load_model().eval(), 8, compiled=False)(ids).logits
        mistral = sliding.as_mistral(models.DEFAULT_MODEL, 8).eval()(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wide = sliding.use_sliding_window(models.load_model().eval(), 64, compiled=False)(ids).logits
    torch.testing.assert_close(windowed, mistral, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wide, full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(windowed, full, atol=1e-2)


def test_available_kernels_match_eager():
    hw = hardware.detect("cpu")
    q, k, v = kernels.random_qkv(1, 2, 40, 16, hw.device, torch.float32)
    names = kernels.available(hw)
    assert {"eager", "sdpa-math", "flex-causal", "flex-sliding"} <= set(names)
    for name in names:
        window = 7 if name == "flex-sliding" else None
        torch.testing.assert_close(kernels.attend(name, q, k, v, window), kernels.eager(q, k, v, window),
                                   atol=1e-5, rtol=1e-5)
        assert kernels.max_error_vs_eager(name, q, k, v, window) < 1e-5


def test_missing_backend_falls_back_to_the_fastest_left():
    hw = dataclasses.replace(hardware.detect("cpu"), sdpa_backends=("efficient", "math"))
    with pytest.warns(UserWarning, match="does not run"):
        assert kernels.choose_backend("flash", hw) == "efficient"
    assert kernels.choose_backend("math", hw) == "math"
    assert "sdpa-flash" not in kernels.available(hw)
    with pytest.raises(errors.RecipeError, match="unknown SDPA backend"):
        kernels.choose_backend("fast", hw)


def test_time_attention_eager_memory_grows_as_scores():
    hw = hardware.detect("cpu")
    rows = [attention_bench.time_attention("eager", n, 2, 8, hw, backward=False, repeats=1, batch=b)
            for n, b in [(128, 1), (256, 1), (256, 2)]]
    assert not any(r["oom"] for r in rows)
    assert all(r["seconds_min"] <= r["seconds"] <= r["seconds_max"] for r in rows)
    # TFLOP/s at the slowest and the fastest call: the same FLOPs over the longest and shortest time
    assert all(r["tflops_min"] / r["tflops"] == pytest.approx(r["seconds"] / r["seconds_max"]) for r in rows)
    assert all(r["tflops_max"] / r["tflops"] == pytest.approx(r["seconds"] / r["seconds_min"]) for r in rows)
    scores = [2 * b * n * n * 4 for n, b in [(128, 1), (256, 1), (256, 2)]]  # fp32 [batch, heads, n, n]
    assert all(s <= r["peak_bytes"] <= 4 * s for s, r in zip(scores, rows))
    assert 3.5 < rows[1]["peak_bytes"] / rows[0]["peak_bytes"] < 4.5  # quadratic in the length
    assert 1.8 < rows[2]["peak_bytes"] / rows[1]["peak_bytes"] < 2.2  # linear in the batch


def test_time_attention_oom_is_a_row(monkeypatch):
    hw = hardware.detect("cpu")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(attention_bench, "attend", out_of_memory)
    row = attention_bench.time_attention("eager", 64, 2, 8, hw, repeats=1)
    assert row["oom"] and row["seconds"] is None and row["implementation"] == "eager" and row["seq_len"] == 64
    monkeypatch.setattr(attention_bench, "attend", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        attention_bench.time_attention("eager", 64, 2, 8, hw, repeats=1)


def test_model_window_refuses_left_padding_and_packing():
    model = sliding.use_sliding_window(models.load_model().eval(), 8, compiled=False)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(2))
    right = torch.ones(2, 16, dtype=torch.long)
    right[0, 12:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=right)  # right padding is fine: causal attention looks left only
        left = right.flip(-1)
        with pytest.raises(errors.RecipeError, match="left padding"):
            model(input_ids=ids, attention_mask=left)
        packed = torch.cat([torch.arange(8), torch.arange(8)]).repeat(2, 1)
        with pytest.raises(errors.RecipeError, match="packed"):
            model(input_ids=ids, position_ids=packed)
