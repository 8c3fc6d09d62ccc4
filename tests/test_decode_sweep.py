"""Issue 20's decode library: the bandwidth floor against hand counts, the fixed + per-layer cost model
against a known truth, the student it chooses, and the size sweep on a tiny shape on CPU."""

import dataclasses
import json

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import LlamaForCausalLM

from recipes_lib.core import hardware
from recipes_lib.core.errors import RecipeError
from recipes_lib.inference import quantize
from recipes_lib.measure import decode, decode_cost, decode_fits, decode_floor, decode_sweep

LLAMA_1B = decode_sweep.shape_config("llama-3.2-1b")
LLAMA_8B = decode_sweep.shape_config("llama-3.1-8b")


def test_1b_weights_per_token_and_floor_match_the_hand_count():
    per_layer = 2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192  # q, o; k, v; gate, up, down
    head = 128256 * 2048
    parts = decode_floor.step_bytes(LLAMA_1B, batch=1, context=544, fmt="bf16")
    assert parts["linear"] == 2 * 16 * per_layer and parts["lm_head"] == 2 * head
    assert parts["linear"] + parts["lm_head"] == pytest.approx(2.47e9, rel=2e-3)  # the 2.47 GB
    assert parts["kv_cache"] == 544 * 16 * 2 * 8 * 64 * 2 and parts["embedding"] == 2048 * 2
    # the H200 floor: 1,712 tokens/s at ~4.3 TB/s, weights and KV over the copy bandwidth
    floor = decode_floor.floor_tokens_per_s(LLAMA_1B, 1, decode_floor.mean_context(512, 64), "bf16", 4.3e12)
    assert floor == pytest.approx(1712, rel=0.03)
    shared = parts["linear"] + parts["lm_head"] + parts["norms"]  # read once for the batch
    per_sequence = parts["kv_cache"] + parts["embedding"]
    batch16 = decode_floor.floor_tokens_per_s(LLAMA_1B, 16, 544, "bf16", 4.3e12)
    assert batch16 == pytest.approx(16 * 4.3e12 / (shared + 16 * per_sequence))


def test_quantized_formats_count_their_scales():
    assert decode_floor.linear_bytes(256, 64, "int8") == 256 * 64 + 64 * 2
    assert decode_floor.linear_bytes(256, 64, "int4", group_size=128) == 256 * 64 / 2 + 2 * 64 * 4
    with pytest.raises(ValueError, match="fmt="):
        decode_floor.linear_bytes(256, 64, "fp8")
    int8 = decode_floor.step_bytes(LLAMA_8B, 1, 0, "int8")
    bf16 = decode_floor.step_bytes(LLAMA_8B, 1, 0, "bf16")
    assert 0.5 < (int8["linear"] + int8["lm_head"]) / (bf16["linear"] + bf16["lm_head"]) < 0.501


def test_int8_bytes_match_the_quantized_model_and_parameters_match_the_model():
    model, _ = quantize.int8_weight_only(tiny_model(), backend="pytorch")  # fp32: 4-byte scales
    parts = decode_floor.step_bytes(model.config, fmt="int8", act_bytes=4)
    assert quantize.linear_weight_bytes(model)[0] == parts["linear"] + parts["lm_head"]
    for tied in (True, False):
        config = tiny_config(tie_word_embeddings=tied)
        counted = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        assert decode_floor.parameter_count(config) == counted


def test_step_bytes_are_the_fixed_part_plus_the_layers():
    for fmt in decode_floor.FORMATS:
        total = decode_floor.step_bytes(LLAMA_8B, 4, 300, fmt)["total"]
        split = (decode_floor.head_bytes(LLAMA_8B, fmt, 4)
                 + 32 * decode_floor.layer_bytes(LLAMA_8B, fmt, 4, 300))
        assert total == pytest.approx(split)


TRUTH = decode_cost.CostModel(overhead_s=0.4e-3, layer_latency_s=20e-6, bandwidth=3e12, context=544)


def points(shapes_depths):
    return [(decode_sweep.shape_config(s, d), TRUTH.step_s(decode_sweep.shape_config(s, d)))
            for s, d in shapes_depths]


