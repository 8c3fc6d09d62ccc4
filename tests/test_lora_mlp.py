"""The fused LoRA MLP (``memory.lora_mlp``) computes what peft's three LoRA projections compute, forward and
backward, in fp32 and under bf16 autocast, under checkpointing, and refuses what it cannot fuse."""

import copy

import pytest
import torch

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


def _lora_model():
    torch.manual_seed(0)
    model = qlora.add_lora(load_model(TINY, hw=CPU), r=4, alpha=8)
    for name, param in model.named_parameters():  # B starts at 0: give it values, so every gradient flows
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return model


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
        assert fused_grads[name].dtype == torch.float32  # the adapters' own dtype


def test_fused_mlp_under_checkpointing_trains(batch):
    model = lora_mlp.fuse(_lora_model())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_fuse_refuses_dropout_and_plain_models():
    with pytest.raises(RecipeError, match="lora_dropout=0"):
        lora_mlp.fuse(qlora.add_lora(load_model(TINY, hw=CPU), r=4, alpha=8, dropout=0.1))
    with pytest.raises(RecipeError, match="not a peft LoRA layer"):
        lora_mlp.fuse(load_model(TINY, hw=CPU))
