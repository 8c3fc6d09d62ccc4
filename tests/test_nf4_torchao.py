"""memory.nf4_torchao: torchao's NF4 tensor as a frozen QLoRA base (skipped without torchao)."""

import copy

import pytest
import torch

from recipes_lib.core import hardware
from recipes_lib.core.errors import RecipeError
from recipes_lib.memory import lora_mlp, nf4_torchao, qlora

pytest.importorskip("torchao")


def test_layer_matches_its_dequantized_weight_and_trains_the_input_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=True)
    layer = nf4_torchao.TorchaoNF4Linear.from_linear(linear, torch.float32)
    dense = layer.weight.to(torch.float32)  # the NF4 weight, dequantized
    # 4-bit: close, not equal. Half NF4's widest gap is 0.14 of a block's absmax; the int8 scales add a little
    assert 0 < (dense - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()
    x = torch.randn(4, 256, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, dense, linear.bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 128) @ dense, rtol=1e-5, atol=1e-5)
    assert not layer.weight.requires_grad and layer.weight.grad is None


def test_quantize_model_skips_the_head_and_refuses_odd_sizes():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(256, 128))
    model.add_module("lm_head", torch.nn.Linear(128, 64))
    nf4_torchao.quantize_model(model, torch.float32)
    assert isinstance(model.proj, nf4_torchao.TorchaoNF4Linear) and type(model.lm_head) is torch.nn.Linear
    with pytest.raises(RecipeError, match="multiple of 16384"):
        nf4_torchao.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), torch.float32)


def test_fused_lora_mlp_on_the_torchao_base_matches_peft():
    """``lora_mlp.fuse`` on torchao's base (notebook 01's candidate): the same loss and adapter gradients as
    peft's own layers, on this machine's device (the GPU where there is one), under its autocast."""
    hw = hardware.detect()
    torch.manual_seed(0)
    plain = qlora.qlora_model("data/tiny-llama", r=4, base="torchao", hw=hw)
    for name, param in plain.named_parameters():  # B starts at 0: give it values, so every gradient flows
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    fused = lora_mlp.fuse(copy.deepcopy(plain))
    ids = torch.randint(500, (2, 64), generator=torch.Generator().manual_seed(0)).to(hw.device)
    found = []
    for model in (plain, fused):
        with torch.autocast(hw.device.type, dtype=hw.amp_dtype, enabled=hw.amp_dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        found.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (fused_loss, fused_grads) = found
    tolerance = 1e-4 if hw.amp_dtype is None else 3e-2
    torch.testing.assert_close(fused_loss, loss, rtol=tolerance, atol=tolerance)
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).abs().max() <= tolerance * grad.abs().max().clamp_min(1e-8), name
