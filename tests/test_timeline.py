"""The comm/compute timeline (measure.timeline): interval arithmetic and trace classification on
synthetic traces (hardware-independent), a real profile on one gloo process, and its wiring into the
training script's runs (``--timeline-steps``; several runs in one launch with ``--then``)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.distributed as dist

from recipes_lib.measure import timeline
from recipes_lib.parallel import run, runs


def test_merge_length_clip_minus():
    assert timeline.merge([(5, 7), (1, 3), (2, 4), (8, 8)]) == [(1, 4), (5, 7)]
    assert timeline.merge([(0, 2), (2, 3)]) == [(0, 3)]  # touching intervals join
    assert timeline.length([(0, 10), (2, 3), (9, 12)]) == 12  # nested and overlapping count once
    assert timeline.clip([(0, 5), (8, 20)], 3, 10) == [(3, 5), (8, 10)]
    assert timeline.minus([(0, 10)], [(2, 3), (5, 12)]) == [(0, 2), (3, 5)]
    assert timeline.minus([(0, 4), (6, 9)], [(1, 2), (1.5, 3), (7, 8)]) == [(0, 1), (3, 4), (6, 7), (8, 9)]
    assert timeline.minus([(0, 4)], []) == [(0, 4)]
    assert timeline.minus([(0, 4)], [(-1, 5)]) == []


def _span(name, ts, dur, tid=1, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def _cpu_trace():
    """Two profiled steps with gloo: the training thread (tid 1) and gloo's worker thread (tid 2)."""
    return [
        _span("timeline step 0", 0, 100, cat="user_annotation"),
        _span("autograd::engine::evaluate_function: MmBackward0", 0, 100),  # not an operator: not compute
        _span("aten::mm", 10, 30), _span("aten::add", 20, 10),  # nested: counted once
        _span("aten::mul", 60, 10),
        _span("gloo:all_gather", 30, 20, tid=2, cat="user_annotation",
              **{"Input Dims": [[100]], "Input type": ["float"]}),
        _span("gloo:all_reduce", 80, 10, tid=2, cat="user_annotation",
              **{"Input Dims": [[10]], "Input type": ["float"]}),
        _span("aten::copy_", 80, 5, tid=2),  # on gloo's thread: part of the collective, not compute
        _span("aten::mm", 150, 10),  # between the steps
        _span("timeline step 1", 200, 100, cat="user_annotation"),
        _span("aten::mm", 210, 50),
        {"ph": "M", "name": "thread_name", "tid": 2, "args": {"name": "pt_gloo_runloop"}},
    ]


def test_cpu_trace_splits_compute_communication_exposed_and_idle():
    first, second = timeline.step_timelines(_cpu_trace())
    # compute [10,40] + [60,70]; comm [30,50] + [80,90]; exposed [40,50] + [80,90]; idle 100 - 60
    assert first == timeline.StepTimeline(step_ms=0.1, compute_ms=0.04, comm_ms=0.03, exposed_comm_ms=0.02,
                                          idle_ms=0.04, collectives=2, comm_bytes=440,
                                          kinds={"all_gather": 1, "all_reduce": 1})
    assert (second.compute_ms, second.comm_ms, second.exposed_comm_ms, second.idle_ms) == (0.05, 0, 0, 0.05)
    assert (second.collectives, second.comm_bytes, second.kinds) == (0, 0, {})


def _gpu_trace():
    """One profiled step on a GPU: kernels on two streams, NCCL's among them, and the host's operators."""
    return [
        _span("timeline step 0", 0, 1000, cat="user_annotation"),
        _span("timeline step 0", 90, 800, tid=7, cat="gpu_user_annotation"),  # the GPU's copy: not a step
        _span("aten::mm", 0, 900),  # the host's side: not what the device runs
        _span("sm90_xmma_gemm_bf16", 100, 300, tid=7, cat="kernel"),
        _span("Memcpy DtoD (Device -> Device)", 450, 50, tid=7, cat="gpu_memcpy"),
        _span("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 300, 300, tid=8,
              cat="kernel", **{"Collective name": "_allgather_base", "In msg nelems": 1000,
                               "Out msg nelems": 2000, "dtype": "BFloat16"}),
        _span("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 700, 100,
              tid=8, cat="kernel"),  # no message size recorded
    ]


def test_gpu_trace_counts_device_work_only_and_names_collectives_alike():
    (step,) = timeline.step_timelines(_gpu_trace())
    # compute [100,400] + [450,500]; comm [300,600] + [700,800]; exposed [400,450] + [500,600] + [700,800]
    assert (step.step_ms, step.compute_ms, step.comm_ms, step.exposed_comm_ms) == (1.0, 0.35, 0.4, 0.25)
    assert step.idle_ms == pytest.approx(0.4)  # 1000 - [100,600] - [700,800]
    assert step.kinds == {"all_gather": 1, "reduce_scatter": 1}  # NCCL's names, gloo's spelling
    assert step.collectives == 2 and step.comm_bytes is None  # one size unknown: no total
    gather = _gpu_trace()[5]
    assert timeline.message_bytes(gather) == 2000 * 2  # the larger of input and output, bf16


