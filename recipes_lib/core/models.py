"""Load a causal LM and its tokenizer from a hub id, a local path, or ``random:<shape>``.

Everything goes through ``from_pretrained``: the embedded default (``data/tiny-llama``), a hub id
such as ``HuggingFaceTB/SmolLM2-135M``, or ``random:llama-3.2-1b`` (the shape in
``data/configs/llama-3.2-1b.json`` with random weights, saved once to a local cache and loaded
from there, for speed and memory runs where quality does not matter).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .checkpointing import enable_checkpointing
from .errors import RecipeError
from .hardware import Hardware, detect


def repo_root() -> Path:
    """The repository checkout that holds ``data/``, ``configs/``, ``scripts/`` and ``results/``.

    ``RECIPES_HOME`` where set (a package installed from a wheel, next to a clone: what the notebooks'
    Colab cell sets up), else the checkout this package sits in (a source tree, or ``pip install -e``).
    """
    home = os.environ.get("RECIPES_HOME")
    root = Path(home).expanduser().resolve() if home else Path(__file__).resolve().parents[2]
    if home and not (root / "data").is_dir():
        raise RecipeError(f"RECIPES_HOME={home!r} has no data/ folder: point it at a clone of the repository")
    return root


REPO_ROOT = repo_root()  # read once, at import


DEFAULT_MODEL = "data/tiny-llama"  # relative paths resolve from the repository root too


SHAPES_DIR = REPO_ROOT / "data" / "configs"


CACHE_DIR = Path(os.environ.get("RECIPES_CACHE", Path.home() / ".cache" / "recipes_lib"))


QUANTIZATIONS = (None, "nf4", "int8")


def known_shapes() -> list[str]:
    """The shapes ``random:<shape>`` accepts: the configs in ``data/configs``."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def resolve(name: str) -> str:
    """A local directory for ``name``: the path itself, a materialised random shape, or the hub id."""
    if name.startswith("random:"):
        return str(_materialise_random(name.removeprefix("random:")))
    path = Path(name).expanduser()
    for candidate in (path, REPO_ROOT / path):  # relative paths also work from the repository root
        if candidate.is_dir():
            return str(candidate)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1  # hub ids are "org/name"
    if looks_like_path:
        raise RecipeError(f"MODEL={name!r}: no such directory. Set MODEL to a local model folder "
                          f"(the default is {DEFAULT_MODEL}), a hub id like 'HuggingFaceTB/SmolLM2-135M', "
                          f"or random:<shape> with a shape from {known_shapes()}.")
    return name  # a hub id: from_pretrained downloads or reads it from the HF cache