def test_cost_model_recovers_a_known_fixed_and_per_layer_truth():
    measured = points([("llama-3.2-1b", 16), ("llama-3.2-1b", 8), ("llama-3.1-8b", 32), ("llama-3.1-8b", 16)])
    fitted = decode_cost.fit(measured, context=544)
    for key in ("overhead_s", "layer_latency_s", "bandwidth"):
        assert getattr(fitted, key) == pytest.approx(getattr(TRUTH, key), rel=1e-6)
    # one width at two depths: the bandwidth given, the fixed and per-layer latencies recovered
    known = decode_cost.fit(measured[:2], bandwidth=3e12, context=544)
    assert (known.overhead_s, known.layer_latency_s) == pytest.approx((0.4e-3, 20e-6), rel=1e-6)
    split = TRUTH.fixed_s(LLAMA_1B), TRUTH.per_layer_s(LLAMA_1B)  # what decode.step_split would find
    assert (known.fixed_s(LLAMA_1B), known.per_layer_s(LLAMA_1B)) == pytest.approx(split)
    assert decode_cost.residuals(known, measured) == pytest.approx([0] * 4, abs=1e-9)
    with pytest.raises(RecipeError, match="second width"):
        decode_cost.fit(measured[:2], context=544)
    with pytest.raises(RecipeError, match="two depths"):
        decode_cost.fit(measured[:1], bandwidth=3e12, context=544)


def test_student_keeps_head_dim_and_head_ratio():
    student = decode_cost.student_config(LLAMA_8B, 12, 6)
    assert (student.head_dim, student.num_attention_heads, student.num_key_value_heads) == (128, 24, 6)
    assert (student.hidden_size, student.intermediate_size, student.num_hidden_layers) == (3072, 10752, 12)
    same = decode_cost.student_config(LLAMA_8B, 32, 8)
    assert (same.hidden_size, same.intermediate_size) == (4096, 14336)
    assert LLAMA_8B.num_hidden_layers == 32  # the teacher's config is not changed


def test_chosen_student_meets_the_target_and_no_larger_one_does():
    student = decode_cost.choose_student(LLAMA_8B, 2.0, TRUTH)
    assert student.speedup >= 2.0 and student.speedup == TRUTH.speedup(student.config, LLAMA_8B)
    assert student.parameters == decode_floor.parameter_count(student.config)
    larger = [c for c in decode_cost.candidates(LLAMA_8B)
              if decode_floor.parameter_count(c) > student.parameters]
    assert larger and all(TRUTH.speedup(c, LLAMA_8B) < 2.0 for c in larger)
    with pytest.raises(RecipeError, match="fastest reaches"):
        decode_cost.choose_student(LLAMA_8B, 1000.0, TRUTH)


def test_analyse_fits_each_format_and_chooses_the_student():
    measured = [("llama-3.2-1b", 16), ("llama-3.2-1b", 8), ("llama-3.1-8b", 32)]
    rows = [{"shape": s, "layers": d, "format": "bf16", "batch": 1, "skipped": None,
             "parameters": decode_floor.parameter_count(c), "ms_per_decode_step": 1e3 * t}
            for (s, d), (c, t) in zip(measured, points(measured))]
    rows.append({**rows[0], "format": "int4", "skipped": "no int4 kernel here"})
    out = decode_fits.analyse({"rows": rows, "context": 544, "act_bytes": 2, "bandwidth": 2.9e12})
    assert list(out["cost_models"]) == ["bf16 batch 1"] and out["largest"] == "llama-3.1-8b"
    fitted = out["cost_models"]["bf16 batch 1"]
    assert fitted["bandwidth"] == pytest.approx(3e12, rel=1e-6)  # from two widths, not the 2.9e12 given
    assert (fitted["points"], fitted["terms"]) == (3, 3)  # as many terms as points: no residual to check
    expected = decode_cost.choose_student(LLAMA_8B, 2.0, TRUTH)
    student = out["student"]
    assert (student["layers"], student["hidden_size"]) == (expected.layers, expected.hidden_size)
    assert student["teacher"] == "llama-3.1-8b"


