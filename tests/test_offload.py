"""offload: a plain AdamW on CPU; on a GPU, torchao's CPUOffloadOptimizer, checked against AdamW."""

import copy
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


def _adamw_steps(model, optimizer, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        input_ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator).to("cuda")
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves optimizer state off a CUDA GPU")
def test_offloaded_adamw_matches_adamw_on_a_gpu():
    """Three steps with the state and the step on the host give AdamW's parameters on the GPU."""
    pytest.importorskip("torchao")
    # d=128: the linears and embeddings pass torchao's minimal_size (4096) and are offloaded; the
    # norms stay on the GPU under its on-device AdamW, so both paths are checked.
    model = tiny_model(512, hidden_size=128, intermediate_size=256).to("cuda")
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    offloaded = offload.offloaded_adamw(model.parameters(), torch.device("cuda"), lr=1e-3, weight_decay=0.01)
    _adamw_steps(model, offloaded)
    _adamw_steps(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01))
    state = offload.optimizer_state_bytes(offloaded)
    assert state["cpu"] > 0.9 * sum(state.values())  # the moments live in host memory
    for (name, param), expected, start in zip(model.named_parameters(), reference.parameters(),
                                              initial.parameters()):
        assert not torch.equal(param, start), f"{name} did not move"
        torch.testing.assert_close(param, expected, rtol=1e-4, atol=1e-5, msg=f"{name} differs from AdamW's")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves optimizer state off a CUDA GPU")
def test_release_frees_the_model_of_an_offloading_optimizer():
    """Without ``release``, torchao's per-parameter hooks keep model and optimizer alive after ``del``."""
    import gc

    def allocated_after_a_step(release: bool) -> int:
        before = torch.cuda.memory_allocated()
        # weights above torchao's minimal_size (4,096 elements): only those are offloaded and hooked
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)).cuda()
        optimizer = offload.offloaded_adamw(model.parameters(), torch.device("cuda"), lr=1e-3)
        model(torch.ones(4, 256, device="cuda")).sum().backward()
        optimizer.step()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if release:
            offload.release(optimizer)
        del model, optimizer
        gc.collect()
        return torch.cuda.memory_allocated() - before, weights

    kept, weights = allocated_after_a_step(release=False)
    assert kept >= weights  # the leak this guards against: the weights stay allocated
    freed, _ = allocated_after_a_step(release=True)
    assert freed < weights // 10


def test_release_empties_whatever_optimizer_it_gets():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    offload.release(optimizer)  # a plain AdamW (the CPU path) has nothing to release
    assert len(optimizer.param_groups[0]["params"]) == 1
