"""RMSNorm against its formula; the LayerNorm swap carries weights and leaves no LayerNorm."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from recipes_lib.core.errors import RecipeError
from recipes_lib.inference import norms
from recipes_lib.measure import norm_bench


@pytest.mark.parametrize("fused", [False, True])
def test_rmsnorm_matches_formula(fused):
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    norm = norms.RMSNorm(16, eps=1e-5, bias=True, fused=fused).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected)


def test_swap_carries_weights_and_removes_every_layernorm():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
    weight = model.transformer.ln_f.weight.clone()
    n = norms.count_layernorms(model)
    assert norms.swap_layernorm(model) == n == 5  # ln_1 and ln_2 per layer, and ln_f
    assert norms.count_layernorms(model) == 0
    assert isinstance(model.transformer.ln_f, norms.RMSNorm)
    torch.testing.assert_close(model.transformer.ln_f.weight, weight)
    # Zero-mean inputs: LayerNorm and RMSNorm coincide (up to eps), so the swap is exact there.
    ln = nn.LayerNorm(32)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    holder = nn.Sequential(ln)
    x = torch.randn(4, 32)
    x = x - x.mean(-1, keepdim=True)
    expected = ln(x)
    norms.swap_layernorm(holder)
    torch.testing.assert_close(holder[0](x), expected, rtol=1e-4, atol=1e-4)


def test_swap_without_layernorm_is_refused():
    with pytest.raises(RecipeError, match="no nn.LayerNorm"):
        norms.swap_layernorm(nn.Sequential(nn.Linear(4, 4)))


def test_norm_functions_compute_their_norms():
    x, w, b = torch.randn(6, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64), torch.randn(64)
    fns = norms.norm_functions(64, torch.device("cpu"), torch.float64, compile=False)
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(fns["RMSNorm (eager formula)"](x, w, None), rms)
    torch.testing.assert_close(fns["RMSNorm (F.rms_norm)"](x, w, None), rms)
    centred = x - x.mean(-1, keepdim=True)
    layer = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * w + b.double()
    torch.testing.assert_close(fns["LayerNorm (native)"](x, w, b.double()), layer)


def test_train_step_timing_leaves_the_model_as_it_was():
    """Forward + backward only: no optimizer step, and no gradient left behind."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norm_bench.train_step_timing(model, batch=2, seq_len=8, repeats=1, warmup=1)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert all(p.grad is None for p in model.parameters())


def test_triton_rmsnorm_launch_sizes():
    """Warps grow with the row, and the backward grid never has more programs than rows (no triton needed)."""
    from recipes_lib.inference import rmsnorm_triton

    warps = [rmsnorm_triton.num_warps_for(block) for block in (64, 1024, 2048, 4096, 8192, 16384)]
    assert warps == [4, 4, 8, 8, 16, 32]
    cpu = torch.device("cpu")
    assert rmsnorm_triton.backward_programs(2, cpu, 4) == 2
    assert rmsnorm_triton.backward_programs(1000, cpu, 4) == rmsnorm_triton.INTERPRETER_PROGRAMS
