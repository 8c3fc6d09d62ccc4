"""Long-context pieces against their plain references: the tiled MLP (outputs, gradients, memory) and
RoPE extension (a config transformers builds and runs past the old limit)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from recipes_lib.core import checkpointing, models
from recipes_lib.core.errors import RecipeError
from recipes_lib.long_context import rope, tiling
from recipes_lib.measure.memory import peak_memory

FP32 = dict(rtol=1e-5, atol=1e-6)
LLAMA_1B = models.SHAPES_DIR / "llama-3.2-1b.json"  # Llama 3.2's shape: llama3-scaled RoPE


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    logits.float().pow(2).mean().backward()  # a loss that weighs every output element
    return logits.detach(), _grads(model)


@pytest.mark.parametrize("chunk", [8, 7, 1000])  # divides the 2 x 20 tokens, does not, one chunk
def test_tiled_mlp_matches_untiled_model(chunk):
    plain = tiny_model()
    tiled = copy.deepcopy(plain)
    assert tiling.tile_mlp(tiled, chunk) == plain.config.num_hidden_layers
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    logits, grads = _loss_and_grads(plain, ids)
    tiled_logits, tiled_grads = _loss_and_grads(tiled, ids)
    torch.testing.assert_close(tiled_logits, logits, **FP32)
    assert grads.keys() == tiled_grads.keys() and any("mlp" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(tiled_grads[name], grads[name], **FP32, msg=name)


def test_tiled_mlp_input_gradient_and_untile():
    holder = torch.nn.Module()
    holder.mlp = LlamaMLP(tiny_config())
    x = torch.randn(3, 11, 32, dtype=torch.float64, requires_grad=True)
    holder.double()
    reference = holder.mlp(x)
    (grad_reference,) = torch.autograd.grad(reference.sum(), x)
    tiling.tile_mlp(holder, 5)
    assert tiling.is_tiled(holder)
    out = holder.mlp(x)
    (grad_tiled,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_tiled, grad_reference, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: holder.mlp(t), (x[:1, :7].detach().requires_grad_(),))
    assert tiling.untile_mlp(holder) == 1 and not tiling.is_tiled(holder)
    assert "forward" not in vars(holder.mlp)


def _lora(model, dropout: float = 0.0):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                             target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"])
    return peft.get_peft_model(model, config)


def test_tiled_mlp_trains_lora_adapters():
    plain = _lora(tiny_model())
    tiled = copy.deepcopy(plain)
    assert tiling.tile_mlp(tiled, 6) == 2
    ids = torch.randint(0, 64, (1, 27), generator=torch.Generator().manual_seed(2))
    logits, grads = _loss_and_grads(plain, ids)
    tiled_logits, tiled_grads = _loss_and_grads(tiled, ids)
    torch.testing.assert_close(tiled_logits, logits, **FP32)
    adapters = [name for name in grads if "lora_" in name and "mlp" in name]
    assert len(adapters) == 2 * 3 * 2 and grads.keys() == tiled_grads.keys()  # layers x projections x A/B
    for name in grads:
        torch.testing.assert_close(tiled_grads[name], grads[name], **FP32, msg=name)


def test_backward_replays_the_forward_dropout_masks():
    """With LoRA dropout, backward's recomputation draws the masks forward drew (RNG replayed)."""
    model = _lora(tiny_model(), dropout=0.5).train()
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 10, 32, requires_grad=True)
    torch.manual_seed(3)  # reference: the same chunks by hand, plain autograd
    reference = torch.cat([mlp(x[:, i:i + 4]) for i in range(0, 10, 4)], dim=1)
    expected = torch.autograd.grad(reference.sum(), [x, *[p for p in mlp.parameters() if p.requires_grad]])
    tiling.tile_mlp(model, 4)
    torch.manual_seed(3)
    out = mlp(x)
    torch.manual_seed(99)  # backward must not depend on the RNG state it finds
    got = torch.autograd.grad(out.sum(), [x, *[p for p in mlp.parameters() if p.requires_grad]])
    torch.testing.assert_close(out, reference, **FP32)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **FP32)


