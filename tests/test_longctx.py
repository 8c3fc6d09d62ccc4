"""Selective checkpointing, the ladder's search, and the sequence-length curriculum."""

import pytest
import torch

from recipes_lib.core import checkpointing, errors, hardware, losses, models
from recipes_lib.long_context import curriculum, ladder


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


def test_train_step_budget_counts_as_oom():
    hw = hardware.detect("cpu")
    model = models.load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rung = ladder.Rung("x", "sdpa", chunked_loss=True)
    ladder.apply(model, rung)
    row = ladder.train_step(model, optimizer, rung, 64, hw)
    assert not row["oom"] and row["peak_bytes"] > 0 and row["tokens_per_s"] > 0
    assert ladder.train_step(model, optimizer, rung, 64, hw, budget_bytes=row["peak_bytes"] // 4)["oom"]
    with pytest.raises(errors.RecipeError):
        ladder.apply(model, ladder.Rung("bad", offload_activations=True))


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
    history = curriculum.run(model, optimizer, schedule, stream, 256, lambda: 1.0, eval_every=2, progress=False)
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
        ladder.train_step(model, optimizer, ladder.Rung("x"), limit + 1, hw)
    stream = torch.randint(3, 500, (8 * limit,))
    with pytest.raises(errors.RecipeError, match="RoPE"):
        curriculum.run(model, optimizer, [2 * limit], stream, 2 * limit, lambda: 1.0, eval_every=1, progress=False)
    with pytest.raises(errors.RecipeError, match="no step"):
        curriculum.length_schedule(4096, 2, start=512)
