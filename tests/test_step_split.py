"""A training step's time by part (measure.step_split): a real profiled step of a tiny Llama on CPU, with
the tiled MLP and the chunked loss and without them, and the GPU attribution on a synthetic trace (kernels
by name, copies, ``gpu_user_annotation`` spans per stream), so the GPU path is checked on a CPU too."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from recipes_lib.core import hardware, losses, train
from recipes_lib.long_context import recipe, tiling
from recipes_lib.measure import ladder_bench, step_split, timeline

CPU = hardware.detect("cpu")
SEQ = 192


def _tiny(tiled: bool):
    model = tiny_model(max_position_embeddings=SEQ)
    if tiled:
        recipe.enable(model, SEQ, tile_tokens=48)  # SDPA, tiled MLP (4 chunks), checkpointing with offload
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_a_tiled_step_with_the_chunked_loss_splits_into_every_part():
    model, optimizer = _tiny(tiled=True)
    ladder_bench.train_step(model, optimizer, SEQ, CPU, fused_head=True)  # warm: the AdamW state exists
    split = ladder_bench.step_time_split(model, optimizer, SEQ, CPU, fused_head=True)
    assert split.attribution == "cpu" and split.notes == () and split.idle_s is None
    assert list(split.seconds) == list(step_split.PARTS)
    assert all(split.seconds[part] > 0 for part in ("attention", "mlp", "loss", "other")), split.seconds
    assert split.seconds["offload copies"] == split.copies_s == split.copies_exposed_s == 0  # none on a CPU
    assert sum(split.seconds.values()) <= split.step_s * (1 + 1e-9)
    assert math.isclose(sum(split.shares.values()), 100)
    assert all(math.isclose(split.shares[p], 100 * s / split.step_s) for p, s in split.seconds.items())
    assert all(p.grad is None for p in model.parameters()), "the profiled step's gradients are freed"
    table = split.table()
    assert list(table.index) == [*step_split.PARTS, "step"]
    assert abs(table["% of step"].iloc[:-1].sum() - 100) < 0.5  # rounded to 0.1 each


def test_the_measured_step_itself_can_be_split():
    """``train_step(profile=True)``: the ladder's own step at its top is profiled, not run again (a step of
    minutes at 2^19 tokens on a GPU); its time, peak and split come from that one step."""
    model, optimizer = _tiny(tiled=True)
    ladder_bench.train_step(model, optimizer, SEQ, CPU, fused_head=True)  # warm
    row = ladder_bench.train_step(model, optimizer, SEQ, CPU, fused_head=True, profile=True)
    plain = ladder_bench.train_step(model, optimizer, SEQ, CPU, fused_head=True)
    split = row["split"]
    assert "split" not in plain and not row["oom"] and row["peak_bytes"] > 0
    assert all(split.seconds[part] > 0 for part in ("attention", "mlp", "loss", "other")), split.seconds
    # the split is of the timed step itself: its range encloses the timing, by no more than the timer's calls
    assert row["seconds"] <= split.step_s * (1 + 1e-4) and split.step_s < 1.1 * row["seconds"] + 1e-3
    assert sum(split.seconds.values()) <= split.step_s * (1 + 1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_the_ranges_run_in_forward_backward_and_recomputation():
    """Each tiled MLP records its range in forward, in the checkpointed layer's recomputation and in
    backward; the chunked loss in forward and backward."""
    model, optimizer = _tiny(tiled=True)
    batch = ladder_bench.random_batch(64, SEQ, CPU.device)

    def step():
        train.optimizer_step(model, optimizer, [batch], None, max_grad_norm=None)

    events = timeline.trace_events(step, 1, CPU.device)
    names = [e["name"] for e in events if e.get("cat") == "user_annotation"]
    layers = model.config.num_hidden_layers
    assert names.count(step_split.MLP_RANGE) == 3 * layers
    assert names.count(losses.LOSS_RANGE) == 2


@pytest.mark.parametrize("fused_head", [True, False])
def test_an_untiled_mlp_and_full_logits_are_counted_in_other_and_said_so(fused_head):
    model, optimizer = _tiny(tiled=False)
    split = ladder_bench.step_time_split(model, optimizer, SEQ, CPU, fused_head=fused_head)
    assert not tiling.is_tiled(model)
    assert split.seconds["mlp"] == 0 and split.seconds["attention"] > 0
    assert any(n.startswith("mlp: untiled") for n in split.notes), split.notes
    assert (split.seconds["loss"] > 0) == fused_head
    assert any(n.startswith("loss: not the chunked loss") for n in split.notes) == (not fused_head)
    assert math.isclose(sum(split.shares.values()), 100)
    assert "counted in other" in split.table().loc["mlp", "counted"]


def _event(name, ts, dur, cat="kernel", tid=7, pid=0):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def _gpu_trace():
    """One step of 1,000 us: SDPA kernels of the three backends, a tiled MLP's and a loss's kernels inside
    their spans on stream 7, a kernel of another stream at the MLP's time, copies, and decoys."""
    mlp, loss = step_split.MLP_RANGE, losses.LOSS_RANGE
    return [
        _event("timeline step 0", 0, 1000, cat="user_annotation", tid=1, pid=1),
        _event(mlp, 190, 220, cat="user_annotation", tid=1, pid=1),  # the host ranges: read for notes only
        _event(loss, 490, 120, cat="user_annotation", tid=1, pid=1),
        _event("aten::scaled_dot_product_attention", 0, 1000, cat="cpu_op", tid=1, pid=1),  # host, not device
        _event("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", 100, 100),
        _event(mlp, 200, 200, cat="gpu_user_annotation"),
        _event("sm90_xmma_gemm_bf16bf16_bf16f32", 200, 50),
        _event("silu_and_mul", 250, 50),
        _event("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", 300, 100),  # inside the MLP span: attention
        _event("elementwise_kernel", 220, 20, tid=9),  # another stream: not the MLP's
        _event(loss, 500, 100, cat="gpu_user_annotation"),
        _event("ampere_bf16_s16816gemm", 500, 60),
        _event("cross_entropy_reduce", 560, 40),
        _event("rms_norm_kernel", 650, 50),
        _event("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", 700, 100),
        _event("Memcpy DtoH (Device -> Pinned)", 150, 100, cat="gpu_memcpy", tid=11),  # under kernels
        _event("Memcpy HtoD (Pinned -> Device)", 850, 50, cat="gpu_memcpy", tid=11),  # exposed
        _event("Memcpy DtoD (Device -> Device)", 900, 20, cat="gpu_memcpy"),  # not an offload copy
        _event("flash_fwd_kernel", 1200, 100),  # after the step
    ]


