"""ArcticTraining's single-GPU ALST recipe on our ladder's model, length by length (issue 19, point 5).

    python3 scripts/arctic_peer.py --wheels .whl_arctic --out $OUT/arctic \
        --lengths 65536 131072 262144 524288 --time-limit 540

ArcticTraining 0.8.0 pins transformers<5, so it runs beside the system's transformers 5 in a site folder
of its own: the wheels in ``--wheels`` (docs/peers/arctic_training.md says how they were built) are
installed with ``pip --target`` into WORK/site, which goes first on PYTHONPATH of the runs only; torch,
triton, numpy, peft, accelerate, pandas and pyarrow come from the system python. (A venv made with
``--system-site-packages`` by a venv's python sees the base interpreter's packages, not the venv's
torch, hence the site folder.) wandb, imported by ArcticTraining at import time and used only with
``wandb.enable``, is replaced by a stub.

The model is the ladder's own ``random:<shape>`` (materialised by recipes_lib with the system python)
under a config.json that transformers 4 reads as written: a folder saved by transformers 5 keeps RoPE
in ``rope_parameters``, which 4.x ignores (it would silently train with rope_theta 10000). Each length
runs in its own process on ``--steps`` rows of random tokens (labels = inputs), batch 1, with
ArcticTraining's single-GPU ALST settings: ``sequence_parallel_size: 1``, ``tiled_mlp_compute``,
``activation_checkpoint_cpu_offload`` (every layer checkpointed), bf16, its default ZeRO-2 DeepSpeed
config, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, and the loss ``--loss`` names: ``liger``
(Liger's fused linear cross-entropy: ArcticTraining's own path at SP=1), ``tiled`` (DeepSpeed's
TiledFusedLogitsLoss, as ArcticTraining's SP>1 path calls it) or ``plain`` (full logits). The optimizer
is torch's AdamW: ArcticTraining's FusedAdam JIT-compiles a CUDA extension, which needs nvcc.

Attention mask (``--attention-mask``, default ``ones``): ArcticTraining's SFT collator hands the model
``input_ids``, ``labels``, ``position_ids`` (a plain arange per row here) and no ``attention_mask``, made for
flash attention. Under SDPA, transformers 4.57.6's ``create_causal_mask`` then always materialises a dense
``[L, L]`` boolean mask: with no 2D mask and no cache it reads ``position_ids`` as possibly packed
(``find_packed_sequence_indices`` always returns a tensor; LlamaModel fills ``position_ids`` in when absent)
and sets ``allow_is_causal_skip=False`` (masking_utils.py:735-740, 820-822): 64 GiB at 262,144 tokens.
ArcticTraining drops that mask itself only at SP>1 (trainer.py:223-231, "This should also benefit a single
gpu use case when SDPA is used"). ``ones`` adds an all-ones ``attention_mask`` to each batch (the data are
one unpadded document per row, which is checked): transformers' own no-padding path then returns no mask
and SDPA runs with ``is_causal=True`` (masking_utils.py:374, sdpa_attention.py:81), the same attention as
the dense causal mask. ``none`` feeds the collator's batch unchanged (the dense mask; run_0008's runs).

Writes OUT/results.json (a row per length: ok / oom / error / timeout, peak GPU bytes, seconds of the
last step, tokens/s) and OUT/run.log; per length OUT/len_<L>/ holds config.json, log.txt (the run's
output), steps.jsonl and result.json. Site packages, model and data go under ``--work``, never OUT.
Stops at the first length that does not finish a step.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OOM_PATTERNS = ("CUDA out of memory", "OutOfMemoryError", "out of memory")
SETUP_MARGIN_S = 15  # kept back at the end to write results
MIN_RUN_S = 45       # a length is not started with less time than this left
MASK_PROBE_TOKENS = 1024  # create_causal_mask is asked about this prefix of each batch, on the CPU
ATTENTION_MASK_CHOICES = {
    "ones": "an all-ones attention_mask beside the collator's arange position_ids (one unpadded document "
            "per row, checked): transformers 4.57.6 skips the causal mask and SDPA runs with is_causal=True "
            "(masking_utils._ignore_causal_mask_sdpa), as ALST does at SP>1 (its trainer drops the mask)",
    "none": "the collator's batch as is (position_ids, no attention_mask): transformers 4.57.6 reads the "
            "position_ids as possibly packed and builds a dense [L, L] bool mask for SDPA "
            "(masking_utils.create_causal_mask, allow_is_causal_skip=False)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, nargs="+", required=True, help="folder(s) of wheels")
    parser.add_argument("--out", type=Path, required=True, help="results.json, run.log and per-length logs")
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 262144, 524288])
    parser.add_argument("--time-limit", type=float, default=540.0, help="seconds for all, setup included")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per length; the last is shown")
    parser.add_argument("--loss", choices=("liger", "tiled", "plain"), default="liger")
    parser.add_argument("--attn", default="sdpa", help="model.attn_implementation")
    parser.add_argument("--attention-mask", choices=tuple(ATTENTION_MASK_CHOICES), default="ones",
                        help="ones: add an all-ones 2D mask (SDPA is_causal, no [L, L] mask); "
                             "none: the collator's batch as is")
    parser.add_argument("--shape", default="llama-3.2-1b", help="a shape in data/configs (random:<shape>)")
    parser.add_argument("--tokenizer", type=Path, default=REPO / "data" / "tiny-llama",
                        help="only its pad token is used: the data are token ids")
    parser.add_argument("--work", type=Path, default=Path("/tmp/arctic_peer"), help="site, model, data")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if any(length < 256 or length % 256 for length in args.lengths):
        parser.error("lengths must be multiples of 256 (ArcticTraining pads to a multiple of div_length=256)")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def arctic_config(length: int, model_dir: Path, data_dir: Path, len_dir: Path, cache_dir: Path,
                  steps: int, loss: str, attn: str, lr: float, max_positions: int) -> dict:
    """ArcticTraining's trainer config for one length: batch 1, ``steps`` steps, single-GPU ALST."""
    model = {"type": "liger" if loss == "liger" else "huggingface", "name_or_path": str(model_dir),
             "dtype": "bf16", "attn_implementation": attn}
    if length > max_positions:  # the position limit only; llama3 RoPE does not read it
        model["hf_config_kwargs"] = {"max_position_embeddings": length}
    return {
        "type": "alst_peer",
        "model": model,
        "tokenizer": {"name_or_path": str(model_dir)},
        "data": {"sources": [{"type": "huggingface", "name_or_path": str(data_dir), "process": False}],
                 # num_proc 0: datasets maps in this process (its workers would unpickle this script's
                 # trainer class by value, and ArcticTraining's registry refuses a second registration)
                 "max_length": length, "num_proc": 0, "dl_num_workers": 1, "cache_dir": str(cache_dir)},
        "micro_batch_size": 1,
        "sequence_parallel_size": 1,
        "activation_checkpoint_cpu_offload": True,
        "tiled_mlp_compute": True,
        "train_iters": steps,
        "epochs": 1,
        "optimizer": {"type": "torch_adamw", "lr": lr},
        "logger": {"output_dir": str(len_dir / "arctic_logs")},
        "train_log_metrics_path": str(len_dir / "train-log-metrics.jsonl"),
        "kill_switch_path": str(len_dir / "kill_switch"),
        "seed": 42,
    }


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_oom_text(text: str) -> bool:
    return any(pattern in text for pattern in OOM_PATTERNS)


