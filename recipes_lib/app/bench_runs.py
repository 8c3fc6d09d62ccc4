"""Measure a technique and its reference through the notebooks' harnesses; each gives two rows.

Every row has ``name``, ``oom``, ``memory`` (a ``MemoryBreakdown``, or None where the harness does not
measure memory), ``tokens_per_s`` with ``_min``/``_max`` (the slowest and fastest timed call) and
``mfu`` (None without a datasheet peak), so ``bench.speed_ratio`` and ``bench.describe_ratio`` read
any of them. The harnesses: ``bench.run`` (training steps, notebook 01), ``decode.benchmark``
(static-cache greedy decoding, 03), ``attention_bench.time_attention`` (kernels, 03-04),
``pipeline.time_pipeline`` (input pipelines, 02), ``curriculum.run`` (04) and the training script
launched on several processes (02).
"""

from __future__ import annotations

import os
import statistics

import torch
from transformers import AutoConfig

from ..attention import kernels
from ..core import batches, dataload, models, tasks
from ..core.errors import RecipeError
from ..inference import distill, generate, quantize
from ..long_context import curriculum
from ..measure import attention_bench, bench, decode, flops, memory, pipeline
from ..measure.memory import MemoryBreakdown
from ..parallel import runs
from .techniques import Settings, Technique

SCRIPT = models.REPO_ROOT / "scripts" / "train_distributed.py"
MULTI_GPU = {"fsdp2": ("ddp", "fsdp2"), "fsdp-qlora": ("fsdp2", "fsdp2-qlora")}


def model_config(name: str):
    return AutoConfig.from_pretrained(models.resolve(name))


def full_rows(vocab_size: int, seq_len: int):
    """``micro_batch -> endless rows of seq_len random tokens``: no padding, no documents."""
    def rows(micro_batch: int):
        generator = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(vocab_size, (micro_batch, seq_len), generator=generator)
            yield {"input_ids": ids, "labels": ids}
    return rows


def rates(name: str, samples: list[float], memory_split=None, mfu_of=None, **columns) -> dict:
    """A row from repeated whole measurements of tokens/s: the median, the slowest and the fastest."""
    median = statistics.median(samples)
    return {"name": name, "oom": False, "memory": memory_split, "tokens_per_s": median,
            "tokens_per_s_min": min(samples), "tokens_per_s_max": max(samples),
            "mfu": mfu_of(median) if mfu_of else None, "columns": columns}


def measure(t: Technique, s: Settings) -> list[dict]:
    """[reference row, technique row] for ``t`` at ``s``."""
    kind = {"train": train_pair, "decode": decode_pair, "kernel": kernel_pair, "pipeline": pipeline_pair,
            "curriculum": curriculum_pair, "multi-gpu": multi_gpu_pair}[t.kind]
    return kind(t, s)


def train_pair(t: Technique, s: Settings) -> list[dict]:
    config = model_config(s.model)
    models.check_seq_len(config, s.seq_len)
    batches_fn = full_rows(config.vocab_size, s.seq_len)
    return [bench.run(c, batches_fn, s.hw, steps=s.steps, seq_len=s.seq_len,
                      flops_per_token=bench.flops_counter(config, s.seq_len)) for c in t.pair(s)]


def decode_flops_per_token(config) -> float:
    """2 FLOPs per weight of every matmul (LM head included) for one decoded token."""
    return 2.0 * (sum(i * o for i, o in flops.linear_shapes(config)) + config.vocab_size * config.hidden_size)


