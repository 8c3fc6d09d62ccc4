"""The fused LoRA MLP (``memory.lora_mlp``) computes what peft's three LoRA projections compute, forward and
backward, in fp32 and under bf16 autocast, under checkpointing, with a scale per projection; it steps
aside for disabled adapters and refuses what it cannot fuse."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from recipes_lib.core import batches, hardware, tasks
from recipes_lib.core.errors import RecipeError
from recipes_lib.core.models import load_model, load_tokenizer
from recipes_lib.memory import lora_mlp, qlora

TINY = "data/tiny-llama"
CPU = hardware.detect("cpu")


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer(TINY)
    return batches.pad_batch(batches.encode(tokenizer, tasks.make_examples(4, seed=3)),
                             pad_id=tokenizer.pad_token_id)


def _with_nonzero_b(model):
    for name, param in model.named_parameters():  # B starts at 0: give it values, so every gradient flows
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return model


def _lora_model():
    torch.manual_seed(0)
    return _with_nonzero_b(qlora.add_lora(load_model(TINY, hw=CPU), r=4, alpha=8))


def _loss_and_grads(model, batch, autocast=None):
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("autocast, tolerance", [(None, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_mlp_matches_peft(batch, autocast, tolerance):
    plain = _lora_model()
    fused = lora_mlp.fuse(copy.deepcopy(plain))
    assert all(hasattr(layer.mlp, "lora_mlp_parts") for layer in fused.base_model.model.model.layers)
    loss, grads = _loss_and_grads(plain, batch, autocast)
    fused_loss, fused_grads = _loss_and_grads(fused, batch, autocast)
    torch.testing.assert_close(fused_loss, loss, rtol=tolerance, atol=tolerance)
    assert fused_grads.keys() == grads.keys() and any("mlp" in n for n in grads)
    for name, grad in grads.items():
        scale = grad.abs().max().clamp_min(1e-8)
        assert (fused_grads[name] - grad).abs().max() <= tolerance * scale, name


def _checkpointed(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def test_fused_mlp_under_checkpointing_matches_peft(batch):
    plain = _lora_model()
    fused = _checkpointed(lora_mlp.fuse(copy.deepcopy(plain)))
    loss, grads = _loss_and_grads(_checkpointed(plain), batch)
    fused_loss, fused_grads = _loss_and_grads(fused, batch)  # the layer's forward runs twice: recomputed
    torch.testing.assert_close(fused_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_each_projection_keeps_its_own_scale_and_disabled_adapters_take_peft_path(batch):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"down_proj": 32}, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    plain = _with_nonzero_b(get_peft_model(load_model(TINY, hw=CPU), config))
    mlp = plain.base_model.model.model.layers[0].mlp
    assert mlp.down_proj.scaling["default"] == 4 * mlp.gate_proj.scaling["default"]  # the pattern took
    fused = lora_mlp.fuse(copy.deepcopy(plain))
    torch.testing.assert_close(_loss_and_grads(fused, batch)[0], _loss_and_grads(plain, batch)[0])
    with fused.disable_adapter(), plain.disable_adapter():
        torch.testing.assert_close(fused(**batch).loss, plain(**batch).loss)


def test_fuse_refuses_dropout_dora_and_plain_models():
    with pytest.raises(RecipeError, match="lora_dropout=0"):
        lora_mlp.fuse(qlora.add_lora(load_model(TINY, hw=CPU), r=4, alpha=8, dropout=0.1))
    dora = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear", task_type="CAUSAL_LM")
    with pytest.raises(RecipeError, match="DoRA"):
        lora_mlp.fuse(get_peft_model(load_model(TINY, hw=CPU), dora))
    with pytest.raises(RecipeError, match="not a peft LoRA layer"):
        lora_mlp.fuse(load_model(TINY, hw=CPU))