def _materialise_random(shape: str) -> Path:
    config_file = SHAPES_DIR / f"{shape}.json"
    if not config_file.exists():
        raise RecipeError(f"unknown shape {shape!r}; known: {known_shapes()}")
    target = CACHE_DIR / f"random-{shape}"
    if (target / "config.json").exists():
        return target
    fields = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(**fields)
    hw = detect()
    torch.manual_seed(0)
    with torch.device(hw.device):
        model = AutoModelForCausalLM.from_config(config, dtype=hw.model_dtype)
    # Written aside, then renamed: a process reading the cache (a test worker, a rank) never sees half of it.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    model.save_pretrained(partial)
    try:
        os.replace(partial, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _load_error(name: str, error: Exception) -> RecipeError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = ("HF_HUB_OFFLINE=1 is set, so only models already in the cache load" if offline else
            "check the spelling, your network, and for gated models your token (huggingface-cli login)")
    return RecipeError(f"could not load MODEL={name!r} ({type(error).__name__}): {hint}. "
                       f"The embedded default works offline: MODEL={DEFAULT_MODEL!r}.")


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of ``name``, with a pad token (the eos token if the model has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    except OSError as error:
        raise _load_error(name, error) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(quantization: str | None, hw: Hardware, compute_dtype: torch.dtype,
                         quant_storage: torch.dtype = torch.uint8) -> BitsAndBytesConfig | None:
    if quantization not in QUANTIZATIONS:
        raise RecipeError(f"quantization={quantization!r}; choose one of {QUANTIZATIONS}")
    if quantization is None:
        return None
    if not hw.bitsandbytes:
        warnings.warn(f"quantization={quantization!r} needs bitsandbytes with a kernel for {hw.name} "
                      f"(pip install bitsandbytes); loading unquantized {compute_dtype} weights instead.",
                      stacklevel=3)
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage)


def attention_implementation(requested: str) -> str:
    """``requested`` if it can run here; otherwise SDPA, with a warning saying why."""
    if requested == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            warnings.warn("attn_implementation='flash_attention_2' needs the flash-attn package; using "
                          "'sdpa', whose flash/cuDNN kernels need nothing extra.", stacklevel=3)
            return "sdpa"
    return requested


def load_model(name: str = DEFAULT_MODEL, quantization: str | None = None, attn_implementation: str = "sdpa",
               gradient_checkpointing: bool = False, dtype: torch.dtype | None = None,
               hw: Hardware | None = None, quant_storage: torch.dtype = torch.uint8):
    """Load a causal LM onto the detected device.

    Args:
        quantization: None, ``"nf4"`` (4-bit NF4 with double quantization, QLoRA's base) or ``"int8"``.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ``"flex_attention"``.
        gradient_checkpointing: recompute each layer's activations in the backward pass.
        dtype: weight dtype. Defaults to ``hw.model_dtype`` (bf16 on a GPU that has it, fp32 on CPU and
            on fp16-only GPUs, whose loss-scaled training needs fp32 masters); a quantized model's
            base is frozen, so it defaults to ``hw.compute_dtype`` (fp16 on a T4).
        quant_storage: the dtype NF4 values are packed into (bf16 lets FSDP shard them like any weight).
    """
    hw = hw or detect()
    dtype = dtype or (hw.compute_dtype if quantization else hw.model_dtype)
    quant = _quantization_config(quantization, hw, dtype, quant_storage)
    kwargs = {"dtype": dtype,
              "attn_implementation": attention_implementation(attn_implementation)}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": hw.device})
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(name), **kwargs)
    except OSError as error:
        raise _load_error(name, error) from None
    if quant is None:
        model.to(hw.device)
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.train()  # from_pretrained returns eval mode, where transformers silently skips checkpointing
    return model


def fresh_model(name: str = DEFAULT_MODEL, hw: Hardware | None = None, seed: int = 0, **config_overrides):
    """A randomly initialised model of ``name``'s architecture (and overrides), to train from scratch."""
    hw = hw or detect()
    config = AutoConfig.from_pretrained(resolve(name), **config_overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=hw.model_dtype).to(hw.device).train()


def check_seq_len(model_or_config, seq_len: int) -> None:
    """Refuse a sequence length over the model's position limit, saying what to change."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise RecipeError(f"SEQ_LEN={seq_len} is over this model's limit of {limit} positions: "
                          f"lower SEQ_LEN, "
                          f"or extend RoPE (e.g. rope_scaling={{'rope_type': 'yarn', 'factor': "
                          f"{math.ceil(seq_len / limit)}.0}}) and fine-tune at the new length.")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as its number of values."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)  # a packed 4-bit weight, in whatever storage dtype
        if quant_state is not None:
            n = math.prod(quant_state.shape)
        else:
            n = p.numel() * 2 if p.dtype == torch.uint8 else p.numel()  # two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DDP / DeepSpeed / ``LossModel`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "lm", None)  # DDP / DeepSpeed, LossModel
        if inner is None:
            return model
        model = inner


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (each becomes one FSDP unit)."""
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    layers = getattr(base.get_decoder(), "layers", None) if hasattr(base, "get_decoder") else None
    if layers is None:
        raise RecipeError(f"{type(model).__name__}: no decoder layers found to shard")
    return list(layers)
