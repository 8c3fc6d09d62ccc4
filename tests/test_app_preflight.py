"""What a new user of the `recipes` command meets first: a near-miss model folder fails at once (not after a
minute of hub retries), a run folder is not trained over, no step is logged twice after a resume, and the
command line says what to do instead of printing library noise or docstring markup."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes_lib.app import cli, config, data, eval_data, fast_path, logs, preflight
from recipes_lib.app.config import RunConfig
from recipes_lib.core import hardware
from recipes_lib.core.errors import RecipeError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "configs" / "lora-tiny-cpu.yaml"


def test_a_near_miss_of_a_local_model_folder_fails_before_the_hub(monkeypatch):
    monkeypatch.chdir(REPO)
    near = r"model.source: there is no folder at 'data/tiny-lama' \(relative paths start from the current"
    with pytest.raises(RecipeError, match=near + r".*did you mean 'data/tiny-llama'"):
        preflight.local_model("data/tiny-lama", "model.source")
    with pytest.raises(RecipeError, match="there is no folder at './nothere'"):
        preflight.local_model("./nothere", "model.source")
    for name in ("data/tiny-llama", "random:llama-3.2-1b", "meta-llama/Llama-3.2-1B", "gpt2", None):
        preflight.local_model(name, "model.source")  # folders, shapes and hub ids go on


def test_train_estimate_bench_and_eval_name_the_near_miss(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)
    for argv in (["train", str(EXAMPLE), "model.source=data/tiny-lama", f"output.dir={tmp_path}"],
                 ["estimate", "--model", "data/tiny-lama"],
                 ["bench", "--technique", "qlora", "--model", "data/tiny-lama"],
                 ["eval", "data/tiny-lama", "--data", "data/instruct.jsonl"]):
        assert cli.main(argv) == 2
        assert "did you mean 'data/tiny-llama'?" in capsys.readouterr().err, argv


def _checkpoint(folder: Path, step: int) -> Path:
    saved = folder / f"checkpoint-{step:07d}"
    saved.mkdir(parents=True)
    (saved / "state.pt").write_bytes(b"")
    return saved


def test_a_run_folder_with_checkpoints_is_not_trained_over(tmp_path, capsys):
    _checkpoint(tmp_path, 30)
    assert cli.main(["train", str(EXAMPLE), f"output.dir={tmp_path}", "log.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoint-0000030" in err and "checkpoint.resume=true" in err
    cfg = RunConfig.model_validate({"output": {"dir": str(tmp_path)}})
    resuming = RunConfig.model_validate({"output": {"dir": str(tmp_path)}, "checkpoint": {"resume": True}})
    preflight.output_dir(resuming, None)  # resuming, or naming the checkpoint: fine
    preflight.output_dir(cfg, str(tmp_path / "checkpoint-0000030"))


def test_interrupted_names_the_checkpoint_to_resume(tmp_path):
    cfg = RunConfig.model_validate({"output": {"dir": str(tmp_path)}})
    assert "before a checkpoint was saved" in cli.interrupted(cfg)
    _checkpoint(tmp_path, 20)
    message = cli.interrupted(cfg)
    assert "checkpoint-0000020 holds step 20" in message and "checkpoint.resume=true" in message


def test_a_resumed_run_logs_each_step_once(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "lo')  # killed mid-line
    log = logs.RunLog(tmp_path, tensorboard=False, first_step=4)
    log.log(5, loss=0.5)
    log.jsonl.close()
    assert [r["step"] for r in logs.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_train_without_a_config_says_so_on_stderr(capsys):
    assert cli.main(["train"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "give a CONFIG file" in err


def test_help_is_plain_text_and_commands_print_no_library_noise(capsys):
    for command in ("estimate", "bench", "eval"):
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0 and "``" not in capsys.readouterr().out, command
    env = dict(os.environ, PYTHONPATH=str(REPO))
    shown = subprocess.run([sys.executable, "-m", "recipes_lib", "train", "--help"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0
    # bitsandbytes' import-time warning about a hub kernel it could not fetch (CPUs with AVX512-BF16)
    assert "Failed to load CPU gemm_4bit_forward" not in shown.stderr


def test_missing_relative_paths_say_where_they_were_looked_for(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=f"relative paths start from the current folder, {tmp_path}"):
        data.load_table(data.DataConfig(source="data/instruct.jsonl"))


def test_eval_of_a_folder_that_is_no_run_or_model_says_which_to_pass(tmp_path):
    empty = tmp_path / "notes"
    empty.mkdir()
    with pytest.raises(RecipeError, match="neither a `recipes train` run .* nor a model folder"):
        eval_data.target(str(empty))
    saved = _checkpoint(tmp_path / "run", 40)
    with pytest.raises(RecipeError, match=f"pass the run folder {tmp_path / 'run'}"):
        eval_data.target(str(saved))
    with pytest.raises(RecipeError, match=r"^--max-examples: max_examples=0: use a positive number"):
        eval_data.data_config(eval_data.Target("x", None, RunConfig()), {"max_examples": 0})


def test_overrides_may_follow_the_options_and_a_bad_resume_path_fails_before_loading(tmp_path, capsys):
    args = cli.parse(["train", str(EXAMPLE), "lr=1e-3", "--resume", "x", "max_steps=5"])
    assert args.overrides == ["lr=1e-3", "max_steps=5"] and args.resume == "x"
    assert cli.parse(["export", "axolotl", str(EXAMPLE), "-o", "a.yaml", "lr=1"]).overrides == ["lr=1"]
    with pytest.raises(SystemExit):
        cli.parse(["train", str(EXAMPLE), "--resume", "x", "--bogus"])
    _checkpoint(tmp_path, 10)
    missing = str(tmp_path / "nope")
    assert cli.main(["train", str(EXAMPLE), "--resume", missing, f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "there is no checkpoint there" in err and f"{tmp_path} holds checkpoint-0000010" in err


def test_the_qlora_base_says_why_auto_stays_eager_on_a_cpu():
    cpu, qlora_1b = hardware.detect("cpu"), REPO / "configs" / "qlora-1b.yaml"
    _, why = fast_path.nf4_base_choice(config.load(qlora_1b), cpu)
    assert "the layers stay eager" in why and "model.compile: false" not in why  # it is auto, not false
    _, why = fast_path.nf4_base_choice(config.load(qlora_1b, ["compile=false"]), cpu)
    assert why.endswith("and here model.compile: false")