def test_a_fit_with_a_negative_latency_falls_back_to_the_copy_bandwidth():
    unphysical = decode_cost.CostModel(overhead_s=0.4e-3, layer_latency_s=-5e-6, bandwidth=3e12, context=544)
    configs = [decode_sweep.shape_config(s, d) for s, d in [("llama-3.2-1b", 16), ("llama-3.2-1b", 8),
                                                            ("llama-3.1-8b", 32), ("llama-3.1-8b", 16)]]
    measured = [(c, unphysical.step_s(c)) for c in configs]
    assert decode_cost.fit(measured, context=544).layer_latency_s < 0  # what the free fit would report
    model, terms = decode_fits.fit_points(measured, 3e12, context=544)  # latencies at the given bandwidth
    assert terms == 2 and model.bandwidth == 3e12 and model.layer_latency_s == pytest.approx(-5e-6, rel=1e-6)
    physical = points([("llama-3.2-1b", 16), ("llama-3.2-1b", 8), ("llama-3.1-8b", 32), ("llama-3.1-8b", 16)])
    model, terms = decode_fits.fit_points(physical, 2.9e12, context=544)  # within the 10% slack
    assert terms == 3 and model.bandwidth == pytest.approx(3e12, rel=1e-6)
    model, terms = decode_fits.fit_points(physical, 2e12, context=544)  # faster than copying: not physical
    assert terms == 2 and model.bandwidth == 2e12
    one_width, terms = decode_fits.fit_points(points([("llama-3.2-1b", 16), ("llama-3.2-1b", 8)]), 3e12,
                                               context=544)
    assert terms == 2 and one_width.layer_latency_s == pytest.approx(TRUTH.layer_latency_s, rel=1e-6)


def fitted_analysis(*models) -> dict:
    return {"largest": "llama-3.1-8b",
            "cost_models": {f"{m.fmt} batch {m.batch}": {**dataclasses.asdict(m), "points": 4, "terms": 3,
                                                         "residuals": [0.01, -0.02, 0.0, 0.005]}
                            for m in models}}


INT8 = dataclasses.replace(TRUTH, fmt="int8", overhead_s=0.5e-3, layer_latency_s=40e-6)  # slower kernels


def test_cost_table_splits_each_fit_at_the_largest_shape():
    (bf16, int8) = decode_fits.cost_table(fitted_analysis(TRUTH, INT8))
    assert bf16["model"] == "bf16 batch 1" and int8["model"] == "int8 batch 1"
    for record, model in [(bf16, TRUTH), (int8, INT8)]:
        assert record["fixed ms"] == pytest.approx(1e3 * model.fixed_s(LLAMA_8B))
        assert record["µs per layer"] == pytest.approx(record["latency µs"] + record["read µs"])
        assert record["read µs"] == pytest.approx(1e6 * decode_floor.layer_bytes(
            LLAMA_8B, model.fmt, 1, 544) / 3e12)
        assert (record["points"], record["terms"], record["max |residual| %"]) == (4, 3, pytest.approx(2.0))
    assert int8["read µs"] < 0.51 * bf16["read µs"] and int8["latency µs"] > bf16["latency µs"]


def test_crossover_is_where_the_fitted_speedup_passes_one():
    where = decode_fits.crossover(fitted_analysis(TRUTH, INT8))
    sizes, speedups = zip(*where["curve"])
    assert list(sizes) == sorted(sizes) and sizes[-1] == decode_floor.parameter_count(LLAMA_8B)
    assert speedups[-1] == pytest.approx(TRUTH.step_s(LLAMA_8B) / INT8.step_s(LLAMA_8B))
    i = next(i for i, s in enumerate(speedups) if s >= 1)  # slower when small, faster when large
    assert 0 < i and speedups[i - 1] < 1 and sizes[i - 1] < where["parameters"] < sizes[i]
    assert where["words"].startswith(f"passes bf16 at about {decode_fits._count(where['parameters'])} param")
    assert [decode_fits._count(n) for n in (2.74e5, 5.5e6, 3.2e9, 12)] == ["274K", "5.5M", "3.2B", "12"]
    never = decode_fits.crossover(fitted_analysis(TRUTH, dataclasses.replace(INT8, layer_latency_s=1e-3)))
    assert never["parameters"] is None and never["words"].startswith("stays below bf16")
    assert decode_fits.crossover(fitted_analysis(TRUTH)) is None  # no int8 fit
    # cheaper fixed part, dearer layers: faster when tiny, slower in between, faster again when the bytes rule
    both = decode_fits.crossover(fitted_analysis(TRUTH, dataclasses.replace(
        INT8, overhead_s=0.05e-3, layer_latency_s=80e-6)))
    assert both["words"].startswith("falls below bf16 at about")
    assert ", then passes bf16 at about" in both["words"]
    speedups = [s for _, s in both["curve"]]
    assert speedups[0] > 1 and min(speedups) < 1 < speedups[-1]


