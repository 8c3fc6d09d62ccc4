"""scripts/arctic_peer.py's parts that run without a GPU or its wheels: arguments, ArcticTraining's config
per length, the row a length's leftovers make (steps, result, log), the stubs, and a setup that fails."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("arctic_peer", ROOT / "scripts" / "arctic_peer.py")
arctic_peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arctic_peer)

OOM_LOG = """[rank0]: Traceback (most recent call last):
  File "scripts/arctic_peer.py", line 470, in run_one
    trainer.train()
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 31.31 GiB. GPU 0 has 79.19 GiB in all
"""


def step(n: int, seconds: float, peak: int, loss: float = 11.9) -> dict:
    return {"step": n, "tokens": 65536, "seconds": seconds, "loss": loss, "peak_bytes": peak,
            "reserved_bytes": peak + 2**30, "host_rss_bytes": 40 * 2**30}


def test_arguments_defaults_and_refusals(tmp_path):
    args = arctic_peer.parse_args(["--wheels", str(tmp_path), "--out", str(tmp_path / "o")])
    assert args.lengths == [65536, 131072, 262144, 524288]
    assert (args.steps, args.loss, args.attn, args.shape) == (2, "liger", "sdpa", "llama-3.2-1b")
    for bad in (["--lengths", "1000"], ["--lengths", "128"], ["--steps", "0"], ["--loss", "fused"]):
        with pytest.raises(SystemExit):
            arctic_peer.parse_args(["--wheels", str(tmp_path), "--out", str(tmp_path), *bad])


@pytest.mark.parametrize("loss, model_type",
                         [("liger", "liger"), ("tiled", "huggingface"), ("plain", "huggingface")])
def test_config_is_single_gpu_alst_at_batch_one(tmp_path, loss, model_type):
    config = arctic_peer.arctic_config(65536, tmp_path / "m", tmp_path / "d", tmp_path / "l", tmp_path / "c",
                                       steps=2, loss=loss, attn="sdpa", lr=1e-5, max_positions=131072)
    assert (config["sequence_parallel_size"], config["micro_batch_size"], config["train_iters"]) == (1, 1, 2)
    assert config["tiled_mlp_compute"] and config["activation_checkpoint_cpu_offload"]
    assert config["model"] == {"type": model_type, "name_or_path": str(tmp_path / "m"), "dtype": "bf16",
                               "attn_implementation": "sdpa"}
    assert config["data"]["max_length"] == 65536 and config["data"]["num_proc"] == 0
    assert config["data"]["sources"] == [{"type": "huggingface", "name_or_path": str(tmp_path / "d"),
                                          "process": False}]
    assert config["optimizer"]["type"] == "torch_adamw" and config["type"] == "alst_peer"
    json.dumps(config)  # it is written as JSON for the child


def test_config_lifts_the_position_limit_only_past_it(tmp_path):
    def config(length):
        return arctic_peer.arctic_config(length, tmp_path, tmp_path, tmp_path, tmp_path, 1, "liger", "sdpa",
                                         1e-5, max_positions=131072)

    assert "hf_config_kwargs" not in config(131072)["model"]
    assert config(524288)["model"]["hf_config_kwargs"] == {"max_position_embeddings": 524288}


def test_row_of_a_length_that_ran():
    row = arctic_peer.classify(65536, 0, False, [step(1, 9.0, 50 * 2**30), step(2, 4.0, 48 * 2**30, 11.7)],
                               {"status": "ok"}, "Train iter: 2/2 | loss: 11.7")
    assert (row["status"], row["oom"], row["steps_done"], row["error"]) == ("ok", False, 2, None)
    assert (row["seconds"], row["first_step_seconds"], row["loss"]) == (4.0, 9.0, 11.7)
    assert row["tokens_per_s"] == pytest.approx(65536 / 4.0)
    assert row["peak_bytes"] == 50 * 2**30 and row["reserved_bytes"] == 51 * 2**30


def test_oom_from_the_result_or_from_the_log_alone():
    result = {"status": "oom", "error": "OutOfMemoryError: x"}
    by_result = arctic_peer.classify(524288, 3, False, [], result, "")
    assert (by_result["status"], by_result["oom"], by_result["error"]) == ("oom", True, "OutOfMemoryError: x")
    by_log = arctic_peer.classify(524288, 1, False, [], None, OOM_LOG)  # died before writing its result
    assert by_log["status"] == "oom"
    assert by_log["error"].startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert by_log["seconds"] is None and by_log["tokens_per_s"] is None


def test_oom_in_a_later_step_is_still_oom():
    row = arctic_peer.classify(262144, 3, False, [step(1, 60.0, 70 * 2**30)], {"status": "oom", "error": "e"},
                               "")
    assert row["status"] == "oom" and row["steps_done"] == 1 and row["seconds"] == 60.0


def test_timeout_after_a_step_keeps_the_step_and_before_it_is_a_timeout():
    cut = arctic_peer.classify(524288, -9, True, [step(1, 200.0, 70 * 2**30)], None, "")
    assert (cut["status"], cut["timed_out"], cut["seconds"]) == ("ok", True, 200.0)
    none = arctic_peer.classify(524288, -9, True, [], None, "loading model")
    assert (none["status"], none["error"]) == ("timeout", "killed at the time limit")


def test_error_text_from_the_result_then_the_log_then_the_exit_code():
    # the result's own word beats an OOM line in the log
    assert arctic_peer.classify(8192, 1, False, [], {"status": "error", "error": "ValueError: bad"},
                                OOM_LOG)["status"] == "error"
    log = "Traceback (most recent call last):\n  ...\nImportError: cannot import name 'X' from 'torch'\n"
    assert arctic_peer.classify(8192, 1, False, [], None, log)["error"] == \
        "ImportError: cannot import name 'X' from 'torch'"
    assert arctic_peer.classify(8192, -9, False, [], None, "")["error"].startswith("exit code -9 (SIGKILL")
    assert arctic_peer.classify(8192, 1, False, [], None, "")["error"] == "exit code 1"


def test_longest_ok_and_jsonl(tmp_path):
    rows = [{"seq_len": 65536, "status": "ok"}, {"seq_len": 131072, "status": "ok"},
            {"seq_len": 262144, "status": "oom"}]
    assert arctic_peer.longest_ok(rows) == 131072
    assert arctic_peer.longest_ok([{"seq_len": 65536, "status": "error"}]) is None
    assert arctic_peer.read_jsonl(tmp_path / "none.jsonl") == []
    lines = [json.dumps(step(1, 2.0, 1)), "", json.dumps(step(2, 1.0, 2))]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    assert [s["seconds"] for s in arctic_peer.read_jsonl(tmp_path / "s.jsonl")] == [2.0, 1.0]


def test_wandb_stub_imports_as_arctic_training_does_and_refuses_use(tmp_path):
    arctic_peer.write_wandb_stub(tmp_path)
    code = ("import wandb\nfrom wandb.sdk.wandb_run import Run\nassert Run.__name__ == 'Run'\n"
            "try:\n    wandb.init(project='x')\nexcept RuntimeError as e:\n    print('refused', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused wandb is a stub")


def test_tokenizer_config_is_one_transformers_4_reads(tmp_path):
    arctic_peer.write_tokenizer(ROOT / "data" / "tiny-llama", tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # not 5.x's TokenizersBackend
    assert config["pad_token"] == "<pad>" and config["eos_token"] == "</s>"
    source = ROOT / "data" / "tiny-llama" / "tokenizer.json"
    assert (tmp_path / "tokenizer.json").read_bytes() == source.read_bytes()


def test_setup_failure_is_written_not_raised(tmp_path):
    (tmp_path / "wheels").mkdir()
    args = arctic_peer.parse_args(["--wheels", str(tmp_path / "wheels"), "--out", str(tmp_path / "out"),
                                   "--work", str(tmp_path / "work"), "--time-limit", "60"])
    assert arctic_peer.orchestrate(args) == 1
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["rows"] == [] and results["longest_ok"] is None
    assert results["setup_error"].startswith("no wheels in")
    assert "no wheels in" in (tmp_path / "out" / "run.log").read_text()



def collated(length: int, positions=None) -> dict:
    """A batch as ArcticTraining 0.8.0's DataCollatorForCausalLM makes one (data/sft_factory.py:133-181):
    input_ids, labels, position_ids (an arange for an unpacked row), packed_sample_seqlens; no mask."""
    import torch

    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(length)[None] if positions is None else positions
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions,
            "packed_sample_seqlens": [[length]]}


def test_attention_mask_choice_defaults_to_ones(tmp_path):
    args = arctic_peer.parse_args(["--wheels", str(tmp_path), "--out", str(tmp_path)])
    assert args.attention_mask == "ones" and set(arctic_peer.ATTENTION_MASK_CHOICES) == {"ones", "none"}
    assert arctic_peer.parse_args(["--wheels", str(tmp_path), "--out", str(tmp_path), "--attention-mask",
                                   "none"]).attention_mask == "none"
    with pytest.raises(SystemExit):
        arctic_peer.parse_args(["--wheels", str(tmp_path), "--out", str(tmp_path), "--attention-mask",
                                "causal"])


def test_all_ones_mask_for_one_sequence_per_row_and_refused_for_packed_rows():
    import torch

    batch = collated(512)
    out = arctic_peer.with_unpadded_attention_mask(batch)
    assert "attention_mask" not in batch  # the collator's batch is not changed in place
    assert out["attention_mask"].shape == (1, 512) and out["attention_mask"].dtype == batch["input_ids"].dtype
    assert bool((out["attention_mask"] == 1).all())
    assert all(out[k] is batch[k] for k in batch)
    packed = torch.cat([torch.arange(256), torch.arange(256)])[None]  # two documents in one row
    with pytest.raises(ValueError, match="not a plain arange"):
        arctic_peer.with_unpadded_attention_mask(collated(512, packed))
    with pytest.raises(ValueError, match="not a plain arange"):
        arctic_peer.with_unpadded_attention_mask(collated(512, torch.arange(256)[None]))


TRANSFORMERS_4_WHEELS = ("transformers-4.57.6", "huggingface_hub-", "tokenizers-", "requests-", "urllib3-",
                         "idna-", "certifi-", "charset_normalizer-")
MASK_CHECK = """
import importlib.util, sys, torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama
spec = importlib.util.spec_from_file_location("arctic_peer", sys.argv[1])
ap = importlib.util.module_from_spec(spec); spec.loader.exec_module(ap)
seen, create = [], modeling_llama.create_causal_mask
def recording(*args, **kwargs):  # what LlamaModel.forward hands its attention layers
    mask = create(*args, **kwargs); seen.append(None if mask is None else tuple(mask.shape)); return mask
