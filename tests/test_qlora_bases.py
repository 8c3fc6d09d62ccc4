"""qlora_model's three NF4 bases, and nf4.cache_per_step in a training loop, eager and compiled."""

import gc
import importlib.util
import math

import pytest
import torch

from recipes_lib.core import hardware, speed, train
from recipes_lib.core.errors import RecipeError
from recipes_lib.memory import nf4, qlora

TINY = "data/tiny-llama"
IDS = torch.randint(500, (2, 64), generator=torch.Generator().manual_seed(0))


def _model(base="torch", compiled=False):
    hardware.detect()  # its first call draws random numbers (a probe): before the seed, not after
    torch.manual_seed(0)  # the same LoRA init for every model
    model = qlora.qlora_model(TINY, r=8, gradient_checkpointing=True, base=base)
    return speed.compile_layers(model) if compiled else model


def _steps(model, optimizer, n=2):
    return [train.optimizer_step(model, optimizer, [{"input_ids": IDS, "labels": IDS}], fused_head=False)
            for _ in range(n)]


def _tolerance(model, cpu: float) -> float:
    """``cpu`` in fp32 on a CPU; bf16 on a GPU rounds at about 1e-2 and picks other kernels per path."""
    return cpu if next(model.parameters()).device.type == "cpu" else 2e-2


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_torch_base_quantizes_every_linear_but_the_head_and_keeps_fp32_adapters():
    model = _model()
    bases = [m.base_layer for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert bases and all(isinstance(b, nf4.NF4Linear) for b in bases)
    assert type(model.get_base_model().lm_head) is torch.nn.Linear
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    with pytest.raises(RecipeError, match="pick one of auto, bitsandbytes, torch, torchao"):
        qlora.qlora_model(TINY, base="gptq")


def test_cache_per_step_fills_during_a_step_empties_after_it_and_changes_nothing():
    model = _model()
    reference = _steps(model, _adamw(model))
    cached = _model()
    optimizer = nf4.cache_per_step(cached, _adamw(cached))
    store = nf4._CACHES[-1]
    sizes = []
    cached.register_forward_hook(lambda *_: sizes.append(len(store)))
    losses = _steps(cached, optimizer)
    layers = sum(isinstance(m, nf4.NF4Linear) for m in cached.modules())
    assert sizes == [layers, layers] and not store  # filled by each step's forward, emptied by its step()
    assert losses == pytest.approx(reference, rel=_tolerance(cached, 1e-5))
    optimizer.release()
    assert all(c is not store for c in nf4._CACHES)
    with pytest.raises(RecipeError, match="no NF4Linear layers"):
        nf4.cache_per_step(torch.nn.Linear(4, 4), _adamw(torch.nn.Linear(4, 4)))


def test_compiled_torch_base_trains_like_eager_and_leaves_the_cache_alone():
    model = _model()
    reference = _steps(model, _adamw(model))
    compiled = _model(compiled=True)
    optimizer = nf4.cache_per_step(compiled, _adamw(compiled))
    store = nf4._CACHES[-1]
    sizes = []
    compiled.register_forward_hook(lambda *_: sizes.append(len(store)))
    try:
        losses = _steps(compiled, optimizer)
    finally:
        optimizer.release()
    assert sizes == [0, 0]  # compiled layers do not read the eager cache (nf4.dequant_cache)
    assert losses == pytest.approx(reference, rel=_tolerance(compiled, 1e-3))


def test_a_freed_model_closes_its_cache():
    model = _model()
    optimizer = nf4.cache_per_step(model, _adamw(model))
    store = nf4._CACHES[-1]
    _steps(model, optimizer, n=1)
    del model, optimizer
    gc.collect()
    assert all(c is not store for c in nf4._CACHES)


def test_candidates_build_on_cpu():
    from recipes_lib.memory import candidates

    hw = hardware.detect("cpu")
    found = candidates.qlora_candidates(8, hw, lambda m, lr=1e-5: _adamw(m))
    assert {"ours", "ours + compiled layers", "ours, PyTorch NF4 base", "ours, PyTorch NF4 + compiled",
            "ours, PyTorch NF4 + dequantize once per step"} <= set(found)
    assert not any("CUDA graphs" in n or "Liger" in n or "FlexAttention" in n for n in found)  # GPU only
    left_out = candidates.unavailable(hw)
    assert {"CUDA graphs", "FlexAttention", "Liger kernels"} <= set(left_out)
    assert ("torchao NF4" in left_out) == (importlib.util.find_spec("torchao") is None)
    model_fn, optimizer_fn = found["ours, PyTorch NF4 + dequantize once per step"]
    model = model_fn(TINY)
    optimizer = optimizer_fn(model)
    assert any(isinstance(m, nf4.NF4Linear) for m in model.modules()) and callable(optimizer.release)
    optimizer.release()


def test_torchao_base_trains_its_adapters():
    pytest.importorskip("torchao")
    model = _model("torchao")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = _steps(model, _adamw(model))
    assert all(math.isfinite(x) for x in losses)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved)
