"""Data-parallel training on CPU with gloo, 2 processes: the same result as one process; the launcher.

Tolerance (fp32 throughout): losses within rtol 1e-5, final parameters within atol 1e-5 after 3
AdamW steps at lr 1e-3. The two runs differ only in summation order (each rank sums its own tokens,
then the ranks' sums are added), so they agree to a few ulps of fp32 per step, which Adam's
normalisation can magnify for parameters whose gradient is near zero. A wrong normalisation is far
outside it: DDP summing over ranks after every micro-batch (which adds the earlier micro-batches'
reduced gradients again) moved the second step's loss by 1.4e-3 relative when tried.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoConfig

from recipes_lib.core import losses, models, train
from recipes_lib.core.errors import RecipeError
from recipes_lib.measure import predict, timing
from recipes_lib.parallel import batches, context, launcher, model_parallel, run, runs, step, zero

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "train_distributed.py"
CPU = torch.device("cpu")
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


def _script_args(model_dir: str, strategy: str, out: Path) -> list[str]:
    return ["--model", model_dir, "--strategy", strategy, "--steps", "3", "--global-batch", "8",
            "--micro-batch", "2", "--seq-len", "32", "--save-params", str(out)]


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, tmp_path_factory):
    """The one-process reference, run in this process on the same global batches."""
    out = tmp_path_factory.mktemp("single") / "params.pt"
    result = run.main(run.parse_args(_script_args(tiny_model_dir, "single", out)))
    return result, torch.load(out)


def test_timed_run_reports_each_step_and_the_spread_of_tokens_per_s(tiny_model_dir):
    args = run.parse_args(["--model", tiny_model_dir, "--strategy", "single", "--steps", "6", "--warmup", "1",
                           "--global-batch", "4", "--seq-len", "32", "--full-rows"])
    result = run.main(args, timer=timing.stepper)
    times, tokens = result["step_times"], result["tokens_per_step"]
    assert len(times) == 5 and result["step_seconds"] == statistics.median(times)  # warm-up step left out
    assert (result["step_seconds_min"], result["step_seconds_max"]) == (min(times), max(times))
    assert result["tokens_per_s_min"] == tokens / max(times) < tokens / min(times) \
        == result["tokens_per_s_max"]
    per_gpu = runs.throughput(result | {"gpus": 2}, AutoConfig.from_pretrained(tiny_model_dir), None)
    assert per_gpu["tokens_per_s_per_gpu_min"] == result["tokens_per_s_min"] / 2
    assert runs.per_gpu_spread(per_gpu) == f"{tokens / max(times) / 2:,.0f}-{tokens / min(times) / 2:,.0f}"
    assert run.main(run.parse_args(["--model", tiny_model_dir, "--strategy", "single", "--steps", "2"])
                    )["tokens_per_s_max"] is None  # no timer: no times


def test_ranks_hold_different_numbers_of_target_tokens(tiny_model_dir):
    """The equivalence below is only a test of token normalisation if the ranks' token counts differ."""
    args = run.parse_args(_script_args(tiny_model_dir, "fsdp2", Path("unused")))
    for batch in batches.global_batches(args.steps, args.global_batch, args.seq_len, vocab_size=64):
        counts = [sum(losses.count_targets(mb["labels"]) for mb in
                      batches.rank_micro_batches(batch, rank, 2, args.micro_batch)) for rank in (0, 1)]
        assert counts[0] != counts[1]


