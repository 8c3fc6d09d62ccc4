"""offload: on CPU the optimizer is a plain AdamW whose state lives in host memory."""

import sys

import pytest
import torch
from conftest import tiny_model

from recipes_lib.core.errors import RecipeError
from recipes_lib.memory import offload


def test_offloaded_adamw_on_cpu_is_adamw():
    model = tiny_model(64)
    model.model.embed_tokens.weight.requires_grad_(False)
    optimizer = offload.offloaded_adamw(model.parameters(), torch.device("cpu"), lr=1e-3, weight_decay=0.05)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.05
    params = group["params"]
    assert all(p.requires_grad for p in params)  # frozen parameters are left out
    assert len(params) == sum(1 for p in model.parameters() if p.requires_grad)

    assert offload.optimizer_state_bytes(optimizer) == {}  # no state before the first step
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    optimizer.step()
    n_trainable = sum(p.numel() for p in params)
    assert offload.optimizer_state_bytes(optimizer)["cpu"] >= 2 * 4 * n_trainable  # two fp32 moments each
    state = optimizer.state[params[0]]
    assert state["exp_avg"].shape == params[0].shape


def test_offloaded_adamw_needs_torchao_on_an_accelerator(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # torchao missing
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(RecipeError, match="torchao"):
        offload.offloaded_adamw(params, torch.device("cuda"))


def test_optimizer_state_bytes_of_a_wrapper():
    """Wrappers exposing ``optim_dict`` (torchao's CPUOffloadOptimizer) are looked through."""
    param = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(3)
    inner.step()

    class Wrapper:
        optim_dict = {"p": inner}

    assert offload.optimizer_state_bytes(Wrapper()) == {"cpu": 3 * 4}  # SGD momentum buffer
