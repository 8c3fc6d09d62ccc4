"""int8 weight-only quantization: the plain-PyTorch layer against its formula, bytes, and bad input."""

import pytest
import torch
from conftest import tiny_model
from torch import nn

from recipes_lib.core.errors import RecipeError
from recipes_lib.inference import quantize


def test_int8_linear_matches_dequantized_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = quantize.Int8WeightOnlyLinear.from_linear(linear)
    x = torch.randn(5, 64)
    dequantized = q.weight_int8.float() * q.scale[:, None]
    torch.testing.assert_close(q(x), x @ dequantized.T + linear.bias, rtol=1e-5, atol=1e-5)
    # rounding error <= half a step
    assert (dequantized - linear.weight).abs().max() <= q.scale.max() / 2 + 1e-7


def test_model_quantizes_to_about_half_of_bf16_and_keeps_outputs():
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 10))
    before = model(ids).logits
    model, backend = quantize.int8_weight_only(model, backend="pytorch")
    assert backend == "pytorch" and not any(type(m) is nn.Linear for m in model.modules())
    n_bytes, n_values = quantize.linear_weight_bytes(model)
    assert 0.5 <= n_bytes / (2 * n_values) < 0.56
    after = model(ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_quantizing_twice_is_refused():
    model, _ = quantize.int8_weight_only(tiny_model(), backend="pytorch")
    with pytest.raises(RecipeError, match="already quantized"):
        quantize.int8_weight_only(model)


@pytest.mark.skipif(quantize.torchao_available(), reason="torchao is installed here")
def test_missing_torchao_falls_back_with_a_warning():
    with pytest.warns(UserWarning, match="torchao is not installed"):
        _, backend = quantize.int8_weight_only(tiny_model(), backend="torchao")
    assert backend == "pytorch"