@pytest.mark.parametrize("strategy, port", [("fsdp2", None), ("fsdp2-no-reshard", None), ("ddp", None)])
def test_two_processes_match_single_process(strategy, port, single_run, tiny_model_dir, tmp_path):
    """FSDP2 (torchrun --standalone) and DDP (the multi-node rendezvous form, on one node) vs one process."""
    reference, reference_params = single_run
    out = tmp_path / "params.pt"
    results = launcher.launch(SCRIPT, 2, _script_args(tiny_model_dir, strategy, out), timeout_s=60,
                              port=launcher.free_port() if port else None, echo=False)
    assert [r["rank"] for r in results] == [0, 1]
    # the script times every step on every rank; the first (--warmup 1) is left out of the spread
    assert [len(times) for times in runs.rank0(results, 2)["rank_step_times"]] == [2, 2]
    for result in results:
        assert result["strategy"] == strategy and result["world_size"] == 2
        assert result["tokens_per_s_min"] <= result["tokens_per_s"] <= result["tokens_per_s_max"]
        torch.testing.assert_close(result["losses"], reference["losses"], rtol=LOSS_RTOL, atol=0)
        # The norm of the reduced gradient: a mean over ranks instead of the sum would halve it.
        torch.testing.assert_close(result["grad_norms"], reference["grad_norms"], rtol=LOSS_RTOL, atol=0)
    params = torch.load(out)
    assert params.keys() == reference_params.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, reference_params[name], rtol=0, atol=PARAM_ATOL, msg=name)
    if strategy.startswith("fsdp2"):  # each rank holds half of every parameter, and of Adam's state
        assert results[0]["param_bytes"] == pytest.approx(reference["param_bytes"] / 2, rel=0.01)
        assert results[0]["optimizer_bytes"] == pytest.approx(reference["optimizer_bytes"] / 2, rel=0.01)
    for measured in (reference, results[0]):  # the state the notebook predicts before anything runs
        predicted = predict.strategy_state_bytes(measured["n_params"], measured["strategy"],
                                                 measured["world_size"])
        assert measured["param_bytes"] == pytest.approx(predicted["parameters"], rel=0.01)
        assert measured["optimizer_bytes"] == pytest.approx(predicted["optimizer"], rel=0.01)


def _write(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body))
    return script


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_launcher_stops_a_hung_run(tmp_path):
    script = _write(tmp_path, f"""
        import os, time
        open(os.path.join({str(tmp_path)!r}, "pid" + os.environ["RANK"]), "w").write(str(os.getpid()))
        time.sleep(600)
    """)
    # 12 s: both workers must have started (and written their pids) before the launcher stops them; on a
    # loaded 2-core machine torchrun took more than 6 s to get there.
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="timeout_s=12"):
        launcher.launch(script, 2, timeout_s=12, echo=False)
    assert time.perf_counter() - start < 30
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in (0, 1)]
    assert all(_gone(pid) for pid in pids), "a worker outlived the launcher's timeout"


def test_launcher_reports_a_failing_script(tmp_path):
    script = _write(tmp_path, """
        import os
        print("about to fail", flush=True)
        raise ValueError("bad value on rank " + os.environ["RANK"])
    """)
    with pytest.raises(RecipeError, match="exit code 1") as error:
        launcher.launch(script, 2, timeout_s=60, echo=False)
    assert "ValueError: bad value on rank" in str(error.value)


def test_failure_reason_is_the_workers_recipe_error_line(tmp_path):
    script = _write(tmp_path, """
        from recipes_lib.core.errors import RecipeError
        print("loading", flush=True)
        raise RecipeError("DeepSpeed needs a GPU")
    """)
    with pytest.raises(RecipeError) as error:
        launcher.launch(script, 1, timeout_s=60, echo=False, env={"PYTHONPATH": str(REPO_ROOT)})
    assert launcher.failure_reason(error.value) == "RecipeError: DeepSpeed needs a GPU"
    assert launcher.failure_reason(RecipeError("plain\nlast line")) == "last line"
    assert launcher.failure_reason(RecipeError("[rank1]:RecipeError: a[0]: b")) == "RecipeError: a[0]: b"