def decode_pair(t: Technique, s: Settings) -> list[dict]:
    teacher = models.load_model(s.model, hw=s.hw).eval()
    if t.name == "int8":
        other, backend = quantize.int8_weight_only(models.load_model(s.model, hw=s.hw).eval())
        pair = [("unquantized", teacher), (f"int8 weight-only ({backend})", other)]
    else:
        layers = max(1, teacher.config.num_hidden_layers // 2)
        pair = [(f"teacher ({teacher.config.num_hidden_layers} layers)", teacher),
                (f"student ({layers} layers)", distill.make_student(teacher, layers))]
    per_token = decode_flops_per_token(teacher.config)
    return [decode_row(name, model, s, per_token) for name, model in pair]


def decode_row(name: str, model, s: Settings, flops_per_token: float) -> dict:
    """``decode.benchmark`` at batch 1 (compiled on a GPU), and the peak of one untimed generation."""
    row = decode.benchmark(model, s.hw, 1, s.prompt_len, s.new_tokens, repeats=max(s.steps, 3), name=name)
    weights = memory.tensor_bytes([*model.parameters(), *model.buffers()])
    prompt = torch.randint(model.config.vocab_size, (1, s.prompt_len)).to(s.hw.device)
    with memory.peak_memory(s.hw.device, [*model.parameters(), *model.buffers()]) as peak:
        generate.greedy_tokens(model, prompt, s.new_tokens)
    split = MemoryBreakdown(weights, 0, 0, max(peak["peak"] - weights, 0), peak["peak"])
    return {"name": name, "oom": False, "memory": split, **decode.rates(row),
            "mfu": flops.mfu(row["decode_tokens_per_s"], flops_per_token, s.hw.peak_flops),
            "columns": {"prefill tokens/s": row["prefill_tokens_per_s"]}}


def kernel_pair(t: Technique, s: Settings) -> list[dict]:
    config = model_config(s.model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sdpa = next(n for n in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math")
                if n in kernels.available(s.hw))
    window = max(16, s.seq_len // 4)
    backward = s.hw.cuda  # FlexAttention has no backward on CPU
    rows = []
    pair = [(f"{sdpa} causal", sdpa, None), (f"flex-sliding, window {window}", "flex-sliding", window)]
    for name, impl, win in pair:
        r = attention_bench.time_attention(impl, s.seq_len, heads, head_dim, s.hw, win, backward,
                                           repeats=max(s.steps, 3), batch=s.micro_batch)
        label = name + ("" if backward else ", forward")
        if r["oom"]:
            rows.append({"name": label, "oom": True})
            continue
        tokens = s.micro_batch * s.seq_len
        peak = r["peak_bytes"]
        rows.append({"name": label, "oom": False,
                     "memory": None if peak is None else MemoryBreakdown(0, 0, 0, peak, peak),
                     "tokens_per_s": tokens / r["seconds"], "tokens_per_s_min": tokens / r["seconds_max"],
                     "tokens_per_s_max": tokens / r["seconds_min"],
                     "mfu": r["tflops"] * 1e12 / s.hw.peak_flops if s.hw.peak_flops else None,
                     "columns": {"TFLOP/s": r["tflops"]}})
    return rows


def _tokenizer(name: str):
    return models.load_tokenizer("data/tiny-llama" if name.startswith("random:") else name)


def pipeline_pair(t: Technique, s: Settings) -> list[dict]:
    """Notebook 02's naive and efficient input pipelines feeding the same AdamW steps."""
    tokenizer = _tokenizer(s.model)
    model = models.load_model(s.model, hw=s.hw)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    texts = dataload.raw_corpus(max(64, s.micro_batch * s.seq_len // 8), seed=0)  # ~25 tokens a document
    workers = 4 if s.hw.cuda else 0  # on a CPU, workers would compete with the compute for the cores
    packed = dataload.packed_dataset(texts, tokenizer, s.seq_len)
    naive = dataload.naive_loader(texts, tokenizer, s.seq_len, s.micro_batch)
    loaders = {"tokenise per row, no workers": naive,
               f"pre-tokenised, packed, {workers} workers":
                   dataload.efficient_loader(packed, s.micro_batch, s.hw.device, num_workers=workers)}
    rows = []
    for name, loader in loaders.items():
        runs_ = [pipeline.time_pipeline(loader, step, s.hw.device, steps=max(s.steps, 3), warmup=1)
                 for _ in range(3)]
        rows.append(rates(name, [r.tokens_per_s for r in runs_],
                          **{"waiting for data %": 100 * statistics.median(r.wait_fraction for r in runs_)}))
    return rows


def curriculum_pair(t: Technique, s: Settings) -> list[dict]:
    """The same tokens at the target length throughout, and short-to-long; whole runs repeated 3 times."""
    tokenizer = _tokenizer(s.model)
    tokens_per_step = s.micro_batch * s.seq_len
    examples = max(400, tokens_per_step // 5)  # about 20 tokens each: a few steps' worth before it wraps
    stream = batches.token_stream(tokenizer, tasks.make_examples(examples, seed=0)).to(s.hw.device)
    held_out = batches.token_stream(tokenizer, tasks.make_examples(max(60, 8 * s.seq_len // 10), seed=1))
    held_out = held_out[:held_out.numel() // s.seq_len * s.seq_len].view(-1, s.seq_len)[:8].to(s.hw.device)
    steps = max(4, 2 * s.steps)  # 4: one step at each shorter length, two at the target
    config = model_config(s.model)
    rows = []
    for name, start in [(f"{s.seq_len} tokens throughout", None), (f"{s.seq_len // 4} -> {s.seq_len}",
                                                                       s.seq_len // 4)]:
        schedule = curriculum.length_schedule(s.seq_len, steps, start=start)
        samples, loss = [], None
        for repeat in range(3):
            model = models.fresh_model(s.model, hw=s.hw, seed=repeat)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            history = curriculum.run(model, optimizer, schedule, stream, tokens_per_step, lambda: 0.0, steps,
                                     autocast_dtype=s.hw.amp_dtype, progress=False)
            samples.append(history.tokens[-1] / history.seconds[-1])
            loss = curriculum.eval_loss(model, held_out, s.hw.amp_dtype)
        per_token = flops.training_flops_per_token(config, s.seq_len)  # at the target length: an upper bound
        rows.append(rates(name, samples, mfu_of=lambda r: flops.mfu(r, per_token, s.hw.peak_flops),
                          **{"eval loss": loss}))
    return rows


def multi_gpu_pair(t: Technique, s: Settings) -> list[dict]:
    """Notebook 02's training script on ``s.nproc`` processes, for the reference and the technique."""
    gpus = torch.cuda.device_count()
    if s.nproc < 2:
        raise RecipeError(f"{t.name} shards the model over several GPUs: it needs at least 2 GPUs (found "
                          f"{gpus}); on a machine without them, --nproc 2 runs it on 2 CPU processes (gloo), "
                          "slowly")
    if not SCRIPT.is_file():
        raise RecipeError(f"{SCRIPT} is missing: run recipes bench from a checkout of the repository")
    config = model_config(s.model)
    values = {"model": s.model, "seq-len": s.seq_len, "bf16": s.hw.cuda, "full-rows": True,
              "steps": s.steps + 2, "warmup": 2, "micro-batch": s.micro_batch,
              "global-batch": s.micro_batch * s.nproc, "lora-r": s.lora_r}
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(models.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    rows = []
    for strategy in MULTI_GPU[t.name]:
        result = runs.launch_row(str(SCRIPT), s.nproc, values | {"strategy": strategy}, gpus=s.nproc,
                                 timeout_s=600, env=env)
        if "error" in result:
            raise RecipeError(f"{strategy} on {s.nproc} processes could not run: {result['error']}")
        r = runs.throughput(result, config, s.hw.peak_flops)
        split = memory.memory_breakdown(r)  # CUDA readings; on CPU, the state each rank holds
        columns = {} if split is not None else {"weights/rank MiB": r["param_bytes"] / 2**20,
                                                "AdamW/rank MiB": r["optimizer_bytes"] / 2**20}
        rows.append({"name": f"{strategy}, {s.nproc} processes (per rank)", "oom": False, "columns": columns,
                     "memory": split, "tokens_per_s": r["tokens_per_s_per_gpu"],
                     "tokens_per_s_min": r["tokens_per_s_per_gpu_min"],
                     "tokens_per_s_max": r["tokens_per_s_per_gpu_max"], "mfu": r["mfu"]})
    return rows