def test_gpu_attribution_on_a_synthetic_trace():
    split = step_split.split(_gpu_trace())
    assert split.attribution == "gpu" and split.notes == ()
    expected = {"attention": 300, "mlp": 100, "loss": 100, "offload copies": 50, "other": 450}
    assert split.seconds == pytest.approx({k: v / 1e6 for k, v in expected.items()})
    assert split.step_s == pytest.approx(1e-3)
    assert split.shares == pytest.approx({k: v / 10 for k, v in expected.items()})
    assert (split.copies_s, split.copies_exposed_s) == pytest.approx((150e-6, 50e-6))
    # nothing on the device: 1,000 us less [100, 400], [500, 600], [650, 800], [850, 920]
    assert split.idle_s == pytest.approx(380e-6)
    assert split.table().index[3].startswith("offload copies (exposed; 0.00015 s copying in all)")


def test_gpu_notes_when_no_range_and_no_sdpa_kernel_ran():
    trace = [e for e in _gpu_trace() if e["cat"] not in ("user_annotation", "gpu_user_annotation")
             and not step_split.is_attention(e["name"])]
    trace.append(_event("timeline step 0", 0, 1000, cat="user_annotation", tid=1, pid=1))
    split = step_split.split(trace)
    assert [n.split(":")[0] for n in split.notes] == ["attention", "mlp", "loss"]
    assert split.seconds["attention"] == split.seconds["mlp"] == split.seconds["loss"] == 0
    assert math.isclose(sum(split.seconds.values()), split.step_s)


def test_attention_names_and_one_step_per_trace():
    for name in ("void pytorch_flash::flash_fwd_kernel<>", "flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel",
                 "flash::FlashAttnBwdSm90<>", "fmha_cutlassF_f32_aligned_64x64_rf_sm80",
                 "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16",
                 "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "autograd::engine::evaluate_function: ScaledDotProductFlashAttentionForCpuBackward0"):
        assert step_split.is_attention(name), name
    for name in ("ampere_bf16_s16816gemm", "aten::softmax", "Memcpy DtoH (Device -> Pinned)", "rms_norm"):
        assert not step_split.is_attention(name), name
    two = [_event(f"timeline step {i}", 100 * i, 50, cat="user_annotation") for i in range(2)]
    for trace in ([], two):
        with pytest.raises(ValueError, match="one profiled step"):
            step_split.split(trace)


def test_checkpointing_table_orders_settings_and_spans_tokens_per_second():
    rows = [{"name": name, "seq_len": n, "peak_bytes": 2**30 * k, "tokens_per_s": 100.0 * k,
             "tokens_per_s_min": 90.0 * k, "tokens_per_s_max": 110.0 * k}
            for n in (8, 16) for name, k in (("b", 1), ("a", 2))]
    table = ladder_bench.checkpointing_table(rows, ["b", "a"])
    assert list(table.index) == ["b", "a"]
    assert table.loc["a", ("peak_GiB", 16)] == 2.0 and table.loc["b", ("tokens_per_s", 8)] == 100.0
    assert table.loc["a", ("tokens/s range", 8)] == "180-220"


def test_out_of_memory_while_profiling_is_a_result_not_a_crash(monkeypatch):
    """The profiled step runs after the ladder's expensive search, at its longest length: running out of
    memory there must leave a sentence in place of the split (as the ladder records OOM as a row)."""
    model, optimizer = _tiny(tiled=False)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(step_split, "profile", out_of_memory)
    said = ladder_bench.step_time_split(model, optimizer, SEQ, CPU)
    assert isinstance(said, str) and said.startswith(f"out of memory profiling one more step at {SEQ:,}")
