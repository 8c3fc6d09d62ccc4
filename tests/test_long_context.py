"""Selective checkpointing, the ladder's search, and the sequence-length curriculum."""

import pytest
import torch

from recipes_lib.core import checkpointing, errors, hardware, losses, models, train
from recipes_lib.long_context import curriculum, ladder
from recipes_lib.measure import ladder_bench, loss_bench, memory


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    losses.cross_entropy_sum(model(input_ids=ids, use_cache=False).logits, ids).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_selective_checkpointing_same_gradients():
    model = models.load_model()
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = _grads(model, ids)
    for every, expected in [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3])]:
        assert checkpointing.enable_checkpointing(model, every=every) == expected
        model.train()
        torch.testing.assert_close(_grads(model, ids), reference, atol=1e-6, rtol=1e-5)
    checkpointing.disable_checkpointing(model)
    with pytest.raises(errors.RecipeError):
        checkpointing.enable_checkpointing(model, every=0)


def test_offloaded_checkpointing_same_gradients():
    model = models.load_model()
    ids = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    reference = _grads(model, ids)
    checkpointing.enable_checkpointing(model, every=1, offload=True)
    model.train()
    torch.testing.assert_close(_grads(model, ids), reference, atol=1e-6, rtol=1e-5)


def test_longest_trainable_search():
    calls = []

    def step(n):
        calls.append(n)
        return {"seq_len": n, "oom": n > 5000}

    best, rows = ladder.longest_trainable(step, 1024, 65536, refine=3, multiple=256)
    assert calls == [1024, 2048, 4096, 8192, 6144, 5120, 4608] and best == 4608 and len(rows) == len(calls)
    assert ladder.longest_trainable(step, 1024, 4096)[0] == 4096  # reaching the limit ends the search
    assert ladder.longest_trainable(lambda n: {"oom": True}, 1024, 4096)[0] is None


def test_train_step_is_one_adamw_step_and_budget_counts_as_oom():
    hw = hardware.detect("cpu")
    model, plain = models.load_model(), models.load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    rung = ladder.Rung("x", "sdpa", chunked_loss=True)
    ladder.apply(model, rung)
    row = ladder_bench.train_step(model, optimizer, 64, hw, fused_head=True, name="x")
    assert not row["oom"] and row["name"] == "x" and row["seq_len"] == 64
    assert row["peak_bytes"] > memory.tensor_bytes(model.parameters())  # parameters, AdamW state, activations
    batch = ladder_bench.random_batch(model.config.vocab_size, 64, hw.device)
    loss = losses.cross_entropy_sum(plain(input_ids=batch["input_ids"]).logits, batch["labels"])
    (loss / losses.count_targets(batch["labels"])).backward()
    plain_optimizer.step()
    for ours, reference in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)  # AdamW moved each by ~lr = 1e-3
    assert all(p.grad is None for p in model.parameters())
    assert ladder_bench.train_step(model, optimizer, 64, hw, True, budget_bytes=row["peak_bytes"] // 4)["oom"]
    with pytest.raises(errors.RecipeError):
        ladder.apply(model, ladder.Rung("bad", offload_activations=True))


def test_train_step_out_of_memory_is_a_row_and_frees_gradients(monkeypatch):
    hw = hardware.detect("cpu")
    model = models.load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def backward_then_oom(model, optimizer, micro_batches, *args, **kwargs):
        train.accumulate_gradients(model, micro_batches)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train, "optimizer_step", backward_then_oom)
    row = ladder_bench.train_step(model, optimizer, 32, hw)
    assert row["oom"] and row["seconds"] is None and "tokens_per_s" not in row
    assert all(p.grad is None for p in model.parameters())


def test_climb_applies_each_rung_and_measures_at_its_longest():
    model = models.load_model()
    fits = {"eager": 2048, "sdpa": 5000}
    calls = []

    def step(rung, n):
        assert model.config._attn_implementation == models.attention_implementation(rung.attention)
        calls.append((rung.name, n))
        return {"oom": n > fits[rung.attention], "peak_bytes": n, "seconds": 1.0, "tokens_per_s": n}

    rungs = [ladder.Rung("base", "eager"), ladder.Rung("flash", "sdpa", 1)]
    summary, probes = ladder.climb(model, rungs, step, 1024, 4096)
    assert [r["longest"] for r in summary] == [2048, 4096]
    assert [r["at limit"] for r in summary] == [False, True]
    assert summary[1]["peak_bytes"] == 4096 and calls[-1] == ("flash", 4096)
    assert len(probes) == len(calls) - 2  # the measurement at each rung's longest is not a probe
    assert all(layer.gradient_checkpointing for layer in models.decoder_layers(model))


