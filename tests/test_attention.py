"""Attention implementations against dense-mask SDPA, and the model-level sliding window."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from recipes_lib.attention import kernels, masks, sliding
from recipes_lib.core import errors, hardware, models
from recipes_lib.measure import attention_bench, flops


def _qkv(seq_len=70, heads=2, kv_heads=2, dim=8):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, heads, seq_len, dim, generator=gen), torch.randn(1, kv_heads, seq_len, dim, generator=gen),
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


def test_time_attention_row():
    row = attention_bench.time_attention("sdpa-math", 64, 2, 8, hardware.detect("cpu"), repeats=2)
    assert not row["oom"] and row["seconds"] > 0 and row["peak_bytes"] > 0


def test_model_window_refuses_left_padding_and_packing():
    model = sliding.use_sliding_window(models.load_model().eval(), 8, compiled=False)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(2))
    right = torch.ones(2, 16, dtype=torch.long)
    right[0, 12:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=right)  # right padding is fine: causal attention never looks right
        left = right.flip(-1)
        with pytest.raises(errors.RecipeError, match="left padding"):
            model(input_ids=ids, attention_mask=left)
        packed = torch.cat([torch.arange(8), torch.arange(8)]).repeat(2, 1)
        with pytest.raises(errors.RecipeError, match="packed"):
            model(input_ids=ids, position_ids=packed)