def test_int4_says_why_it_cannot_run_on_cpu():
    model = tiny_model()
    assert quantize.int4_unavailable(model).startswith("no int4 kernel here")
    with pytest.raises(RecipeError, match="no int4 kernel here"):
        quantize.int4_weight_only(model)


def test_sweep_runs_a_tiny_shape_on_cpu(tmp_path):
    out = tmp_path / "sweep.json"
    result = decode_sweep.main(["--shapes", "llama-mini", "--formats", "bf16", "int8", "int4",
                                "--batches", "1", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "2",
                                "--eager", "--int8-backend", "pytorch", "--out", str(out)])
    bf16, int8, int4 = result["rows"]
    assert [r["format"] for r in (bf16, int8, int4)] == ["bf16", "int8", "int4"]
    for row in (bf16, int8):
        assert row["skipped"] is None and row["compiled"] is False and row["decode_tokens_per_s"] > 0
        share = row["decode_tokens_per_s"] / row["floor_tokens_per_s"]
        assert row["pct_of_floor"] == pytest.approx(100 * share)
    assert int8["floor_tokens_per_s"] > 1.5 * bf16["floor_tokens_per_s"]  # fp32 on CPU: int8 reads ~1/4
    assert int8["speedup_vs_bf16"] == pytest.approx(int8["decode_tokens_per_s"] / bf16["decode_tokens_per_s"])
    assert int8["speedup_min"] <= int8["speedup_vs_bf16"] <= int8["speedup_max"]
    assert bf16["speedup_vs_bf16"] == 1.0 and bf16["speedup_min"] is None
    assert int4["skipped"].startswith("no int4 kernel here") and int4["speedup_vs_bf16"] is None
    assert "bf16 batch 1" in result["analysis"]["not_fitted"]  # one depth: no fixed/per-layer split
    assert json.loads(out.read_text())["rows"][1]["backend"] == "pytorch"
    assert [r["skipped"] for r in decode_sweep.table(result["rows"])[2:]] == [int4["skipped"]]
    assert torch.get_default_device().type == "cpu"  # build's device context did not leak


def test_sweep_reuses_rows_measured_the_same_way_and_stops_at_its_budget(monkeypatch):
    """Notebook 03 hands the sweep section 1's rows of the 1B shape (the same harness): those are not timed
    again; a budget spent leaves the formats not begun as skipped rows; the rows come back sorted."""
    cpu = hardware.detect("cpu")
    model = decode_sweep.build(decode_sweep.shape_config("llama-mini"), cpu)
    how = dict(prompt_len=4, new_tokens=2, repeats=2)
    done = decode.sweep(model, cpu, [1], **how, compile=False, name="bf16")  # as notebook 03's section 1
    measured = []
    real = decode_sweep.measure_format
    monkeypatch.setattr(decode_sweep, "measure_format",
                        lambda *a, **k: measured.append(a[:3]) or real(*a, **k))
    sweep = dict(shapes=("llama-mini",), formats=("bf16", "int8"), batches=(1,), hw=cpu, compile=False,
                 int8_backend="pytorch", bandwidth=1e10, **how)
    result = decode_sweep.run(given={("llama-mini", "bf16"): ("none", done)}, **sweep)
    bf16, int8 = result["rows"]
    assert bf16["reused"] and bf16["decode_tokens_per_s"] == done[0]["decode_tokens_per_s"]
    share = bf16["decode_tokens_per_s"] / bf16["floor_tokens_per_s"]
    assert bf16["pct_of_floor"] == pytest.approx(100 * share)
    assert [m[2] for m in measured] == ["int8"] and int8["speedup_vs_bf16"] is not None
    measured.clear()
    other = decode_sweep.run(given={("llama-mini", "bf16"): ("none", done)}, **{**sweep, "new_tokens": 3})
    assert [m[2] for m in measured] == ["bf16", "int8"] and "reused" not in other["rows"][0]  # not as given
    spent = decode_sweep.run(given={("llama-mini", "bf16"): ("none", done)}, budget_s=0, **sweep)
    assert spent["rows"][0]["reused"]
    assert spent["rows"][1]["skipped"].startswith("not measured: the sweep's 0 s")
    words, met = decode_sweep.floor_check(spent["rows"], ("llama-mini", "llama-3.1-8b"), at_least=0)
    assert words.startswith("llama-mini: ") and words.endswith("llama-3.1-8b: not measured") and not met
    assert decode_sweep.floor_check(spent["rows"], ("llama-mini",), at_least=0)[1]
    assert not decode_sweep.floor_check(spent["rows"], ("llama-mini",), at_least=1e9)[1]


