"""The library's default training path (issue 18 point 4): what wins in notebook 01 is what the library,
the ladder and ``recipes train`` build, and each falls back, saying so, where it cannot run."""

import dataclasses
import importlib.util

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from recipes_lib.app import checkpoint, config, export, fast_path
from recipes_lib.core import hardware, models, speed
from recipes_lib.core.errors import RecipeError
from recipes_lib.memory import nf4_torchao, qlora

CPU = hardware.detect("cpu")
H100 = dataclasses.replace(CPU, device=torch.device("cuda"), name="NVIDIA H100 80GB HBM3", bf16=True)
T4 = dataclasses.replace(H100, name="Tesla T4", bf16=False)


def test_default_compile_only_on_a_bf16_gpu():
    compiled, why = speed.default_compile(H100)
    assert compiled and why == "compiled decoder layers (the fastest step measured, notebook 01)"
    compiled, why = speed.default_compile(CPU)
    assert not compiled and "need a GPU" in why
    compiled, why = speed.default_compile(T4)
    assert not compiled and "bf16" in why


def test_qlora_default_path_is_torchao_compiled_on_a_bf16_gpu(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torchao"
                        else found(name, *a))
    assert qlora.default_path(H100)[:2] == ("torchao", True)
    assert qlora.default_path(H100, sharded=True)[:2] == ("bitsandbytes", False)  # FSDP2 shards bnb words
    for hw in (CPU, T4):
        base, compiled, why = qlora.default_path(hw)
        assert (base, compiled) == ("bitsandbytes", False) and why.startswith("bitsandbytes' base, eager")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao"
                        else found(name, *a))
    base, compiled, why = qlora.default_path(H100)
    assert (base, compiled) == ("bitsandbytes", True) and "pip install torchao" in why


def test_torchao_base_is_picked_only_for_models_it_can_take(monkeypatch):
    llama_1b = AutoConfig.from_pretrained(models.resolve("random:llama-3.2-1b"))
    assert nf4_torchao.unsupported(llama_1b) is None
    # SmolLM2-135M's widths: 576 x 576 weights are not a multiple of 16384
    smollm = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, num_hidden_layers=2)
    assert "not a multiple of 16384" in nf4_torchao.unsupported(smollm)
    assert "Conv1D" in nf4_torchao.unsupported(AutoConfig.from_pretrained("data/tiny-gpt2"))
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torchao"
                        else found(name, *a))
    assert qlora.default_path(H100, config=llama_1b)[:2] == ("torchao", True)
    base, compiled, why = qlora.default_path(H100, config=smollm)
    assert (base, compiled) == ("bitsandbytes", True) and "cannot take this model" in why


def test_qlora_model_auto_on_cpu_is_the_eager_bitsandbytes_path(tiny_model_dir):
    model = qlora.qlora_model(tiny_model_dir, r=2, hw=CPU)
    layers = model.base_model.model.model.layers
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in layers)
    assert qlora.base_of(model) == ("bitsandbytes" if CPU.bitsandbytes else None)
    with pytest.raises(Exception, match="pick one of auto"):
        qlora.qlora_model(tiny_model_dir, base="gguf", hw=CPU)


@pytest.mark.parametrize("overrides, hw, compiled, reason", [
    (["method=full"], H100, True, "compiled decoder layers"),
    (["method=qlora"], H100, True, "compiled decoder layers"),
    (["method=full"], CPU, False, "need a GPU"),
    (["method=lora"], H100, False, "model.method: lora"),
    (["method=full", "strategy=ddp"], H100, False, "train.strategy: ddp"),
    (["method=full", "sliding_window=64"], H100, False, "model.sliding_window"),
    (["method=full", "compile=false"], H100, False, "model.compile: false"),
    (["method=lora", "compile=true"], CPU, True, "model.compile: true"),
    (["method=full", "precision=fp32"], H100, False, "model.precision: fp32"),
    (["method=qlora", "optim.offload=true", "max_grad_norm=null"], H100, True, "compiled decoder layers"),
])
def test_recipes_train_compiles_where_notebook_01_measured_it(overrides, hw, compiled, reason):
    cfg = config.load(None, overrides)
    found, why = fast_path.compile_choice(cfg, hw)
    assert found is compiled and reason in why


def test_recipes_train_nf4_base_auto_follows_the_compiled_layers(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torchao"
                        else found(name, *a))
    assert fast_path.nf4_base_choice(config.load(None, ["method=qlora"]), H100)[0] == "torchao"
    base, why = fast_path.nf4_base_choice(config.load(None, ["method=qlora", "compile=false"]), H100)
    assert base == "bitsandbytes" and "model.compile: false" in why  # torchao's base pays only compiled
    assert fast_path.nf4_base_choice(config.load(None, ["method=qlora"]), CPU)[0] == "bitsandbytes"
    assert fast_path.nf4_base_choice(config.load(None, ["method=qlora", "nf4_base=torch"]), CPU)[0] == "torch"
    base, why = fast_path.nf4_base_choice(config.load(None, ["method=qlora", "strategy=ddp"]), H100)
    assert base == "bitsandbytes" and "train.strategy: ddp" in why
    long = config.load(None, ["method=qlora", "compile=true", "sliding_window=64"])
    assert fast_path.nf4_base_choice(long, H100)[0] == "bitsandbytes"  # compiled, but not measured so


def test_resume_refuses_another_4bit_base(tmp_path):
    cfg = config.load(None, ["method=qlora"])
    lm = qlora.qlora_model("data/tiny-llama", r=2, base="torch", hw=CPU)
    assert qlora.base_of(lm) == "torch"
    assert qlora.base_of(models.load_model("data/tiny-llama", hw=CPU)) is None
    torch.save({"config": cfg.model_dump(), "nf4_base": "torchao"}, tmp_path / "state.pt")
    with pytest.raises(RecipeError, match="the 4-bit base: torchao -> torch"):
        checkpoint.load(tmp_path, lm, None, None, None, cfg)
    torch.save({"config": cfg.model_dump()}, tmp_path / "state.pt")  # "auto", base not recorded: not checked
    with pytest.raises(FileNotFoundError):  # past the base check, to the weights this test did not write
        checkpoint.load(tmp_path, lm, None, None, None, cfg)
    before = {"config": {"model": {"method": "qlora", "nf4_base": "torch"}}}  # saved before the key existed
    assert checkpoint.saved_nf4_base(before) == "torch"
    assert checkpoint.saved_nf4_base({"config": {"model": {"method": "lora"}}}) is None


def test_axolotl_export_of_compile_auto_says_what_it_leaves_off():
    exported, messages = export.axolotl(config.load(None, ["method=qlora"]))
    assert "torch_compile" not in exported
    assert any("model.compile: auto" in m and m.startswith("note:") for m in messages)
    exported, _ = export.axolotl(config.load(None, ["method=qlora", "compile=true"]))
    assert exported["torch_compile"] is True


def test_full_step_peers_are_the_installed_maintained_kernels(monkeypatch):
    from recipes_lib.memory import candidates

    assert candidates.full_step_peers(lambda: None, CPU) == {}  # Triton kernels: GPUs only
    monkeypatch.setattr(candidates, "unavailable", lambda hw: {})
    peers = candidates.full_step_peers(lambda: None, H100)
    assert set(peers) == {"plain transformers + Liger kernels", "Cut Cross-Entropy as our step's loss",
                          "Cut Cross-Entropy as our compiled step's loss"}
    assert all(how["may_fail"] for _, how in peers.values())  # a kernel error is a row, not a lost run
    assert not any(name.startswith("ours") for name in peers)  # the notebook's "our fastest" excludes them
