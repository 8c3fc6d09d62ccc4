"""core.speed: compiled decoder layers train like eager ones (with checkpointing too); Liger's errors and
its module-wide swaps undone; bench's profiled busy share."""

import importlib

import pytest
import torch
from conftest import tiny_model

from recipes_lib.core import batches, checkpointing, hardware, speed, train
from recipes_lib.core.errors import RecipeError
from recipes_lib.measure import bench

VOCAB, SEQ_LEN = 64, 32


def _loss_and_grads(model, ids):
    loss = train.loss_sum(model, {"input_ids": ids, "labels": ids})
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_compiled_layers_under_checkpointing_match_eager():
    ids = torch.randint(VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    eager = tiny_model(VOCAB)
    compiled = tiny_model(VOCAB)  # same seed: the same weights
    for model in (eager, compiled):
        checkpointing.enable_checkpointing(model)
        model.train()
    speed.compile_layers(compiled)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in compiled.model.layers)
    torch._dynamo.utils.counters.clear()
    loss, grads = _loss_and_grads(eager, ids)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, ids)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 1  # it really compiled
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_liger_says_what_to_change_on_cpu():
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(RecipeError, match="pip install liger-kernel"):
            speed.apply_liger(tiny_model(VOCAB))
    else:
        with pytest.raises(RecipeError, match="CUDA GPUs only"):
            speed.apply_liger(tiny_model(VOCAB))


def test_remove_liger_restores_the_module_wide_swaps():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    speed._originals[(modeling_llama, "apply_rotary_pos_emb")] = original  # as apply_liger records it
    modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None  # what Liger's patch does module-wide
    speed.remove_liger()
    assert modeling_llama.apply_rotary_pos_emb is original and not speed._originals


def test_bench_profile_reports_the_busy_share():
    docs = batches.random_documents(32, VOCAB, 4, 16, seed=1)
    config = bench.Config("profiled", lambda: tiny_model(VOCAB),
                          lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), 2)
    row = bench.run(config, lambda mb: batches.packed_batches(docs, SEQ_LEN, mb), hardware.detect("cpu"),
                    steps=2, warmup=1, seq_len=SEQ_LEN, profile=2)
    assert 0 < row["busy_pct"] <= 100
    assert row["profiled_step_s"] > 0
    table = bench.table([row])
    assert table.loc["profiled", "device busy (%)"] == round(row["busy_pct"], 1)


def test_a_candidate_that_may_fail_becomes_a_row_and_others_still_raise():
    def broken():
        raise NotImplementedError("this stack has no kernel for it")

    hw = hardware.detect("cpu")
    candidate = bench.Config("candidate", broken, lambda m: None, 2, may_fail=True)
    row = bench.run(candidate, lambda mb: iter(()), hw)
    assert row["oom"] and row["failed"] == "NotImplementedError: this stack has no kernel for it"
    assert bench.table([row]).loc["candidate", "peak (GiB)"].startswith("failed: NotImplementedError")
    assert not bench.fits(row) and bench.rate(row) == 0.0
    with pytest.raises(NotImplementedError):
        bench.run(bench.Config("plain", broken, lambda m: None, 2), lambda mb: iter(()), hw)


def test_curve_ends_compares_the_last_steps_against_their_noise():
    from recipes_lib.measure import quality

    flat = [3.0, 2.0, 1.2, 1.0, 1.2, 1.0, 1.2]  # ends alternating 1.0 / 1.2: noise 0.2
    lower = [x - 0.1 for x in flat]
    ends = quality.curve_ends({"a": flat, "b": lower}, last=4)
    assert ends["a"] == pytest.approx(1.1) and ends["b"] == pytest.approx(1.0)
    assert ends["gap"] == pytest.approx(0.1) and ends["noise"] == pytest.approx(0.2)
    far = quality.curve_ends({"a": flat, "b": [x + 1.0 for x in flat]}, last=4)
    assert far["gap"] == pytest.approx(1.0) and far["gap"] > 2 * far["noise"]  # what the notebook refuses
    with pytest.raises(ValueError, match="two curves"):
        quality.curve_ends({"a": flat})