def test_merge_joins_commands_and_compares_across_them(tmp_path):
    def result(fmt, rate, prompt_len=512):
        row = {"shape": "llama-3.2-1b", "layers": 16, "format": fmt, "batch": 1, "skipped": None,
               "parameters": decode_floor.parameter_count(LLAMA_1B), "ms_per_decode_step": 1e3 / rate,
               "decode_tokens_per_s": rate, "decode_tokens_per_s_min": 0.9 * rate,
               "decode_tokens_per_s_max": 1.1 * rate, "floor_tokens_per_s": 1700, "pct_of_floor": rate / 17,
               "backend": "torchao"}
        return {"bandwidth": 3e12 if fmt == "bf16" else 2e12, "prompt_len": prompt_len, "new_tokens": 64,
                "context": 544.5, "act_bytes": 2, "rows": [row]}

    paths = [tmp_path / "bf16.json", tmp_path / "int8.json", tmp_path / "all.json"]
    paths[0].write_text(json.dumps(result("bf16", 600)))
    paths[1].write_text(json.dumps(result("int8", 900)))
    merged = decode_sweep.main(["--merge", str(paths[0]), str(paths[1]), "--out", str(paths[2])])
    assert merged["bandwidth"] == 2.5e12 and len(merged["rows"]) == 2
    assert merged["rows"][1]["speedup_vs_bf16"] == pytest.approx(1.5)
    assert merged["rows"][1]["speedup_min"] == pytest.approx(0.9 * 900 / (1.1 * 600))
    assert json.loads(paths[2].read_text())["analysis"]["not_fitted"]
    with pytest.raises(RecipeError, match="different prompt lengths"):
        decode_sweep.merge([result("bf16", 600), result("int8", 900, prompt_len=128)])


def test_a_failing_format_is_a_skipped_row_when_keeping_going(monkeypatch):
    """On a GPU (keep_going) one format's compile or kernel error becomes rows that name it and the sweep
    goes on to the next format; on CPU (the default there) the error is raised, so CI sees the bug."""
    from recipes_lib.core import hardware
    from recipes_lib.measure import decode

    real = decode.benchmark

    def int8_fails(model, *args, **kwargs):
        if quantize.quantization_of(model):
            raise RuntimeError("Inductor lowering failed:\n  a long\n  traceback" + " x" * 300)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(decode, "benchmark", int8_fails)
    how = dict(shapes=["llama-mini"], formats=["bf16", "int8"], batches=[1, 2], prompt_len=4, new_tokens=2,
               repeats=1, compile=False, tune=False, bandwidth=1e10, hw=hardware.detect())
    rows = decode_sweep.run(keep_going=True, **how)["rows"]
    assert [(r["format"], r["batch"]) for r in rows] == [("bf16", 1), ("bf16", 2), ("int8", 1), ("int8", 2)]
    assert all(r["skipped"] is None and r["decode_tokens_per_s"] > 0 for r in rows[:2])
    for r in rows[2:]:
        assert r["skipped"].startswith("failed while compiling or decoding: RuntimeError: Inductor lowering")
        assert "\n" not in r["skipped"] and len(r["skipped"]) < 300 and r["speedup_vs_bf16"] is None
    monkeypatch.setattr(decode_sweep, "build", lambda *a, **k: (_ for _ in ()).throw(ValueError("no model")))
    rows = decode_sweep.run(keep_going=True, **how)["rows"]
    assert [r["skipped"] for r in rows] == ["failed while building or quantizing: ValueError: no model"] * 4
    with pytest.raises(ValueError, match="no model"):  # CPU's default: raised
        decode_sweep.run(**how)
