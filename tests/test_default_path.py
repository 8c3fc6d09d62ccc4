"""The library's default training path (issue 18 point 4): what wins in notebook 01 is what the library,
the ladder and ``recipes train`` build, and each falls back, saying so, where it cannot run."""

import dataclasses
import importlib.util

import pytest
import torch

from recipes_lib.app import config, export
from recipes_lib.core import hardware, speed
from recipes_lib.memory import qlora

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


def test_qlora_model_auto_on_cpu_is_the_eager_bitsandbytes_path(tiny_model_dir):
    model = qlora.qlora_model(tiny_model_dir, r=2, hw=CPU)
    layers = model.base_model.model.model.layers
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in layers)
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
])
def test_recipes_train_compiles_where_notebook_01_measured_it(overrides, hw, compiled, reason):
    cfg = config.load(None, overrides)
    assert cfg.model.compile in ("auto", True, False)
    found, why = config.compile_choice(cfg, hw)
    assert found is compiled and reason in why


def test_recipes_train_nf4_base_auto_follows_the_compiled_layers(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torchao"
                        else found(name, *a))
    assert config.nf4_base_choice(config.load(None, ["method=qlora"]), H100)[0] == "torchao"
    base, why = config.nf4_base_choice(config.load(None, ["method=qlora", "compile=false"]), H100)
    assert base == "bitsandbytes" and "eager" in why  # torchao's base pays only compiled
    assert config.nf4_base_choice(config.load(None, ["method=qlora"]), CPU)[0] == "bitsandbytes"
    assert config.nf4_base_choice(config.load(None, ["method=qlora", "nf4_base=torch"]), CPU)[0] == "torch"


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