def test_message_bytes_and_kinds_from_gloo_ranges():
    shapes = {"Input Dims": [[4, 8], [16]], "Input type": ["c10::BFloat16"] * 2}
    bf16 = _span("gloo:reduce_scatter", 0, 1, **shapes)
    assert timeline.message_bytes(bf16) == (32 + 16) * 2
    assert timeline.collective_kind(bf16) == "reduce_scatter"
    unknown = _span("gloo:all_reduce", 0, 1, **{"Input Dims": [[4]], "Input type": ["c10::complex<float>"]})
    assert timeline.message_bytes(unknown) is None
    assert timeline.collective_kind(_span("ncclKernel_AllReduce_RING_LL_Sum_float(x)", 0, 1)) == "all_reduce"


def test_summary_is_the_median_of_the_steps():
    steps = timeline.step_timelines(_cpu_trace())
    summary = timeline.summary(steps)
    assert summary["step_ms"] == 0.1 and summary["compute_ms"] == pytest.approx(0.045)
    assert summary["collectives"] == 1 and summary["comm_bytes"] == 220
    assert summary["kinds"] == {"all_gather": 0.5, "all_reduce": 0.5}
    assert len(summary["steps"]) == 2
    gpu = timeline.summary(timeline.step_timelines(_gpu_trace()))
    assert gpu["comm_bytes"] is None


def test_real_profile_of_one_gloo_process(tmp_path):
    """torch.profiler's own trace, on one gloo process: the all-reduce of each step is found and sized;
    the warm-up step is not in it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grads, weight = torch.ones(1000), torch.randn(64, 64)

        def step():
            (weight @ weight).sum()
            dist.all_reduce(grads)
        steps = timeline.profile_steps(step, 2, torch.device("cpu"), str(tmp_path / "trace.json"), warmup=1)
    finally:
        dist.destroy_process_group()
    assert len(steps) == 2
    for s in steps:
        assert (s.collectives, s.comm_bytes, s.kinds) == (1, 4000, {"all_reduce": 1})
        assert s.compute_ms > 0 and s.comm_ms > 0 and s.compute_ms + s.exposed_comm_ms <= s.step_ms
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith(timeline.STEP_PREFIX)}
    assert names == {"timeline step 0", "timeline step 1"}  # the warm-up step traced, then thrown away


def test_training_run_profiles_extra_steps_outside_its_figures(tiny_model_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--strategy", "single", "--steps", "2", "--global-batch", "2",
              "--seq-len", "16"]
    plain = run.main(run.parse_args(common))
    trace = str(tmp_path / "t.json")
    profiled = run.main(run.parse_args(common + ["--timeline-steps", "1", "--trace", trace]))
    assert plain["timeline"] is None
    assert profiled["losses"] == plain["losses"]  # the profiled step comes after the measured ones
    steps = profiled["timeline"]
    assert len(steps["steps"]) == 1 and steps["trace"] == trace
    assert steps["compute_ms"] > 0 and steps["collectives"] == 0  # one process: no collective
    assert (tmp_path / "t.json").exists()
    row = runs.timeline_row("single", profiled)
    assert row["compute ms"] == steps["compute_ms"] and row["comm MiB"] == 0
    refused = {"strategy": "ddp", "error": "RecipeError: no"}
    assert runs.timeline_row("ddp", refused)["note"] == "RecipeError: no"


def test_parse_runs_splits_on_then():
    first, second = run.parse_runs(["--strategy", "ddp", "--steps", "3", runs.RUN_SEPARATOR, "--strategy",
                                    "fsdp2", "--timeline-steps", "2"])
    assert (first.strategy, first.steps, first.timeline_steps) == ("ddp", 3, 0)
    assert (second.strategy, second.steps, second.timeline_steps) == ("fsdp2", 4, 2)  # its own defaults
    assert len(run.parse_runs(["--strategy", "ddp"])) == 1


_FAKE_WORKER = """
    import json, os, sys
    segments = [[]]
    for arg in sys.argv[1:]:
        segments.append([]) if arg == "--then" else segments[-1].append(arg)
    if any("crash" in s for s in segments):
        raise SystemExit("crashed")
    def result(seg):
        strategy = seg[seg.index("--strategy") + 1]
        if strategy == "refused":
            return {"strategy": strategy, "error": "RecipeError: refused here"}
        return {"strategy": strategy, "world_size": int(os.environ["WORLD_SIZE"]), "losses": [1.0],
                "step_times": [0.1], "seed": seg[seg.index("--seed") + 1]}
    print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), "runs": [result(s) for s in segments]}))
"""


def test_launch_rows_runs_several_in_one_launch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_FAKE_WORKER))
    values = [{"strategy": "a", "seed": 1}, {"strategy": "refused", "seed": 2}, {"strategy": "b", "seed": 3}]
    rows = runs.launch_rows(str(script), 2, values, gpus=[2, 2, 1], timeout_s=60)
    assert [r["strategy"] for r in rows] == ["a", "refused", "b"]
    assert rows[1] == {"strategy": "refused", "error": "RecipeError: refused here"}
    assert (rows[0]["seed"], rows[0]["gpus"], rows[2]["seed"], rows[2]["gpus"]) == ("1", 2, "3", 1)
    assert rows[0]["rank_step_times"] == [[0.1], [0.1]]  # each run checked across both ranks
    crashing = values + [{"strategy": "crash", "seed": 4}]
    crashed = runs.launch_rows(str(script), 2, crashing, gpus=2, timeout_s=60)
    assert [r["strategy"] for r in crashed] == ["a", "refused", "b", "crash"]
    # the launch failed: every run is a row with torchrun's account of the failed worker
    assert len({r["error"] for r in crashed}) == 1 and "exited with code" in crashed[0]["error"]
    with pytest.raises(Exception, match="refused here"):
        runs.succeeded(rows[1])
