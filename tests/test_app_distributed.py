"""`recipes train` across 2 gloo processes: DDP and FSDP2 train like one process, checkpoint, and resume
(FSDP2's sharded checkpoint on another number of ranks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes_lib.app import checkpoint, config, logs, trainer
from recipes_lib.parallel import launcher

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "configs" / "lora-tiny-cpu.yaml"
SMALL = ["max_steps=4", "checkpoint.every=2", "seq_len=128", "micro_batch=2", "global_batch=8",
         "log.progress=false", "log.tensorboard=false", "eval_every=0"]


def _train(out_dir, nproc: int, *extra) -> str:
    command = [sys.executable, "-m", "recipes_lib", "train", str(EXAMPLE), *SMALL, f"output.dir={out_dir}",
               *extra]
    command[1:3] = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                    f"--master-port={launcher.free_port()}", "-m", "recipes_lib"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in logs.read_jsonl(Path(out_dir) / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory):  # the reference, in this process
    out = tmp_path_factory.mktemp("single")
    trainer.run(config.load(EXAMPLE, [*SMALL, f"output.dir={out}"]))
    return out


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    _train(out, 2, "strategy=fsdp2")
    return out


def test_ddp_and_fsdp2_train_like_one_process(single, fsdp2, tmp_path):
    _train(tmp_path, 2, "strategy=ddp")
    reference = _losses(single)
    assert sorted(reference) == [1, 2, 3, 4]
    for out in (tmp_path, fsdp2):
        assert _losses(out) == pytest.approx(reference, rel=1e-5)
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        expected = load_file(single / "adapter" / "adapter_model.safetensors")
        assert adapter.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(adapter[key], value, atol=1e-5, rtol=1e-4)
    assert (fsdp2 / "checkpoint-0000004" / "sharded").is_dir()  # torch.distributed.checkpoint's shards
    assert not (tmp_path / "checkpoint-0000004" / "sharded").exists()  # DDP: rank 0 wrote it whole


def test_fsdp2_checkpoint_of_two_ranks_resumes_on_one(fsdp2, tmp_path):
    # a copy of the 2-rank run as it stood after step 2: its checkpoint, and its log up to there
    subprocess.run(["cp", "-r", str(fsdp2 / "checkpoint-0000002"), str(tmp_path)], check=True)
    lines = (fsdp2 / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines if '"step": 1,' in line
                                                    or '"step": 2,' in line))
    assert sorted(_losses(tmp_path)) == [1, 2]
    output = _train(tmp_path, 1, "strategy=fsdp2", "checkpoint.resume=true")
    assert "resumed from" in output
    assert checkpoint.latest(tmp_path).name == "checkpoint-0000004"
    assert _losses(tmp_path) == pytest.approx(_losses(fsdp2), rel=1e-5)
