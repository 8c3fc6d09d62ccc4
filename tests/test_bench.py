"""bench: one configuration measured end to end on CPU, OOM as a result, and the table."""

import dataclasses
import math

import pytest
import torch
from conftest import tiny_model

from recipes_lib.core import batches, hardware, train
from recipes_lib.measure import bench, flops, memory

VOCAB, SEQ_LEN = 64, 32


@pytest.fixture(scope="module")
def docs():
    return batches.random_documents(32, VOCAB, 4, 16, seed=1)


def _config(name="base", micro_batch=2, accum_steps=1):
    return bench.Config(name, lambda: tiny_model(VOCAB),
                        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), micro_batch, accum_steps)


@pytest.fixture(scope="module")
def row(docs):
    return bench.run(_config(), lambda mb: batches.packed_batches(docs, SEQ_LEN, mb), hardware.detect("cpu"),
                     steps=2, warmup=1, seq_len=SEQ_LEN,
                     flops_per_token=lambda m: flops.training_flops_per_token(m.config, SEQ_LEN))


def test_run_row(row):
    assert row["name"] == "base" and row["oom"] is False
    # the spread: median between the fastest and the slowest step, tokens/s the same tokens over each
    assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
    assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
    tokens_per_step = row["tokens_per_s"] * row["step_s"]
    assert row["tokens_per_s_min"] * row["step_s_max"] == pytest.approx(tokens_per_step)
    assert row["tokens_per_s_max"] * row["step_s_min"] == pytest.approx(tokens_per_step)
    assert 0 < tokens_per_step <= 2 * SEQ_LEN  # real tokens of one micro-batch of 2 packed rows
    assert row["loss"] == pytest.approx(math.log(VOCAB), rel=0.2)  # a fresh model: near uniform
    assert (row["micro_batch"], row["accum_steps"], row["seq_len"]) == (2, 1, SEQ_LEN)
    model = tiny_model(VOCAB)
    n_params = sum(p.numel() for p in model.parameters())
    assert row["trainable_params"] == n_params
    assert row["mfu"] is None  # no known peak on CPU


def test_run_memory(row):
    memory = row["memory"]
    n_params = sum(p.numel() for p in tiny_model(VOCAB).parameters())
    assert memory.parameters >= 4 * n_params
    assert memory.gradients == 4 * n_params
    assert memory.optimizer >= 8 * n_params  # two fp32 AdamW moments
    assert memory.peak >= memory.states
    assert memory.activations == memory.peak - memory.states > 0


def test_run_accumulation_and_mfu(docs):
    hw = dataclasses.replace(hardware.detect("cpu"), peak_flops=1e12)
    row = bench.run(_config("accum", micro_batch=1, accum_steps=2),
                    lambda mb: batches.packed_batches(docs, SEQ_LEN, mb), hw, steps=1, warmup=1,
                    seq_len=SEQ_LEN,
                    flops_per_token=bench.flops_counter(tiny_model(VOCAB).config, SEQ_LEN))
    assert row["accum_steps"] == 2 and not row["oom"]
    expected = row["tokens_per_s"] * flops.training_flops_per_token(tiny_model(VOCAB).config, SEQ_LEN) / 1e12
    assert row["mfu"] == pytest.approx(expected)


def _raises(error):
    def model_fn():
        raise error
    return model_fn


def test_run_oom_is_a_row():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB\ndetails")
    config = bench.Config("huge", _raises(oom), lambda m: None, micro_batch=8, accum_steps=4)
    row = bench.run(config, lambda mb: iter(()), hardware.detect("cpu"), seq_len=4096)
    assert row["oom"] is True and row["name"] == "huge"
    assert row["error"] == "CUDA out of memory. Tried to allocate 80 GiB"  # first line only
    assert (row["micro_batch"], row["accum_steps"], row["seq_len"]) == (8, 4, 4096)
    assert "memory" not in row


def test_run_other_errors_propagate():
    config = bench.Config("broken", _raises(ValueError("bad config")), lambda m: None, micro_batch=1)
    with pytest.raises(ValueError, match="bad config"):
        bench.run(config, lambda mb: iter(()), hardware.detect("cpu"))


def test_table_renders_oom_rows(row):
    oom = {"name": "huge", "oom": True, "error": "CUDA out of memory", "micro_batch": 8, "accum_steps": 4,
           "seq_len": SEQ_LEN}
    table = bench.table([row, oom], reference="base")
    assert list(table.index) == ["base", "huge"]
    assert table.loc["huge", "peak (GiB)"] == "OOM"
    assert table.loc["huge", "micro-batch x accum"] == "8 x 4"
    assert table.loc["base", "micro-batch x accum"] == "2 x 1"
    assert table.loc["base", "peak (GiB)"] == pytest.approx(row["memory"].peak / 2**30, abs=1e-3)
    assert table.loc["base", "tokens/s"] == pytest.approx(row["tokens_per_s"], abs=0.1)
    assert table.loc["base", "peak vs base"] == "100.0%"
    assert not any(c.startswith("MFU") for c in table.columns)  # no peak known on CPU