def last_error_line(text: str) -> str | None:
    """The last line of the log that names an exception (``SomethingError: ...``), if any."""
    lines = [line for line in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception)\b", line)]
    return lines[-1].strip()[:500] if lines else None


def classify(length: int, returncode: int | None, timed_out: bool, steps: list[dict], result: dict | None,
             log_text: str) -> dict:
    """One length's row from what its process left: its exit, its per-step lines, its result, its log."""
    row = {"seq_len": length, "steps_done": len(steps), "returncode": returncode, "timed_out": timed_out,
           "seconds": None, "first_step_seconds": None, "tokens_per_s": None, "peak_bytes": None,
           "reserved_bytes": None, "host_rss_bytes": None, "loss": None, "causal_mask": None, "error": None}
    if steps:
        last = steps[-1]
        row |= {"seconds": last["seconds"], "first_step_seconds": steps[0]["seconds"],
                "tokens_per_s": last.get("tokens", length) / last["seconds"], "loss": last.get("loss"),
                "causal_mask": last.get("causal_mask"),
                "peak_bytes": max((s.get("peak_bytes") or 0) for s in steps) or None,
                "reserved_bytes": max((s.get("reserved_bytes") or 0) for s in steps) or None,
                "host_rss_bytes": max((s.get("host_rss_bytes") or 0) for s in steps) or None}
    reported = (result or {}).get("status")
    if reported == "ok" or (steps and timed_out):
        status = "ok"  # a step ran and was timed; a timeout cut only the later ones
    elif reported == "oom" or (reported != "error" and is_oom_text(log_text)):
        status = "oom"
    elif timed_out:
        status = "timeout"
    else:
        status = "error"
    row["status"], row["oom"] = status, status == "oom"
    if status != "ok":
        row["error"] = ((result or {}).get("error") or last_error_line(log_text)
                        or exit_reason(returncode, timed_out))
    return row