def test_failure_reason_names_a_worker_killed_by_a_signal(tmp_path, capsys):
    # A worker that dies from a signal prints no traceback: only torchrun's summary says what happened.
    script = _write(tmp_path, """
        import json, os, signal, sys, time
        rank = int(os.environ["RANK"])
        if rank == 0 or sys.argv[1] == "after-results":
            print("RESULT " + json.dumps({"rank": rank}), flush=True)
        if rank == 1:
            time.sleep(2)  # rank 0 reports first: torchrun stops the other workers once one fails
            os.kill(os.getpid(), signal.SIGSEGV)
    """)
    with pytest.raises(RecipeError) as error:
        launcher.launch(script, 2, ["before-results"], timeout_s=60, echo=False)
    reason = launcher.failure_reason(error.value)
    assert reason.startswith("torchrun: rank 1") and "-11" in reason and "SIGSEGV" in reason, reason
    # Every rank reported before one of them failed on its way out: the results stand, the failure is shown.
    capsys.readouterr()
    results = launcher.launch(script, 2, ["after-results"], timeout_s=60, echo=False)
    assert results == [{"rank": 0}, {"rank": 1}]
    printed = capsys.readouterr().out
    assert "every rank reported its results" in printed and "SIGSEGV" in printed, printed


def test_launcher_reads_results_and_rank_prefixes(tmp_path, capsys):
    script = _write(tmp_path, """
        from recipes_lib.parallel import context
        ctx = context.setup()
        print("hello", flush=True)
        context.report_result(ctx, world=ctx.world_size)
        context.cleanup()
    """)
    results = launcher.launch(script, 2, timeout_s=60, env={"PYTHONPATH": str(REPO_ROOT)})
    assert results == [{"rank": 0, "world": 2}, {"rank": 1, "world": 2}]
    printed = capsys.readouterr().out
    assert "[rank0]:hello" in printed and "[rank1]:hello" in printed
    assert "RESULT" not in printed


def test_launcher_reads_a_result_whose_line_never_arrived(tmp_path):
    # torchrun's --tee reader can drop a worker's last line; the rank's result file still holds it.
    script = _write(tmp_path, """
        import json, os
        from recipes_lib.parallel import launcher
        rank = int(os.environ["RANK"])
        line = json.dumps({"rank": rank, "from": "file"})
        if rank == 0:
            print(launcher.RESULT_PREFIX + line, flush=True)
        launcher.write_result(os.environ[launcher.RESULT_DIR_ENV], line)
    """)
    results = launcher.launch(script, 2, timeout_s=60, echo=False, env={"PYTHONPATH": str(REPO_ROOT)})
    assert results == [{"rank": 0, "from": "file"}, {"rank": 1, "from": "file"}]