def test_table_relative_peak(row):
    half = dict(row, name="half", memory=memory.MemoryBreakdown(0, 0, 0, 0, row["memory"].peak // 2))
    table = bench.table([row, half], reference="base")
    assert table.loc["half", "peak vs base"] == "50.0%"


def test_to_json(row):
    out = bench.to_json(row)
    assert "memory" not in out
    assert out["memory_bytes"]["peak"] == row["memory"].peak
    assert set(out["memory_bytes"]) == {"parameters", "gradients", "optimizer", "activations", "peak"}
    oom = {"name": "x", "oom": True, "error": "e"}
    assert bench.to_json(oom) == oom


def test_show_prints_the_row_with_its_range(row, capsys):
    assert bench.show(row) is row
    out = capsys.readouterr().out
    assert out.startswith("base") and f"tokens/s range: {bench.spread(row)}" in out
    assert bench.spread(row) == f"{row['tokens_per_s_min']:,.0f}-{row['tokens_per_s_max']:,.0f}"
    bench.show({"name": "huge", "oom": True})
    assert "peak: OOM" in capsys.readouterr().out


def test_table_shows_the_range(row):
    assert bench.table([row]).loc["base", "tokens/s range"] == bench.spread(row)


def test_fits():
    assert bench.fits({"oom": False}, {"oom": False}) and bench.fits()
    assert not bench.fits({"oom": False}, {"oom": True})


def test_check_states(row, capsys):
    measured = {part: getattr(row["memory"], part) for part in ("parameters", "gradients", "optimizer")}
    assert bench.check_states(row, measured)
    assert "match: True" in capsys.readouterr().out
    assert not bench.check_states(row, dict(measured, optimizer=2 * measured["optimizer"] + 2**21))
    assert "match: False" in capsys.readouterr().out


def test_flops_counter_counts_frozen_weights_as_4n():
    model = tiny_model(VOCAB)
    per_token = bench.flops_counter(model.config, SEQ_LEN)
    assert per_token(model) == flops.training_flops_per_token(model.config, SEQ_LEN, 1.0)
    model.model.embed_tokens.weight.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    expected = flops.training_flops_per_token(model.config, SEQ_LEN, trainable / total)
    assert per_token(model) == pytest.approx(expected) and per_token(model) < per_token(tiny_model(VOCAB))


def test_speed_ratio_spread_and_wording():
    ref = {"tokens_per_s": 100.0, "tokens_per_s_min": 95.0, "tokens_per_s_max": 105.0}
    faster = {"tokens_per_s": 130.0, "tokens_per_s_min": 120.0, "tokens_per_s_max": 140.0}
    ratio, low, high = bench.speed_ratio(faster, ref)
    assert (ratio, low, high) == pytest.approx((1.3, 120 / 105, 140 / 95))
    assert bench.describe_ratio(ratio, low, high) == "1.30x [1.14-1.47]"
    same = {"tokens_per_s": 102.0, "tokens_per_s_min": 97.0, "tokens_per_s_max": 108.0}
    assert bench.describe_ratio(*bench.speed_ratio(same, ref)).startswith("no measurable difference (1.02x")
    slower = {"tokens_per_s": 80.0, "tokens_per_s_min": 78.0, "tokens_per_s_max": 82.0}
    assert bench.describe_ratio(*bench.speed_ratio(slower, ref)) == "0.80x [0.74-0.86]"


def test_mfu_against_datasheet_and_measured_peak(row):
    with_peak = dict(row, mfu=0.25, model_flops_per_s=1e12)
    table = bench.table([with_peak], matmul_peak=4e12)
    assert table.loc["base", "MFU (% datasheet)"] == 25.0
    assert table.loc["base", "MFU (% measured matmul)"] == 25.0
    assert row["model_flops_per_s"] == pytest.approx(
        row["tokens_per_s"] * flops.training_flops_per_token(tiny_model(VOCAB).config, SEQ_LEN))


def test_plain_step_runs_through_the_loop(docs):
    config = dataclasses.replace(_config("plain"), step_fn=train.plain_step)
    plain = bench.run(config, lambda mb: batches.packed_batches(docs, SEQ_LEN, mb), hardware.detect("cpu"),
                      steps=2, warmup=1, seq_len=SEQ_LEN)
    assert plain["oom"] is False and plain["loss"] == pytest.approx(math.log(VOCAB), rel=0.2)


def _timed(name, tokens_per_s, mfu=0.3):
    return {"name": name, "oom": False, "mfu": mfu, "tokens_per_s": tokens_per_s,
            "tokens_per_s_min": 0.9 * tokens_per_s, "tokens_per_s_max": 1.1 * tokens_per_s}


def test_report_fastest_picks_the_fastest_prefixed_row_and_compares(capsys):
    plain, peer = _timed("plain", 100.0), _timed("peer", 150.0)
    rows = [plain, _timed("ours, eager", 110.0), _timed("ours, compiled", 130.0, mfu=0.45), peer,
            {"name": "ours, graphs", "oom": True, "failed": "RuntimeError: no"}]
    fastest, ratio = bench.report_fastest("our fastest", rows, "ours", plain)
    assert fastest["name"] == "ours, compiled" and ratio == bench.speed_ratio(fastest, plain)
    out = capsys.readouterr().out
    assert "our fastest: ours, compiled" in out and "MFU % datasheet: 45" in out
    assert "vs peer: " + bench.describe_ratio(*bench.speed_ratio(fastest, peer)) in out


def test_report_fastest_where_nothing_fits_says_so(capsys):
    """Issue 17's simulated T4: every full step ran out of memory, and ``max`` of no rows raised."""
    rows = [{"name": name, "oom": True} for name in ("plain", "ours", "ours, compiled")]
    fastest, ratio = bench.report_fastest("our fastest", rows, "ours", rows[0])
    assert ratio is None and fastest["oom"]
    assert capsys.readouterr().out.strip() == (
        "our fastest: nothing to compare on this device: every 'ours' row and plain ran out of memory "
        "(or failed)")
    fits_alone = [rows[0], _timed("ours", 50.0)]  # ours fits, the reference does not: still no ratio
    assert bench.report_fastest("our fastest", fits_alone, "ours", rows[0]) == (fits_alone[1], None)
    assert "plain ran out of memory" in capsys.readouterr().out