modeling_llama.create_causal_mask = recording
L = 512
ids = torch.randint(0, 1000, (1, L), generator=torch.Generator().manual_seed(0))
labels = ids.clone()
ids[:, -64:], labels[:, -64:] = 0, -100  # the collator's padding: pad ids, ignored labels, positions go on
old = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(L)[None]}
new = ap.with_unpadded_attention_mask(old)
config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L,
                     attn_implementation="sdpa")
torch.manual_seed(0)
model = LlamaForCausalLM(config).train()
model.gradient_checkpointing_enable()
losses, grads = [], []
for batch in (old, new):
    seen.clear()
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    losses.append(loss.item())
    grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    print(transformers.__version__, seen, ap.causal_mask_probe(config, batch))
print(losses[0] - losses[1], ((grads[0] - grads[1]).norm() / grads[0].norm()).item())
"""


def test_transformers_4_builds_no_mask_for_the_peer_batch_and_a_dense_one_for_the_collators(tmp_path):
    """With transformers 4.57.6 from the wheel (skipped where .whl_arctic is absent): the collator's batch
    makes LlamaModel hand SDPA a dense [L, L] mask, the batch with the all-ones mask none (is_causal), and
    the loss and gradients are the same, a padded tail included; causal_mask_probe says what the model saw."""
    import zipfile

    wheels = [next((ROOT / ".whl_arctic").glob(f"{name}*.whl"), None) for name in TRANSFORMERS_4_WHEELS]
    if not all(wheels):
        pytest.skip(".whl_arctic does not hold transformers 4.57.6 and its imports")
    site = tmp_path / "site"
    for wheel in wheels:
        zipfile.ZipFile(wheel).extractall(site)
    done = subprocess.run([sys.executable, "-c", MASK_CHECK, str(ROOT / "scripts" / "arctic_peer.py")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    old, new, difference = done.stdout.strip().splitlines()[-3:]
    assert old == "4.57.6 [(1, 1, 512, 512)] Tensor [1, 1, 512, 512] torch.bool (first 512 tokens)"
    assert new == "4.57.6 [None] None"
    loss_difference, grad_difference = map(float, difference.split())
    assert abs(loss_difference) < 1e-5 and grad_difference < 1e-5