def exit_reason(returncode: int | None, timed_out: bool) -> str:
    if timed_out:
        return "killed at the time limit"
    if returncode == -9:
        return "exit code -9 (SIGKILL: the kernel's OOM killer, if host memory ran out)"
    return f"exit code {returncode}"


def longest_ok(rows: list[dict]) -> int | None:
    return max((r["seq_len"] for r in rows if r["status"] == "ok"), default=None)


class Run:
    """The orchestrating process: logs, time left, results."""

    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.time_limit
        args.out.mkdir(parents=True, exist_ok=True)
        self.log_file = (args.out / "run.log").open("a")
        self.results = {"peer": "ArcticTraining", "argv": sys.argv, "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            if k not in ("wheels", "out", "work")}, "rows": []}

    def log(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic() - SETUP_MARGIN_S

    def save(self) -> None:
        self.results["longest_ok"] = longest_ok(self.results["rows"])
        (self.args.out / "results.json").write_text(json.dumps(self.results, indent=1))

    def command(self, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
        """Run a setup command to its end within the time left; its output goes to the log."""
        self.log("$ " + " ".join(cmd)[:400])
        done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=max(self.left(), 1))
        output = (done.stdout or "") + (done.stderr or "")
        self.log_file.write(output[-20000:] + "\n")
        if done.returncode:
            raise RuntimeError(f"exit {done.returncode}: {last_error_line(output) or output[-500:]}")
        return done.stdout


def site_env(site: Path, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", TRITON_CACHE_DIR=str(work / "triton"),
               HF_HOME=str(work / "hf"), PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    return env


def install(run: Run, site: Path) -> None:
    """The wheels into ``site`` (dependencies not resolved: the system provides the rest), and the stub."""
    shutil.rmtree(site, ignore_errors=True)
    wheels = sorted(str(w) for folder in run.args.wheels for w in Path(folder).glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"no wheels in {run.args.wheels}")
    run.command([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                 "--target", str(site), *wheels])
    write_wandb_stub(site)


def write_wandb_stub(site: Path) -> None:
    """What ``arctic_training.trainer.trainer`` imports from wandb, failing loudly if ever called."""
    stub = site / "wandb"
    (stub / "sdk").mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(
        '"""Stub: arctic_training imports wandb at import time; this run keeps wandb.enable false."""\n'
        "from . import sdk, util  # noqa: F401\n\n\ndef init(*args, **kwargs):\n"
        "    raise RuntimeError('wandb is a stub here: keep wandb.enable false')\n")
    (stub / "util.py").write_text("def generate_id(*args, **kwargs):\n"
                                  "    raise RuntimeError('wandb is a stub here')\n")
    (stub / "sdk" / "__init__.py").write_text("from . import wandb_run  # noqa: F401\n")
    (stub / "sdk" / "wandb_run.py").write_text("class Run:\n    pass\n")


def materialise(run: Run) -> str | None:
    """The ladder's ``random:<shape>`` folder, made by recipes_lib under the system python, or None."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RECIPES_PROGRESS="0",
               RECIPES_CACHE=str(run.args.work / "recipes_cache"))
    code = f"from recipes_lib.core import models; print(models.resolve('random:{run.args.shape}'))"
    try:
        return run.command([sys.executable, "-c", code], env=env, cwd=REPO).strip().splitlines()[-1]
    except (RuntimeError, IndexError, subprocess.TimeoutExpired) as error:
        run.log(f"recipes_lib could not materialise random:{run.args.shape} ({error}); building it in 4.x")
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_length(run: Run, length: int, site: Path, model_dir: Path, max_positions: int, vocab: int) -> dict:
    """One length in its own process, killed with its process group when the time is up."""
    args, len_dir = run.args, run.args.out / f"len_{length}"
    len_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("steps.jsonl", "result.json"):
        (len_dir / stale).unlink(missing_ok=True)
    data_dir = args.work / "data" / f"len_{length}_x{args.steps}"
    spec = {"peer": {"length": length, "steps": args.steps, "loss": args.loss, "vocab": vocab,
                     "seed": args.seed, "data_dir": str(data_dir), "attention_mask": args.attention_mask,
                     "attention_mask_why": ATTENTION_MASK_CHOICES[args.attention_mask]},
            "arctic": arctic_config(length, model_dir, data_dir, len_dir, args.work / "cache" / str(length),
                                    args.steps, args.loss, args.attn, args.lr, max_positions)}
    (len_dir / "config.json").write_text(json.dumps(spec, indent=1))
    env = site_env(site, args.work) | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(free_port())}
    timeout = run.left()
    run.log(f"length {length}: starting, {timeout:.0f} s left")
    with (len_dir / "log.txt").open("w") as out:
        command = [sys.executable, str(Path(__file__).resolve()), "_child", "run-one", str(len_dir)]
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=len_dir,
                                   start_new_session=True)
        try:
            returncode, timed_out = process.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode, timed_out = process.wait(), True
    result_file = len_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    row = classify(length, returncode, timed_out, read_jsonl(len_dir / "steps.jsonl"), result,
                   (len_dir / "log.txt").read_text(errors="replace"))
    run.log(f"length {length}: {row['status']}, {row['steps_done']} step(s), {row['seconds']} s/step, "
            f"peak {row['peak_bytes']} B, causal mask {row['causal_mask']}, error {row['error']}")
    return row


def orchestrate(args) -> int:
    run = Run(args)
    site, model_dir = args.work / "site", args.work / f"model-{args.shape}"
    try:
        run.log(f"python {sys.version.split()[0]} at {sys.executable}; installing into {site}")
        install(run, site)
        source = materialise(run)
        prepared = run.command([sys.executable, str(Path(__file__).resolve()), "_child", "prepare-model",
                                json.dumps({"source": source, "dest": str(model_dir), "seed": args.seed,
                                            "shape": str(REPO / "data" / "configs" / f"{args.shape}.json"),
                                            "tokenizer": str(args.tokenizer)})],
                               env=site_env(site, args.work))
        run.results["setup"] = json.loads(prepared.strip().splitlines()[-1])
        run.log(f"setup: {run.results['setup']}")
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        run.results["setup_error"] = str(error)
        run.log(f"setup failed: {error}")
        run.save()
        return 1
    setup = run.results["setup"]
    for length in args.lengths:
        if run.left() < MIN_RUN_S:
            run.results["rows"].append({"seq_len": length, "status": "skipped", "oom": False,
                                        "error": f"{run.left():.0f} s left"})
            break
        row = run_length(run, length, site, model_dir, setup["max_position_embeddings"], setup["vocab_size"])
        run.results["rows"].append(row)
        run.save()
        if row["status"] != "ok" or row["timed_out"]:
            break
    run.save()
    run.log(f"longest ok: {run.results['longest_ok']}; results in {args.out / 'results.json'}")
    return 0


# ---- below: run with the site folder on PYTHONPATH (transformers 4.x, arctic_training, deepspeed) ----

def prepare_model(spec: dict) -> dict:
    """The model folder ArcticTraining loads: the shape's config as transformers 4 writes it, the weights of
    ``spec['source']`` linked in (or, without one, random weights made here), a 4.x-readable tokenizer; then
    loaded once by 4.x to check nothing is missing. Prints versions and the check as one JSON line."""
    import arctic_training  # noqa: F401  (the import check: fails here, not mid-ladder)
    import deepspeed
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "deepspeed": deepspeed.__version__, "arctic_training": _version("arctic_training"),
                "liger_kernel": _version("liger_kernel"), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
    fields = {k: v for k, v in json.loads(Path(spec["shape"]).read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(**fields)
    dest = Path(spec["dest"])
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    source = spec["source"]
    weights = sorted(Path(source).glob("*.safetensors*")) if source else []
    if weights:
        config.save_pretrained(dest)
        for file in weights + sorted(Path(source).glob("*.safetensors.index.json")):
            (dest / file.name).symlink_to(file.resolve())
    else:
        torch.manual_seed(spec["seed"])
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(dest)
    write_tokenizer(Path(spec["tokenizer"]), dest)
    model, info = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"transformers {transformers.__version__} loads {dest} with {problems}")
    for key in ("rope_theta", "rope_scaling", "num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(model.config, key) != fields.get(key, getattr(model.config, key)):
            raise RuntimeError(f"{key}: {getattr(model.config, key)} in 4.x, {fields[key]} in the shape")
    AutoTokenizer.from_pretrained(dest)
    made = "recipes_lib random:" if weights else f"made in 4.x, seed {spec['seed']}"
    return versions | {"weights": made, "parameters": sum(p.numel() for p in model.parameters()),
                       "max_position_embeddings": config.max_position_embeddings,
                       "vocab_size": config.vocab_size}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def write_tokenizer(source: Path, dest: Path) -> None:
    """``source``'s tokenizer.json with a tokenizer_config.json transformers 4 reads (5 writes a
    ``TokenizersBackend`` class that 4.x does not know)."""
    shutil.copy(source / "tokenizer.json", dest / "tokenizer.json")
    special = {k: v for k, v in json.loads((source / "tokenizer_config.json").read_text()).items()
               if k.endswith("_token") or k == "model_max_length"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast"} | special
    (dest / "tokenizer_config.json").write_text(json.dumps(config))


def make_dataset(peer: dict) -> None:
    """``steps`` rows of ``length`` random token ids, labels = inputs, saved where the config points."""
    import numpy as np
    from datasets import Dataset

    if Path(peer["data_dir"]).exists():
        return
    rng = np.random.default_rng(peer["seed"])
    ids = [rng.integers(0, peer["vocab"], peer["length"]).tolist() for _ in range(peer["steps"])]
    Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * len(i) for i in ids]}
                      ).save_to_disk(peer["data_dir"])


def with_unpadded_attention_mask(batch: dict) -> dict:
    """``batch`` (as ArcticTraining's SFT collator makes it) with an all-ones ``attention_mask``.

    Only for rows that are one sequence each, i.e. ``position_ids`` a plain arange (the collator's padding
    continues the arange, and causal attention keeps the real tokens from seeing the padding after them):
    there the all-ones mask with ``is_causal`` attends exactly as the dense mask transformers builds from
    the ``position_ids``. Packed rows (positions restarting) are refused, as the mask would join them."""
    import torch

    ids, positions = batch["input_ids"], batch["position_ids"]
    arange = torch.arange(ids.shape[-1], dtype=positions.dtype, device=positions.device)
    if positions.shape != ids.shape or not bool((positions == arange).all()):
        raise ValueError("position_ids are not a plain arange per row (packed samples?): an all-ones "
                         "attention_mask would let the packed documents attend to each other")
    return batch | {"attention_mask": torch.ones_like(ids)}


def causal_mask_probe(model_config, batch: dict, tokens: int = MASK_PROBE_TOKENS) -> str | None:
    """What transformers' ``create_causal_mask`` returns for the first ``tokens`` of ``batch`` (the inputs
    LlamaModel.forward hands it in training: no cache, the batch's position_ids and attention_mask), on
    the CPU: None (SDPA's ``is_causal``, no mask) or the dense mask's type, shape and dtype."""
    import torch
    from transformers.masking_utils import create_causal_mask

    ids = batch["input_ids"]
    n = min(tokens, ids.shape[-1])
    mask = batch.get("attention_mask")
    made = create_causal_mask(
        config=model_config,
        input_embeds=torch.empty((ids.shape[0], n, 0), dtype=torch.bfloat16),  # only shape and dtype are read
        attention_mask=None if mask is None else mask[:, :n].cpu(),
        cache_position=torch.arange(n),
        past_key_values=None,
        position_ids=batch["position_ids"][:, :n].cpu() if "position_ids" in batch else None)
    if made is None:
        return None
    return f"{type(made).__name__} {list(made.shape)} {made.dtype} (first {n} tokens)"


def peer_trainer(loss_kind: str, steps_file: Path, attention_mask: str = "ones"):
    """ArcticTraining's SFT trainer with torch's AdamW, a timed step, the ``tiled`` loss at SP=1, and
    (``attention_mask="ones"``) an all-ones attention mask added to each batch."""
    import math

    import torch
    from arctic_training import SFTTrainer
    from arctic_training.optimizer.adam_factory import FusedAdamOptimizerFactory
    from arctic_training.trainer.utils import to_device
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    class TorchAdamWFactory(FusedAdamOptimizerFactory):
        name = "torch_adamw"

        def create_optimizer(self, model, optimizer_config):
            groups = self.get_optimizer_grouped_params(model, optimizer_config.weight_decay)
            return torch.optim.AdamW(groups, lr=optimizer_config.learning_rate, betas=optimizer_config.betas)

    class PeerTrainer(SFTTrainer):
        name = "alst_peer"
        optimizer_factory: TorchAdamWFactory

        def loss(self, batch) -> torch.Tensor:  # annotated: ArcticTraining checks post-loss callbacks by it
            if loss_kind != "tiled":
                return super().loss(batch)
            # ArcticTraining's SP>1 loss (trainer/sft_trainer.py, TiledFusedLogitsLoss) on one rank
            batch = to_device(batch, self.device)
            batch.pop("packed_sample_seqlens", None)
            labels = torch.nn.functional.pad(batch.pop("labels"), (0, 1), value=-100)
            shift_labels = labels[:, 1:].contiguous()
            model = self.model_unwrapped
            hidden = model.model(**batch, use_cache=False).last_hidden_state
            vocab = model.config.vocab_size
            shards = math.ceil(shift_labels.numel() * vocab * 4 / 2**30)  # ~1 GiB of fp32 logits each

            def loss_sum(model_with_head, hidden_states, labels):
                logits = model_with_head.lm_head(hidden_states)
                good = (labels != -100).sum()
                if good == 0:
                    return (logits.sum() * 0.0).float()
                return model_with_head.loss_function(logits=logits, labels=None, vocab_size=vocab,
                                                     shift_labels=labels) * good

            weight = model.lm_head.weight
            tied = weight is model.get_input_embeddings().weight
            # Tied to the embedding (the 1B shape is), the head's gradient must wait for the embedding's
            # in the backward: ZeRO-2 reduces a parameter once, and TiledFusedLogitsLoss marks it ready
            # at its last shard, inside this forward (found on CPU: "has already been reduced").
            weight.ds_grad_is_ready = not tied
            total = TiledFusedLogitsLoss.apply(loss_sum, model, hidden, shift_labels, None, shards,
                                               [] if tied else [weight], "sum")
            weight.ds_grad_is_ready = True
            return total / max((shift_labels != -100).sum(), 1)

        def step(self, batch):
            cuda = torch.cuda.is_available()
            tokens = int(batch["input_ids"].numel())
            if attention_mask == "ones":
                batch = with_unpadded_attention_mask(batch)
            causal_mask = causal_mask_probe(self.model_unwrapped.config, batch)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            super().step(batch)
            if cuda:
                torch.cuda.synchronize()
            row = {"step": self.global_step, "tokens": tokens, "seconds": time.perf_counter() - start,
                   "loss": self.metrics.values.get("loss"), "causal_mask": causal_mask,
                   "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                   "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
                   "host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
            with steps_file.open("a") as file:
                file.write(json.dumps(row) + "\n")

    return PeerTrainer


def recipe_in_force(trainer) -> dict:
    """What the built trainer runs, read off the objects: evidence that the ALST switches took effect."""
    import torch.utils.checkpoint

    model = trainer.model_unwrapped
    return {"mlp_forward": type(model.model.layers[0].mlp).forward.__qualname__,
            "checkpoint_function": torch.utils.checkpoint.CheckpointFunction.__name__,
            "gradient_checkpointing": model.is_gradient_checkpointing,
            "causal_lm_forward": f"{type(model).forward.__module__}.{type(model).forward.__qualname__}",
            "attn_implementation": model.config._attn_implementation,
            "tied_head": model.lm_head.weight is model.get_input_embeddings().weight,
            "zero_stage": trainer.model.zero_optimization_stage(),
            "optimizer": f"{type(trainer.model.optimizer).__name__} over {type(trainer.optimizer).__name__}",
            "dtype": str(next(model.parameters()).dtype)}


def run_one(len_dir: Path) -> int:
    """One length: data, config, trainer, ``steps`` steps; an OOM is a result (status ``oom``)."""
    spec = json.loads((len_dir / "config.json").read_text())
    result = {"status": "error", "error": None}
    try:
        make_dataset(spec["peer"])
        trainer_cls = peer_trainer(spec["peer"]["loss"], len_dir / "steps.jsonl",
                                   spec["peer"].get("attention_mask", "ones"))
        from arctic_training.config.trainer import get_config

        trainer = trainer_cls(get_config(spec["arctic"]))
        result["recipe"] = recipe_in_force(trainer)
        (len_dir / "result.json").write_text(json.dumps(result))
        trainer.train()
        result["status"] = "ok"
    except Exception as error:  # noqa: BLE001 (every failure becomes the row's status)
        message = f"{type(error).__name__}: {str(error)[:2000]}"  # torch.OutOfMemoryError names itself
        result |= {"status": "oom" if is_oom_text(message) else "error", "error": message}
        import traceback

        traceback.print_exc()
    (len_dir / "result.json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit({"ok": 0, "oom": 3}.get(result["status"], 1))  # no teardown: a hung NCCL exit costs the ladder


def child(argv: list[str]) -> int:
    if argv[0] == "prepare-model":
        print(json.dumps(prepare_model(json.loads(argv[1]))))
        return 0
    if argv[0] == "run-one":
        return run_one(Path(argv[1]))
    raise SystemExit(f"unknown child mode {argv[0]}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        sys.exit(child(sys.argv[2:]))
    sys.exit(orchestrate(parse_args()))
