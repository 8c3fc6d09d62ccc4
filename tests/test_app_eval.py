"""`recipes eval`: a CPU fine-tune by `recipes train` beats its base on held-out rows of the task it
learned; the held-out rows are really held out; bad input gets one clear message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes_lib.app import cli, config, data, eval_data, evaluate
from recipes_lib.core import models, tasks
from recipes_lib.core.errors import RecipeError

REPO = Path(__file__).resolve().parent.parent
# The embedded model never saw `reverse`; 60 full fine-tuning steps of 8 packed rows teach it some
# (LoRA at this size needs several times more steps to get exact answers). About 25 s on one CPU core.
TRAIN = ["model.method=full", "lr=3e-3", "warmup_steps=6", "max_steps=60", "seq_len=64", "micro_batch=8",
         "global_batch=8", "validation_fraction=0.1", "checkpoint.every=0", "eval_every=0",
         "log.progress=false", "log.tensorboard=false"]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A `recipes train` run on 600 `reverse` rows, 10% of them held out."""
    tmp = tmp_path_factory.mktemp("eval")
    rows = [{"prompt": ex.prompt, "response": ex.answer, "task": ex.task}
            for ex in tasks.make_examples(600, seed=3, tasks=("reverse",))]
    source = _write_rows(tmp / "reverse.jsonl", rows)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    example = str(REPO / "configs" / "lora-tiny-cpu.yaml")
    command = [sys.executable, "-m", "recipes_lib", "train", example, *TRAIN, f"data.source={source}",
               f"output.dir={tmp / 'run'}"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp / "run"


@pytest.fixture(scope="module")
def results(run_dir) -> dict:
    assert cli.main(["eval", str(run_dir), "--batch-size", "16"]) == 0
    return json.loads((run_dir / "eval" / "eval_results.json").read_text())


def test_the_fine_tune_beats_its_base_on_held_out_rows(results):
    base, tuned = results["scores"]["base"], results["scores"]["fine-tuned"]
    assert base["exact_match"] == 0.0  # the base model never learned to reverse
    assert tuned["exact_match"] >= 0.1, tuned
    assert tuned["rougeL"] > base["rougeL"] + 0.2
    assert tuned["perplexity"] < base["perplexity"] / 10
    assert tuned["per_task"]["reverse"]["rows"] == results["data"]["rows"]
    assert results["change"]["exact_match"] == pytest.approx(tuned["exact_match"] - base["exact_match"])


def test_held_out_rows_are_not_in_the_training_split(run_dir, results):
    cfg = eval_data.target(str(run_dir)).config
    tokenizer = models.load_tokenizer(cfg.model.source)
    train_docs, _ = data.load_documents(cfg.data, tokenizer)
    trained = {tokenizer.decode(d.input_ids, skip_special_tokens=True) for d in train_docs}
    lines = (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert len(predictions) == results["data"]["rows"] >= 50
    assert not any(p["prompt"] in text for p in predictions for text in trained)
    assert len(train_docs) + results["data"]["rows"] + results["data"]["excluded_as_trained_on"] == 600
    assert all(p["reference"] and "fine-tuned" in p and "base" in p for p in predictions)


def test_a_model_with_data_is_scored_alone(tmp_path, capsys):
    rows = [{"prompt": ex.prompt, "response": ex.answer, "task": ex.task}
            for ex in tasks.make_examples(12, seed=9)]
    source = _write_rows(tmp_path / "tasks.jsonl", rows)
    assert cli.main(["eval", "data/tiny-llama", "--data", str(source), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert list(result["scores"]) == ["model"] and result["data"]["rows"] == 12
    assert result["scores"]["model"]["exact_match"] > 0.5  # the embedded model knows the pre-training tasks
    assert "exact_match" in capsys.readouterr().out


def _error(capsys, *argv) -> str:
    assert cli.main(["eval", *argv]) == 2
    return capsys.readouterr().err


def test_bad_input_gets_one_clear_message(tmp_path, capsys):
    assert "no run folder or model at './runs/never-trained'" in _error(capsys, "./runs/never-trained")
    assert "there is no run folder or model folder at 'runs/never'" in _error(capsys, "runs/never")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text("")
    assert "holds no trained model" in _error(capsys, str(unfinished))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    source = _write_rows(tmp_path / "rows.jsonl", [{"prompt": "copy: a =>", "response": "a"}])
    assert "does not load" in _error(capsys, str(broken), "--data", str(source))
    other = _write_rows(tmp_path / "other.jsonl", [{"question": "copy: a =>", "answer": "a"}])
    message = _error(capsys, "data/tiny-llama", "--data", str(other))
    assert "column 'prompt' is not in" in message and "['question', 'answer']" in message
    assert "give the data to score with --data" in _error(capsys, "data/tiny-llama")
    assert config.load(None).data.source  # the defaults still load (the parser is shared with train)


def test_the_command_runs_without_rouge_score(monkeypatch):
    """Only `recipes eval` needs rouge-score: `recipes train` on a machine without it must still start."""
    blocked = "import sys; sys.modules['rouge_score'] = None; import recipes_lib.app.cli"
    assert subprocess.run([sys.executable, "-c", blocked], capture_output=True).returncode == 0
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(RecipeError, match="pip install rouge-score"):
        evaluate.rouge(["rougeL"])