@pytest.mark.parametrize("offload", [False, True])
def test_tiled_mlp_under_activation_checkpointing(offload):
    plain = tiny_model()
    tiled = copy.deepcopy(plain)
    tiling.tile_mlp(tiled, 5)
    assert checkpointing.enable_checkpointing(tiled, every=1, offload=offload) == [0, 1]
    tiled.train()
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(4))
    logits, grads = _loss_and_grads(plain, ids)
    tiled_logits, tiled_grads = _loss_and_grads(tiled, ids)
    torch.testing.assert_close(tiled_logits, logits, **FP32)
    for name in grads:
        torch.testing.assert_close(tiled_grads[name], grads[name], **FP32, msg=name)


def test_tiled_mlp_frees_the_ffn_activations():
    """Untiled, forward+backward holds the four [tokens, intermediate] tensors autograd saves (gate,
    up, SiLU output, their product) plus the gradients of some of them; tiled, those exist for one
    chunk at a time. So tiling saves at least the four saved tensors less one chunk's, and at most
    every [tokens, intermediate] tensor untiled could hold at once (four saved + three gradients)."""
    hidden, intermediate, tokens, chunk = 64, 512, 1024, 128
    unit = tokens * intermediate * 4  # one fp32 [tokens, intermediate] tensor, bytes
    holder = torch.nn.Module()
    holder.mlp = LlamaMLP(tiny_config(hidden_size=hidden, intermediate_size=intermediate))
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    peaks = []
    for tile in (False, True):
        if tile:
            tiling.tile_mlp(holder, chunk)
        with peak_memory(torch.device("cpu"), [x, *holder.parameters()]) as measured:
            out = holder.mlp(x)
            out.backward(torch.ones_like(out))
        holder.zero_grad(set_to_none=True)
        x.grad = None
        peaks.append(measured["peak"])
    untiled, tiled = peaks
    saved = untiled - tiled
    assert 4 * unit * (tokens - chunk) / tokens <= saved <= 7 * unit, (untiled, tiled, unit)


def test_bf16_weight_gradients_sum_chunks_in_fp32():
    """In bf16, 128 chunks' weight gradients summed in bf16 lose bits with every chunk (about 2.7x the
    untiled error here); summed in fp32 they stay as close to the fp64 gradient as untiled bf16 is."""
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.mlp = LlamaMLP(tiny_config(hidden_size=64, intermediate_size=256)).double()
    x, weight = torch.randn(2, 1, 2048, 64, dtype=torch.float64)
    reference = torch.autograd.grad((holder.mlp(x) * weight).sum(), list(holder.mlp.parameters()))

    def error(module) -> float:
        grads = torch.autograd.grad((module.mlp(x.bfloat16()) * weight.bfloat16()).float().sum(),
                                    list(module.mlp.parameters()))
        return max(((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, reference, strict=True))

    untiled = copy.deepcopy(holder).bfloat16()
    tiled = copy.deepcopy(untiled)
    tiling.tile_mlp(tiled, 16)
    assert error(tiled) < 1.5 * error(untiled)


def test_tile_mlp_errors():
    with pytest.raises(RecipeError, match="no gated MLP"):
        tiling.tile_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)), 8)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(RecipeError, match="chunk_tokens"):
            tiling.tile_mlp(tiny_model(), bad)


def _rotary(model):
    return model.model.rotary_emb


@pytest.mark.parametrize("kind", ["yarn", "linear"])
def test_extend_context_runs_past_the_old_limit(kind):
    config = tiny_config()
    rope.extend_context(config, 512, kind)
    assert config.max_position_embeddings == 512 and rope.trained_length(config) == 128
    model = LlamaForCausalLM(config)  # transformers builds its rotary embedding from the config
    assert _rotary(model).rope_type == kind
    ids = torch.randint(0, 64, (1, 300))  # past the original 128
    logits = model(ids).logits
    assert logits.shape == (1, 300, 64) and torch.isfinite(logits).all()


