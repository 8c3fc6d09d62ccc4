"""`recipes train` end to end on the embedded model and the shipped data: train, checkpoint, kill,
resume exactly, save the adapters and reload them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes_lib.app import checkpoint, cli, config, logs, trainer
from recipes_lib.core import hardware, models
from recipes_lib.core.errors import RecipeError
from recipes_lib.memory import qlora

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "configs" / "lora-tiny-cpu.yaml"
SMALL = ["max_steps=8", "checkpoint.every=2", "keep_last=2", "seq_len=128", "micro_batch=4", "global_batch=8",
         "eval_every=4", "log.progress=false", "warmup_steps=2", "validation_fraction=0.05"]


def _cli(out_dir, *extra) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "recipes_lib", "train", str(EXAMPLE), *SMALL,
                             f"output.dir={out_dir}", *extra], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(out_dir) -> dict[int, float]:
    """Each step's training loss; a resumed run's later line for a step wins."""
    return {r["step"]: r["loss"] for r in logs.read_jsonl(Path(out_dir) / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = _cli(out)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return out


def test_a_run_leaves_logs_checkpoints_and_adapters(uninterrupted):
    out = uninterrupted
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 9))
    assert all(0 < v < 20 for v in losses.values())
    records = logs.read_jsonl(out / "metrics.jsonl")
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    assert [p.name for p in checkpoint.checkpoints(out)] == ["checkpoint-0000006", "checkpoint-0000008"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    duration = (out / "training_duration.json").read_text()
    assert '"tokens"' in duration and '"device"' in duration
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_killed_run_resumes_bit_for_bit(uninterrupted, tmp_path):
    proc = _cli(tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill it once step 5 is logged, mid-way
        if (tmp_path / "metrics.jsonl").exists() and max(_losses(tmp_path), default=0) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(tmp_path).name in ("checkpoint-0000004", "checkpoint-0000006")
    resumed = _cli(tmp_path, "checkpoint.resume=true")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert _losses(tmp_path) == _losses(uninterrupted)  # every step's loss, exactly
    logged = [r["step"] for r in logs.read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert logged == list(range(1, 9))  # the steps the killed run logged past its checkpoint, once
    assert "is deprecated" not in output and "Failed to load CPU gemm_4bit_forward" not in output


def test_ctrl_c_names_the_checkpoint_and_the_same_command_refuses_to_train_over_it(tmp_path):
    proc = _cli(tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and checkpoint.latest(tmp_path) is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in output, output
    assert "run the same command with checkpoint.resume=true" in output
    again = _cli(tmp_path)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 2 and "already holds checkpoint-" in output, output


def test_resume_refuses_another_config(uninterrupted):
    cfg = config.load(EXAMPLE, [*SMALL, f"output.dir={uninterrupted}", "lora_r=4", "lr=1e-3",
                                "max_steps=9"])
    with pytest.raises(RecipeError) as info:
        trainer.run(cfg, resume_from=str(checkpoint.latest(uninterrupted)))
    message = str(info.value)
    assert "model.lora_r: 8 -> 4" in message and "optim.lr" in message and "max_steps" not in message


def test_adapters_and_merged_model_reload_with_the_trained_logits(tmp_path):
    cfg = config.load(EXAMPLE, [*SMALL, "max_steps=3", "checkpoint.every=0", f"output.dir={tmp_path}",
                                "output.merge=true", "log.tensorboard=false"])
    trainer.run(cfg)
    hw = hardware.detect("cpu")
    trained = trainer.build_model(cfg, hw)  # the trained weights, from the final checkpoint
    weights = torch.load(checkpoint.latest(tmp_path) / "model.pt")
    trained.load_state_dict(weights, strict=False)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weights.items() if "lora_B" in k)
    ids = torch.randint(100, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.eval()(input_ids=ids).logits
        adapter = qlora.load_adapter(models.load_model(cfg.model.source, hw=hw), tmp_path / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(adapter.eval()(input_ids=ids).logits, expected)
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_half_written_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoint-0000002").mkdir()
    (tmp_path / "checkpoint-0000002" / "state.pt").write_bytes(b"")
    (tmp_path / ".tmp-checkpoint-0000004").mkdir()  # a save killed before its rename
    (tmp_path / "checkpoint-0000006").mkdir()  # a folder without its state file
    assert checkpoint.latest(tmp_path).name == "checkpoint-0000002"
    with pytest.raises(RecipeError, match="not a checkpoint"):
        checkpoint.load(tmp_path / "checkpoint-0000006", None, None, None, None, None)


def test_cli_help_lists_every_key_and_bad_config_exits_2(capsys):
    assert cli.main(["train", "--help"]) == 0
    shown = capsys.readouterr().out
    assert all(f"  {key.split('.')[1]}:" in shown for key in config.keys())
    assert cli.main(["train", str(EXAMPLE), "lerning_rate=1"]) == 2
    assert "unknown key 'lerning_rate'" in capsys.readouterr().err


LONG = ["max_steps=2", "seq_len=2560", "micro_batch=1", "global_batch=1", "validation_fraction=0",
        "checkpoint.every=0", "log.progress=false", "log.tensorboard=false"]  # 2560 > the 2048 positions


def test_long_context_trains_past_the_position_limit(tmp_path, capsys):
    cfg = config.load(EXAMPLE, [*LONG, f"output.dir={tmp_path}", "long_context=true", "output.merge=true"])
    result = trainer.run(cfg)
    out = capsys.readouterr().out
    assert "long context for 2,560 tokens: sdpa attention, RoPE yarn x1.25 (2,048 -> 2,560 positions)" in out
    assert "4 MLPs tiled in chunks of 854 tokens, 4 layers checkpointed" in out  # 2560 / (768 / 256)
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values())
    assert result["final_loss"] == losses[2]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # the base, as it was trained
    assert merged.config.max_position_embeddings == 2560
    assert merged.config.rope_parameters["rope_type"] == "yarn"
    with pytest.raises(RecipeError, match=r"data.seq_len: SEQ_LEN=2560 is over this model's limit of 2048 "
                                          r"positions.*model.long_context: true"):
        trainer.run(config.load(EXAMPLE, [*LONG, f"output.dir={tmp_path / 'plain'}"]))
    with pytest.raises(RecipeError, match="set model.chunked_loss: true"):
        config.load(EXAMPLE, [*LONG, "long_context=true", "chunked_loss=false"])
    with pytest.raises(RecipeError, match="one-GPU recipe: set train.strategy: single"):
        config.load(EXAMPLE, [*LONG, "long_context=true", "strategy=ddp"])