def test_bad_launch_requests_fail_before_starting(monkeypatch):
    with pytest.raises(RecipeError, match="in use"):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            launcher.launch("never_started.py", 2, port=busy.getsockname()[1])
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="nccl"):
            launcher.launch("never_started.py", 2, backend="nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RecipeError, match="1 GPU"):
        launcher.launch("never_started.py", 2)


def test_setup_outside_torchrun_says_how_to_launch(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RecipeError, match="torchrun"):
        context.setup()


def test_predicted_state_bytes_refuses_an_unknown_strategy():
    assert predict.strategy_state_bytes(10, "fsdp2-offload", 2)["on device"] == 0  # shards live on the host
    with pytest.raises(RecipeError, match="strategy"):
        predict.strategy_state_bytes(10, "zero9", 2)


class FakeEngine:
    """Records what ``train_step`` asks of a DeepSpeed engine: boundaries and the losses backpropagated."""

    def __init__(self):
        self.calls = []

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.calls.append(("boundary", is_boundary))

    def backward(self, loss):
        self.calls.append(("backward", loss.item()))
        loss.backward()


def test_deepspeed_backward_sets_the_boundary_on_the_last_micro_batch_only():
    """DeepSpeed's engine (GPU only) through the loop's backward hook: the scaled loss, the boundary last."""
    engine = FakeEngine()
    weight = torch.ones(2, requires_grad=True)
    micro = [{"labels": torch.ones(1, 2, dtype=torch.long)}] * 3
    train.accumulate_gradients(weight, micro, loss_fn=lambda w, mb: w.sum(), total_targets=4, device=CPU,
                               backward=step.deepspeed_backward(engine, 3, scale=6.0))
    assert engine.calls == [("boundary", False), ("backward", 3.0), ("boundary", False), ("backward", 3.0),
                            ("boundary", True), ("backward", 3.0)]
    torch.testing.assert_close(weight.grad, torch.full((2,), 3 * 6 / 4))


def test_predicted_run_state_by_strategy(tiny_model_dir):
    config = models.load_model(tiny_model_dir, dtype=torch.float32).config
    n = 1_000_000
    run = {"n_params": n, "world_size": 2, "gpus": 2, "bf16": True}
    assert predict.predicted_run_state(run | {"strategy": "fsdp2"}, config) == \
        predict.strategy_state_bytes(n, "fsdp2", 2)
    naive = predict.predicted_run_state(run | {"strategy": "naive-mp", "world_size": 1}, config)
    share = predict.naive_mp_share(config, 2)
    # the training script's own result has no "gpus": one device peak per GPU tells the count
    raw = {"n_params": n, "world_size": 1, "strategy": "naive-mp", "device_peaks": [1, 1]}
    assert predict.predicted_run_state(raw, config) == naive
    assert naive["on device"] == pytest.approx((4 + 4 + 8) * n * share) and 0.5 < share < 1
    fsdp_qlora = predict.predicted_run_state(run | {"strategy": "fsdp2-qlora"}, config, lora_r=8)
    whole = predict.qlora_state_bytes(config, 8, 2)
    assert fsdp_qlora["parameters"] == pytest.approx(whole["parameters"] / 2)
    assert fsdp_qlora["on device"] == pytest.approx(sum(whole.values()) / 2)


def test_naive_model_parallel_split_keeps_the_loss(tiny_model_dir):
    """Layers spread over 'devices' (two CPU devices here: the hooks and the split run the same code)."""
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}
    whole = train.LossModel(models.load_model(tiny_model_dir, dtype=torch.float32))
    expected = whole(**batch)
    split = train.LossModel(models.load_model(tiny_model_dir, dtype=torch.float32))
    placed = model_parallel.split_across_devices(split.lm, ["cpu", "cpu"])
    n = len(models.decoder_layers(split))
    assert len(placed) == n
    torch.testing.assert_close(split(**batch), expected)


def test_script_args_are_what_the_script_parses():
    """The notebook's option dicts reach the training script as they were meant (flags, values, left-outs)."""
    values = {"strategy": "ddp", "global-batch": 16, "bf16": True, "compile": False, "save-params": None}
    args = run.parse_args(runs.script_args(values))
    parsed = (args.strategy, args.global_batch, args.bf16, args.compile, args.save_params)
    assert parsed == ("ddp", 16, True, False, None)


def test_rank0_refuses_missing_ranks_and_disagreeing_losses():
    results = [{"rank": 0, "world_size": 2, "losses": [1.0]}, {"rank": 1, "world_size": 2, "losses": [1.0]}]
    assert runs.rank0(results, 2) == results[0] | {"rank_step_times": [None, None]}  # untimed results
    with pytest.raises(RecipeError, match="each of 2 ranks"):
        runs.rank0(results[:1], 2)
    with pytest.raises(RecipeError, match="different global losses"):
        runs.rank0([results[0], results[1] | {"losses": [2.0]}], 2)