def test_yarn_and_linear_give_different_frequencies():
    default = _rotary(tiny_model()).inv_freq
    freqs = {kind: _rotary(LlamaForCausalLM(rope.extend_context(tiny_config(), 512, kind))).inv_freq
             for kind in ("yarn", "linear")}
    torch.testing.assert_close(freqs["linear"], default / 4)  # linear: every frequency divided
    assert torch.allclose(freqs["yarn"][0], default[0])  # yarn keeps the highest frequency
    assert torch.allclose(freqs["yarn"][-1], default[-1] / 4)  # and stretches the lowest
    assert not torch.allclose(freqs["yarn"], freqs["linear"])


def test_extend_context_on_a_model_rebuilds_its_rotary_embedding():
    model = tiny_model()
    rope.extend_context(model, 512, "yarn")
    fresh = LlamaForCausalLM(model.config)
    fresh.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (1, 200))
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits)
    rope.extend_context(model, 1024, "yarn")  # counted from the trained 128, not from 512
    assert model.config.rope_parameters["factor"] == 8.0
    assert model.config.rope_parameters["original_max_position_embeddings"] == 128


def test_extend_context_keeps_llama3_scaling():
    config = LlamaConfig.from_json_file(LLAMA_1B)
    rope.extend_context(config, 4 * 131072, "llama3")
    params = config.rope_parameters
    assert params["factor"] == 128.0 and params["original_max_position_embeddings"] == 8192
    with pytest.raises(RecipeError, match="llama3"):
        rope.extend_context(LlamaConfig.from_json_file(LLAMA_1B), 524288, "yarn")


def test_extend_context_errors():
    with pytest.raises(RecipeError, match="factor of 0.5"):
        rope.extend_context(tiny_config(), 64, "yarn")
    with pytest.raises(RecipeError, match="kind='ntk'"):
        rope.extend_context(tiny_config(), 512, "ntk")
    with pytest.raises(RecipeError, match="llama3"):
        rope.extend_context(tiny_config(), 512, "llama3")


def test_agreement_reports_the_tiled_mlp_against_the_untiled_one(monkeypatch):
    model = tiny_model()
    errors = tiling.agreement(model, tokens=50, chunk_tokens=16)  # 16 does not divide 50
    weights = ["d gate_proj.weight", "d up_proj.weight", "d down_proj.weight"]
    assert list(errors) == ["output", "d input", *weights]
    assert all(e < 1e-5 for e in errors.values()) and tiling.is_tiled(model)
    plain_forward = LlamaMLP.forward
    monkeypatch.setattr(tiling, "_untiled", lambda mlp, x: 1.01 * plain_forward(mlp, x))  # a wrong tiling
    errors = tiling.agreement(tiny_model(), tokens=50, chunk_tokens=16)
    assert errors["output"] == pytest.approx(0.01, rel=1e-3) and errors["d input"] > 1e-3


def test_extend_context_counts_from_a_given_trained_length():
    config = tiny_config()  # 128 positions
    rope.extend_context(config, 64, "yarn", trained=16)  # trained on 16-token rows: x4, below the limit
    assert config.max_position_embeddings == 64
    assert config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["original_max_position_embeddings"] == 16
    linear = rope.extend_context(tiny_config(), 64, "linear", trained=16)
    assert linear.rope_parameters["factor"] == 4.0 and rope.trained_length(linear) == 16
    with pytest.raises(RecipeError, match="trained=0"):
        rope.extend_context(tiny_config(), 64, "yarn", trained=0)
    with pytest.raises(RecipeError, match="llama3-scaled RoPE names its own"):
        rope.extend_context(LlamaConfig.from_json_file(LLAMA_1B), 524288, "llama3", trained=8192)
