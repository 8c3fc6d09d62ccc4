"""The long-context recipe on a tiny random Llama: the ladder's tiled-MLP and RoPE-extension rungs (set and
unset as rungs follow one another, searched past the position limit) and ``recipe.enable``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import LlamaConfig

from recipes_lib.core import hardware, models, train
from recipes_lib.core.errors import RecipeError
from recipes_lib.long_context import ladder, recipe, retrieval, rope, tiling
from recipes_lib.measure import flops, ladder_bench

CPU = hardware.detect("cpu")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _loss_and_grads(model, ids, fused_head=True):
    model.zero_grad(set_to_none=True)
    loss = train.loss_sum(model, {"input_ids": ids, "labels": ids}, fused_head=fused_head)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiled_rung_equals_the_untiled_rung_and_the_next_rung_untiles():
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 45), generator=torch.Generator().manual_seed(0))
    plain = ladder.Rung("plain", checkpoint_every=1, chunked_loss=True, offload_activations=True)
    tiled = ladder.Rung("tiled", checkpoint_every=1, chunked_loss=True, offload_activations=True,
                        tile_mlp_tokens=8)  # 45 tokens: five full chunks and a short one
    ladder.apply(model, plain)
    assert not tiling.is_tiled(model)
    loss, grads = _loss_and_grads(model, ids)
    ladder.apply(model, tiled)
    assert tiling.is_tiled(model) and all(layer.mlp.tile_chunk_tokens == 8 for layer in model.model.layers)
    tiled_loss, tiled_grads = _loss_and_grads(model, ids)
    assert _rel(tiled_loss, loss) < 1e-5
    assert grads.keys() == tiled_grads.keys() and any("mlp" in name for name in grads)
    for name in grads:
        assert _rel(tiled_grads[name], grads[name]) < 1e-5, name
    ladder.apply(model, plain)
    assert not tiling.is_tiled(model)
    assert not any("forward" in vars(layer.mlp) for layer in model.model.layers)
    again, _ = _loss_and_grads(model, ids)
    assert _rel(again, loss) < 1e-6


def test_rope_rung_trains_past_the_limit_and_a_plain_rung_refuses_it():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    limit = model.config.max_position_embeddings  # 128
    extended = ladder.Rung("extended", checkpoint_every=1, chunked_loss=True, tile_mlp_tokens=64,
                           rope_positions=4 * limit)
    ladder.apply(model, extended)
    assert model.config.max_position_embeddings == 4 * limit
    assert model.config.rope_parameters["rope_type"] == "yarn" and rope.trained_length(model.config) == limit
    assert rope.original_limit(model) == limit
    row = ladder_bench.train_step(model, optimizer, 3 * limit, CPU, fused_head=True, name="extended")
    assert not row["oom"] and row["seq_len"] == 3 * limit and row["peak_bytes"] > 0
    ladder.apply(model, ladder.Rung("plain", checkpoint_every=1, chunked_loss=True))
    assert model.config.max_position_embeddings == limit
    assert model.config.rope_parameters["rope_type"] == "default"
    assert not tiling.is_tiled(model)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, tiny_model().model.rotary_emb.inv_freq)
    with pytest.raises(RecipeError, match=f"over this model's limit of {limit} positions.*extend RoPE"):
        ladder_bench.train_step(model, optimizer, 3 * limit, CPU, fused_head=True, name="plain")
    with pytest.raises(RecipeError, match="rope_positions"):
        ladder.apply(model, ladder.Rung("bad", rope_positions=0))


def test_rope_rung_keeps_a_llama3_scaled_model_llama3():
    model = tiny_model(rope_parameters=dict(LLAMA3_ROPE))
    ladder.apply(model, ladder.Rung("extended", rope_positions=512))
    params = model.config.rope_parameters
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0 * 512 / 128
    assert params["original_max_position_embeddings"] == 16
    assert rope.default_kind(LlamaConfig.from_json_file(models.SHAPES_DIR / "llama-3.2-1b.json")) == "llama3"
    assert rope.default_kind(tiny_config()) == "yarn"
    ladder.apply(model, ladder.Rung("plain"))
    assert model.config.rope_parameters == LLAMA3_ROPE and model.config.max_position_embeddings == 128


def test_climb_goes_past_the_position_limit_only_for_rungs_that_extend_rope():
    model = tiny_model()
    calls = []

    def step(rung, n):
        calls.append((rung.name, n, model.config.max_position_embeddings))
        models.check_seq_len(model, n)  # what train_step checks first
        return {"oom": n > 1000, "peak_bytes": n, "seconds": 1.0, "tokens_per_s": n}

    rungs = [ladder.Rung("plain", checkpoint_every=1),
             ladder.Rung("extended", checkpoint_every=1, tile_mlp_tokens=32, rope_positions=2048),
             ladder.Rung("plain again", checkpoint_every=1)]
    summary, probes = ladder.climb(model, rungs, step, start=32, multiple=32)
    assert [r["limit"] for r in summary] == [128, 2048, 128]
    assert [r["longest"] for r in summary] == [128, 896, 128]  # 512 fits, 1024 not: 768, then 896 (refine=2)
    assert [r["at limit"] for r in summary] == [True, False, True]
    assert max(n for name, n, _ in calls if name != "extended") == 128
    assert all(limit == (2048 if name == "extended" else 128) for name, _, limit in calls)
    assert ladder.search_limit(rungs[1], 128) == 2048 and ladder.search_limit(rungs[0], 128) == 128
    assert not tiling.is_tiled(model) and len(probes) == len(calls) - 3


def test_enable_applies_the_whole_recipe_and_keeps_the_math():
    seq = 300  # over the tiny model's 128 positions
    reference = tiny_model()
    rope.extend_context(reference, seq, "yarn")  # the same model, RoPE extended, nothing else
    model = tiny_model(attn_implementation="eager")
    done = recipe.enable(model, seq)
    assert done["attention"] == "sdpa" and model.config._attn_implementation == "sdpa"
    assert done["rope"] == {"kind": "yarn", "from": 128, "to": seq, "factor": seq / 128}
    assert model.config.max_position_embeddings == seq
    assert done["tile_mlp_tokens"] == 150 == recipe.default_tile_tokens(model.config, seq)  # ffn = 2 x d
    assert done["tiled_mlps"] == 2 and tiling.is_tiled(model) and done["checkpointed_layers"] == 2
    assert all(layer.gradient_checkpointing for layer in model.model.layers) and done["offload_activations"]
    text = recipe.describe(done)
    assert "yarn x2.34375 (128 -> 300 positions)" in text and "chunks of 150 tokens" in text
    assert "offloaded to host memory" in text
    ids = torch.randint(0, 64, (1, seq), generator=torch.Generator().manual_seed(5))
    loss, grads = _loss_and_grads(model.train(), ids)
    ref_loss, ref_grads = _loss_and_grads(reference.train(), ids)
    assert _rel(loss, ref_loss) < 1e-5
    for name in ref_grads:
        assert _rel(grads[name], ref_grads[name]) < 1e-5, name


def test_enable_within_the_limit_and_its_options():
    model = tiny_model()
    done = recipe.enable(model, 100, tile_tokens=16, offload=False, checkpoint_every=2)
    assert done["rope"] is None and model.config.max_position_embeddings == 128
    assert done["tile_mlp_tokens"] == 16 and model.model.layers[0].mlp.tile_chunk_tokens == 16
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]
    assert "RoPE as trained" in recipe.describe(done) and "offloaded" not in recipe.describe(done)
    llama3 = tiny_model(rope_parameters=dict(LLAMA3_ROPE))
    assert recipe.enable(llama3, 512)["rope"]["kind"] == "llama3"
    assert recipe.default_tile_tokens(LlamaConfig.from_json_file(models.SHAPES_DIR / "llama-3.2-1b.json"),
                                      2**19) == 2**17  # intermediate 8192 = 4 x hidden 2048
    for bad in (dict(seq_len=0), dict(seq_len=64, tile_tokens=0)):
        with pytest.raises(RecipeError, match="seq_len|chunk_tokens"):
            recipe.enable(tiny_model(), **bad)


def test_past_the_limit_adds_the_tiled_mlp_then_the_rope_extension():
    base = ladder.Rung("+ activation offloading", "sdpa", 1, chunked_loss=True, offload_activations=True)
    tiled, extended = ladder.past_the_limit(base, 512, 4096)
    assert (tiled.name, tiled.tile_mlp_tokens, tiled.rope_positions) == ("+ tiled MLP", 512, None)
    assert tiled.offload_activations and tiled.chunked_loss and tiled.checkpoint_every == 1
    assert extended == dataclasses.replace(tiled, name="+ RoPE extension", rope_positions=4096)


def test_train_step_reports_host_memory_and_mfu_where_known_and_the_ladder_table():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ladder.apply(model, ladder.Rung("offloaded", "sdpa", 1, chunked_loss=True, offload_activations=True))
    row = ladder_bench.train_step(model, optimizer, 64, CPU, True, name="x")
    assert row["host_bytes"] is None and row["mfu"] is None  # a CPU: host memory is the device's; no peak
    rated = dataclasses.replace(CPU, peak_flops=1e12)
    row = ladder_bench.train_step(model, optimizer, 64, rated, True, name="x")
    per_token = flops.training_flops_per_token(model.config, 64)
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * per_token / 1e12)
    summary, _ = ladder.climb(model, [ladder.Rung("a")], lambda rung, n: {
        "oom": False, "peak_bytes": 2**30, "host_bytes": 2**31, "seconds": 2.0, "tokens_per_s": n / 2,
        "mfu": 0.25}, start=64, limit=128)
    assert summary[0]["host_bytes"] == 2**31 and summary[0]["mfu"] == 0.25
    ran_out = {"name": "b", "longest": None, "at limit": False, "peak_bytes": None, "seconds": None,
               "tokens_per_s": None}  # no host_bytes or mfu: a step function that does not report them
    table = ladder_bench.summary_table([summary[0], ran_out], 0)
    assert table.loc["a", "longest"] == 128 and table.loc["a", "host GiB"] == 2.0
    assert table.loc["a", "MFU %"] == 25.0 and table.loc["a", "step s"] == 2.0
    assert table.loc["b", "host GiB"] == "-" and table.loc["b", "MFU %"] == "-"
    assert table.loc["b", "x baseline"] == 0


def test_retrieval_prompts_fill_a_length_and_spans_grow_with_distance(tokenizer):
    n_facts = retrieval.facts_for(tokenizer, 256)
    sets = retrieval.kv_sets(n_facts, [0, n_facts // 2, n_facts - 1], 3)
    lengths = [len(tokenizer(ex.text, add_special_tokens=False)["input_ids"]) + 2  # bos and eos
               for examples in sets.values() for ex in examples]
    assert 0.75 * 256 < max(lengths) <= 256 and len(lengths) == 9
    spans = retrieval.mean_spans(tokenizer, sets)
    assert spans[0] < spans[1] < spans[2] < 256
    assert retrieval.beyond([10, 200, 300], {"a": [1.0, 0.5, 0.0], "b": [0.0, 1.0, 1.0]}, 100) == \
        {"a": 0.25, "b": 1.0}
    with pytest.raises(RecipeError, match="beyond 100 tokens"):
        retrieval.beyond([10, 50], {"a": [1.0, 1.0]}, 100)
    with pytest.raises(RecipeError, match="at least 2 facts"):
        retrieval.facts_for(tokenizer, 8)
    rows = retrieval.training_rows(tokenizer, 256, 4)
    row = next(rows)
    assert row["input_ids"].shape == (1, 256) and (row["labels"] != -100).sum() > 128  # every token scored
    with pytest.raises(RecipeError, match="min_facts"):
        retrieval.training_rows(tokenizer, 256, 4, min_facts=n_facts + 1)


def test_before_and_after_extends_rope_and_fine_tunes(tiny_model_dir, tokenizer):
    sets = retrieval.kv_sets(retrieval.facts_for(tokenizer, 128), [0, 4], 2)
    accuracy, stats = retrieval.before_and_after(tiny_model_dir, tokenizer, 32, 128, sets, steps=2, lr=1e-3,
                                                 min_facts=4)
    assert list(accuracy) == ["as trained", "yarn x4, not fine-tuned", "yarn x4, fine-tuned (2 rows)"]
    assert all(len(values) == 2 and all(0 <= a <= 1 for a in values) for values in accuracy.values())
    assert len(stats.losses) == 2 and all(math.isfinite(loss) for loss in stats.losses)
    model = models.load_model(tiny_model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    rope.extend_context(model, 128, "yarn", trained=32)
    retrieval.finetune(model, tokenizer, 128, steps=1, lr=1e-2, min_facts=4)
    assert model.config.rope_parameters["factor"] == 4.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