def test_deepspeed_config_checks():
    config = zero.deepspeed_config(3, micro_batch=2, accum_steps=2, world_size=2, max_grad_norm=1.0,
                                   bf16=True)
    zero.check_deepspeed_config(config, 2, 2, 2)
    assert config["train_batch_size"] == 8 and config["zero_optimization"]["stage"] == 3
    with pytest.raises(RecipeError, match="zero_optimization.stage=1"):
        zero.check_deepspeed_config({"zero_optimization": {"stage": 1}}, 2, 2, 2)
    with pytest.raises(RecipeError, match="train_batch_size=64 but this run uses 8"):
        zero.check_deepspeed_config(config | {"train_batch_size": 64}, 2, 2, 2)
    zero.check_deepspeed_config(config | {"train_batch_size": "auto"}, 2, 2, 2)
    for broken in ([], {"zero_optimization": None}):
        with pytest.raises(RecipeError, match="zero_optimization"):
            zero.check_deepspeed_config(broken, 2, 2, 2)
    with pytest.raises(RecipeError, match="both enabled"):
        zero.check_deepspeed_config(config | {"fp16": {"enabled": True}}, 2, 2, 2)


def test_deepspeed_config_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        zero.load_deepspeed_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ stage: 3 ")
    with pytest.raises(RecipeError, match="not valid JSON"):
        zero.load_deepspeed_config(str(bad))


def test_fsdp_qlora_two_processes_match_one(tiny_model_dir, tmp_path):
    """FSDP2 over an NF4 base (bf16 storage, sharded) trains the adapters as one process does."""
    args = ["--model", tiny_model_dir, "--strategy", "fsdp2-qlora", "--steps", "2", "--global-batch", "4",
            "--micro-batch", "2", "--seq-len", "32", "--lora-r", "4"]
    one = launcher.launch(SCRIPT, 1, args, timeout_s=90, echo=False)[0]
    two = launcher.launch(SCRIPT, 2, args, timeout_s=90, echo=False)
    torch.testing.assert_close(two[0]["losses"], one["losses"], rtol=LOSS_RTOL, atol=0)
    assert two[0]["trainable_params"] < one["n_params"] / 5
    assert two[0]["optimizer_bytes"] == pytest.approx(one["optimizer_bytes"] / 2, rel=0.01)


def test_naive_mp_share_counts_the_first_devices_parameters(tiny_model_dir):
    model = models.load_model(tiny_model_dir, dtype=torch.float32)
    assert predict.naive_mp_share(model.config, 1) == pytest.approx(1.0)
    layers = models.decoder_layers(model)
    first = sum(p.numel() for layer in layers[:-(-len(layers) // 2)] for p in layer.parameters())
    total = sum(p.numel() for p in model.parameters())
    rest = total - sum(p.numel() for layer in layers for p in layer.parameters())
    assert predict.naive_mp_share(model.config, 2) == pytest.approx((first + rest) / total, rel=1e-6)


def test_slurm_script_in_single_node_form(tmp_path):
    """scripts/train_distributed.sbatch on one node: SLURM's scontrol and srun stubbed, the script's own
    multi-node torchrun command (c10d rendezvous at the first node's address) running `recipes train`
    with FSDP2 on 2 gloo processes."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")  # show hostnames: this node only
    (stubs / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    path = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = os.environ | {"PATH": path,
                        "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2",
                        "SLURM_JOB_ID": "1", "PORT": str(launcher.free_port()), "PYTHONPATH": str(REPO_ROOT)}
    out = tmp_path / "run"
    args = [str(REPO_ROOT / "configs" / "ddp-lora-tiny.yaml"), "strategy=fsdp2", "max_steps=2", "seq_len=64",
            "micro_batch=2", "global_batch=4", "checkpoint.every=0", "eval_every=0", "validation_fraction=0",
            "max_examples=64", "log.progress=false", "log.tensorboard=false", f"output.dir={out}"]
    proc = subprocess.Popen(["bash", str(REPO_ROOT / "scripts" / "train_distributed.sbatch"), *args],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((out / "training_duration.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 2
    assert (out / "checkpoint-0000002" / "sharded").is_dir() and (out / "adapter").is_dir()