def test_climb_keeps_a_slow_probe_as_the_row_at_the_longest_length():
    model = models.load_model()
    calls = []

    def step(rung, n):  # a step of minutes at 4096 (as 2^19 tokens on a GPU), of a second below
        calls.append(n)
        return {"oom": n > 4096, "peak_bytes": n, "seconds": 300.0 if n == 4096 else 1.0, "tokens_per_s": n}

    rungs = [ladder.Rung("slow at its longest", "sdpa", 1)]
    summary, probes = ladder.climb(model, rungs, step, 1024, 8192, rerun_under_s=60)
    assert summary[0]["longest"] == 4096 and summary[0]["seconds"] == 300.0
    assert calls.count(4096) == 1 and len(probes) == len(calls)  # the search's step at 4096 stands
    calls.clear()
    summary, probes = ladder.climb(model, rungs, step, 1024, 8192)  # default: one more step, warm
    assert calls.count(4096) == 2 and len(probes) == len(calls) - 1
    calls.clear()
    summary, _ = ladder.climb(model, rungs, step, 1024, 2048, rerun_under_s=60)  # a fast step: run again
    assert summary[0]["longest"] == 2048 and calls == [1024, 2048, 2048]
    assert summary[0]["split"] is None  # a step that has none

    def profiled(rung, n):  # as ladder_bench.train_step(profile=True) adds it
        return {**step(rung, n), "split": f"split at {n}"}

    summary, _ = ladder.climb(model, rungs, profiled, 1024, 8192, rerun_under_s=60)
    assert summary[0]["split"] == "split at 4096"  # the slow step's own, kept with its row


def test_length_schedule():
    schedule = curriculum.length_schedule(512, 12, start=128, grow_fraction=0.5)
    assert schedule == [128] * 3 + [256] * 3 + [512] * 6
    assert curriculum.length_schedule(512, 5) == [512] * 5
    with pytest.raises(errors.RecipeError):
        curriculum.length_schedule(512, 10, start=100)


def test_curriculum_run_counts_tokens():
    model = models.fresh_model(models.DEFAULT_MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = torch.randint(3, 500, (4096,), generator=torch.Generator().manual_seed(0))
    schedule = curriculum.length_schedule(64, 4, start=32)
    history = curriculum.run(model, optimizer, schedule, stream, 256, lambda: 1.0, eval_every=2,
                             progress=False)
    assert history.tokens == [256, 512, 768, 1024] and history.lengths == schedule
    assert history.eval_tokens == [512, 1024] and history.time_to_reach(1.0) == history.eval_seconds[0]
    assert set(history.step_seconds_by_length()) == {32, 64}
    with pytest.raises(errors.RecipeError):
        curriculum.run(model, optimizer, [48], stream, 256, lambda: 1.0, eval_every=1, progress=False)


def test_lengths_past_the_position_limit_are_refused():
    hw = hardware.detect("cpu")
    model = models.load_model()
    limit = model.config.max_position_embeddings
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with pytest.raises(errors.RecipeError, match="RoPE"):
        ladder_bench.train_step(model, optimizer, limit + 1, hw)
    stream = torch.randint(3, 500, (8 * limit,))
    with pytest.raises(errors.RecipeError, match="RoPE"):
        curriculum.run(model, optimizer, [2 * limit], stream, 2 * limit, lambda: 1.0, eval_every=1,
                       progress=False)
    with pytest.raises(errors.RecipeError, match="no step"):
        curriculum.length_schedule(4096, 2, start=512)


def test_loss_step_peak_chunked_never_holds_the_logits():
    hw = hardware.detect("cpu")
    tokens, vocab, hidden = 4096, 2048, 32
    logits, chunk = tokens * vocab * 4, 1024 * vocab * 4  # fp32 [tokens, vocab], and one 1024-token chunk
    standard = loss_bench.loss_step_peak(hw, tokens, vocab, hidden, chunked=False)
    chunked = loss_bench.loss_step_peak(hw, tokens, vocab, hidden, chunked=True)
    assert standard >= 2 * logits  # the logits and the log-softmax (or its gradient) at once
    assert chunk <= chunked < 2 * chunk  # one chunk's logits (and its gradient), never the whole


def test_loss_step_rows_time_each_loss_and_name_missing_kernels():
    hw = hardware.detect("cpu")
    rows = {name: loss_bench.loss_step(hw, 512, 256, 16, name, repeats=2) for name in loss_bench.LOSSES}
    full, chunked = rows["full logits (fp32 cross-entropy)"], rows["chunked, ours (1024 tokens)"]
    for row in (full, chunked):
        assert row["oom"] is False and row["peak_bytes"] > 0
        assert len(row["timing"].samples) == 2 and row["timing"].low <= row["timing"].median
    # no Triton kernel on a CPU: the maintained fused losses say why instead of giving a number
    for name in ("Liger Kernel fused linear CE", "Cut Cross-Entropy (Apple)"):
        assert rows[name]["peak_bytes"] is None and "pip install" in rows[name]["unavailable"] or \
            "GPUs only" in rows[name]["unavailable"]


def test_documented_checkpointing_rung_and_timed_repeats():
    hw = hardware.detect("cpu")
    model = models.load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ladder.apply(model, ladder.Rung("docs", documented_checkpointing=True))
    layers = models.decoder_layers(model)
    assert layers and all(layer.gradient_checkpointing for layer in layers)  # every layer, as the docs do
    row = ladder_bench.train_step(model, optimizer, 64, hw, name="docs", repeats=3)
    assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
    assert row["seconds_min"] <= row["seconds"] <= row["seconds_max"]
    ladder.apply(model, ladder.Rung("none"))
    assert not any(layer.gradient_checkpointing for layer in layers)
    with pytest.raises(errors.RecipeError, match="every-layer"):
        ladder.apply(model, ladder.Rung("bad", checkpoint_every=2, documented_checkpointing=True))
