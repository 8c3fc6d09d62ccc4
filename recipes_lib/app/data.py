"""A run's data: a dataset loaded with ``datasets``, tokenised once, split, and streamed as micro-batches.

- ``load_documents``: a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a folder saved by
  ``datasets`` (or of data files) or a hub id, as ``prompt_response`` columns, ``chat`` messages (the
  tokenizer's chat template) or plain ``text``; the loss covers the responses (assistant turns) only
  unless ``train_on_prompt``. Tokenised in batches by the Rust tokenizer, kept in ``cache_dir`` as
  ``datasets`` cache files when one is given (a changed file, tokenizer or setting gets a new file).
- ``micro_batches``: an endless, deterministic stream, packed block-diagonally (``position_ids``
  restart at each document, as in notebook 01) or padded to the longest document; it resumes exactly
  at any micro-batch, and workers and pinned memory (notebook 02's loader) feed it when asked.
``encoding`` turns rows into scored tokens; ``batching`` plans and builds the micro-batches.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import datasets
import pydantic
import torch
from pydantic import ConfigDict, Field, field_validator
from torch.utils.data import DataLoader

from ..core.batches import Document
from ..core.errors import RecipeError
from .batching import MicroBatches
from .encoding import encode_rows, tokenizer_fingerprint

FORMATS = ("prompt_response", "chat", "text")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ACCEPTED = ("a .jsonl, .json, .parquet or .csv file, a folder saved by datasets (save_to_disk) "
            "or of such files, or a hub dataset id such as 'org/name'")
_CACHE_VERSION = "1"  # bump when the tokenisation below changes, so old cache files are not served


class DataConfig(pydantic.BaseModel):
    """Where the data comes from, how it is tokenised and scored, and how it is batched."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field("data/instruct.jsonl", description=f"the data: {ACCEPTED}")
    split: str = Field("train", description="split to read (a single file is the split 'train'; "
                       "slices such as 'train[:1000]' work)")
    format: Literal["prompt_response", "chat", "text"] = Field(
        "prompt_response", description="prompt_response: two text columns; chat: a list of "
        "{role, content} messages, rendered by the tokenizer's chat template; text: plain text, all scored")
    prompt_column: str = Field("prompt", description="column of prompts (format: prompt_response)")
    response_column: str = Field("response", description="column of responses (format: prompt_response)")
    messages_column: str = Field("messages", description="column of message lists (format: chat)")
    text_column: str = Field("text", description="column of documents (format: text)")
    train_on_prompt: bool = Field(False, description="also score prompt tokens (default: the loss covers "
                                  "responses, or assistant turns, only)")
    packing: bool = Field(True, description="pack documents into full rows with position_ids restarting "
                          "per document (block-diagonal attention); false: pad each batch to its longest")
    seq_len: int = Field(512, description="tokens per row; longer documents are truncated (>= 16)")
    validation_fraction: float = Field(0.05, description="share of documents held out for validation, "
                                       "chosen by seed (0 <= f < 0.5; 0: no validation)")
    max_examples: int | None = Field(None, description="use only the first N rows (None: all)")
    seed: int = Field(0, description="seed of the validation split")
    cache_dir: str | None = Field(None, description="folder for the tokenised data (datasets cache "
                                  "files, reused by later runs); None: tokenise in memory every run")
    num_workers: int = Field(0, description="worker processes that build batches ahead (0: in the "
                             "training process)")
    pin_memory: bool = Field(True, description="build batches in pinned memory (CUDA only)")

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value):
        if value not in FORMATS:
            raise ValueError(f"format={value!r} is not one of {', '.join(FORMATS)}: use prompt_response for "
                             "prompt/response columns, chat for a column of messages, text for plain text")
        return value

    @field_validator("seq_len")
    @classmethod
    def _seq_len(cls, value: int) -> int:
        if value < 16:
            raise ValueError(f"seq_len={value} is too short: use at least 16 tokens per row (e.g. 512)")
        return value

    @field_validator("validation_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value < 0.5:
            raise ValueError(f"validation_fraction={value} is outside [0, 0.5): use 0 for no validation "
                             "or a share such as 0.05")
        return value

    @field_validator("max_examples")
    @classmethod
    def _max_examples(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_examples={value}: use a positive number of rows, or null for all of them")
        return value

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"num_workers={value}: use 0 (build batches in the training process) or more")
        return value

    @field_validator("source", "prompt_column", "response_column", "messages_column", "text_column")
    @classmethod
    def _not_blank(cls, value: str, info) -> str:
        if not value.strip():
            raise ValueError(f"{info.field_name} is empty: give a {info.field_name.replace('_', ' ')}")
        return value


def load_documents(cfg: DataConfig, tokenizer) -> tuple[list[Document], list[Document]]:
    """(train, validation) tokenised documents; labels = IGNORE_INDEX on prompt tokens unless
    ``train_on_prompt`` (chat: on everything but the assistant turns). Documents longer than ``seq_len``
    are truncated, with one warning that counts them."""
    if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(f"format: chat needs a tokenizer with a chat template, and "
                          f"{getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'} has none: set "
                          "tokenizer.chat_template (a Jinja template; transformers reads it from the "
                          "tokenizer's folder) or use format: prompt_response with prompt_column and "
                          "response_column")
    raw = load_table(cfg)
    column, key = {"prompt_response": (cfg.response_column, "response_column"),
                   "chat": (cfg.messages_column, "messages_column"), "text": (cfg.text_column, "text_column")
                   }[cfg.format]
    needed = [(cfg.prompt_column, "prompt_column")] if cfg.format == "prompt_response" else []
    if len(raw) == 0:
        raise RecipeError(f"{cfg.source} (split {cfg.split}) has no rows: give a dataset with examples")
    for name, name_key in [*needed, (column, key)]:
        if name not in raw.column_names:
            raise RecipeError(f"column '{name}' is not in {cfg.source} (format: {cfg.format}); its columns "
                              f"are {raw.column_names}: set {name_key} to one of them")
    if cfg.max_examples is not None:
        raw = raw.select(range(min(cfg.max_examples, len(raw))))
    tokenized = _tokenize(raw, cfg, tokenizer)
    if len(tokenized) == 0:
        raise RecipeError(f"{cfg.source}: all {len(raw)} rows are empty after filtering (no {column}, or no "
                          "assistant turn in chat format): check the data and the column settings")
    table = tokenized[:]
    docs = [Document(ids, labels) for ids, labels in zip(table["input_ids"], table["labels"])]
    n_long = sum(len(d.input_ids) > cfg.seq_len for d in docs)
    if n_long:
        warnings.warn(f"{n_long} of {len(docs)} documents are longer than seq_len={cfg.seq_len} tokens and "
                      "were truncated: raise seq_len to keep them whole", stacklevel=2)
        docs = [Document(d.input_ids[:cfg.seq_len], d.labels[:cfg.seq_len]) for d in docs]
    return split_documents(docs, cfg.validation_fraction, cfg.seed)


def split_documents(docs: list[Document], fraction: float, seed: int
                    ) -> tuple[list[Document], list[Document]]:
    """(train, validation): ``fraction`` of the documents (at least one when > 0), chosen by ``seed``."""
    n_val = max(1, int(fraction * len(docs))) if fraction > 0 else 0
    if n_val >= len(docs):
        raise RecipeError(f"{len(docs)} document(s) cannot be split for validation_fraction={fraction}: "
                          "give more data or set validation_fraction: 0")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def from_cwd(path: Path) -> str:
    """Where a relative path that was not found was looked for (nothing for an absolute one)."""
    return "" if path.is_absolute() else f" (relative paths start from the current folder, {Path.cwd()})"


def load_table(cfg: DataConfig) -> datasets.Dataset:
    """The raw rows of ``cfg.source`` (split ``cfg.split``), or a ``RecipeError`` that says what to fix."""
    path = Path(cfg.source).expanduser()
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise RecipeError(f"{cfg.source}: '{path.suffix}' files are not read; give {ACCEPTED}")
            if path.stat().st_size == 0:
                return datasets.Dataset.from_dict({})
            return _load_files(builder, {"train": str(path)}, cfg)
        if path.is_dir():
            if any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
                saved = datasets.load_from_disk(str(path))
                return saved[cfg.split] if isinstance(saved, datasets.DatasetDict) else saved
            return _load_files(None, str(path), cfg)
        looks_local = cfg.source.startswith((".", "/", "~")) or cfg.source.count("/") > 1
        if looks_local or path.suffix.lower() in FILE_BUILDERS:
            raise RecipeError(f"data source {cfg.source} does not exist: give {ACCEPTED}{from_cwd(path)}")
        return datasets.load_dataset(cfg.source, split=cfg.split, cache_dir=cfg.cache_dir)
    except RecipeError:
        raise
    except KeyError as err:  # a split missing from a saved DatasetDict
        raise RecipeError(f"{cfg.source} has no split {err}: set split to one it has") from err
    except Exception as err:  # datasets' and the hub's many error types: one message that says what to fix
        if "Unknown split" in str(err):
            raise RecipeError(f"{cfg.source} has no split '{cfg.split}' ({err}): set split to one it has "
                              "(a single file is the split 'train')") from err
        where = "could not be loaded" if path.exists() else "is no local path, and the hub could not load it"
        raise RecipeError(f"data source {cfg.source} {where} ({type(err).__name__}: {err}); give {ACCEPTED} "
                          "(a local path must exist; a single file is the split 'train')") from err


def _load_files(builder: str | None, files, cfg: DataConfig) -> datasets.Dataset:
    if cfg.cache_dir:
        return datasets.load_dataset(builder or files, data_files=files if builder else None,
                                     split=cfg.split, cache_dir=cfg.cache_dir)
    with tempfile.TemporaryDirectory() as scratch:  # no cache asked for: read into memory, keep nothing
        return datasets.load_dataset(builder or files, data_files=files if builder else None,
                                     split=cfg.split, cache_dir=scratch, keep_in_memory=True)


def _tokenize(raw: datasets.Dataset, cfg: DataConfig, tokenizer) -> datasets.Dataset:
    """``raw`` through ``encode_rows``; with ``cache_dir``, saved there and reused while nothing changed."""
    settings = cfg.model_dump(include={"source", "split", "format", "prompt_column", "response_column",
                                       "messages_column", "text_column", "train_on_prompt", "max_examples"})
    digest = hashlib.sha256(json.dumps([_CACHE_VERSION, raw._fingerprint, settings, _source_stamp(cfg.source),
                                        tokenizer_fingerprint(tokenizer)], sort_keys=True).encode())
    key = digest.hexdigest()[:16]
    columns = {"prompt": cfg.prompt_column, "response": cfg.response_column, "messages": cfg.messages_column,
               "text": cfg.text_column}

    def encode(batch: dict) -> dict:
        return encode_rows(batch, tokenizer, cfg.format, columns, cfg.train_on_prompt)

    options = dict(batched=True, batch_size=1000, remove_columns=raw.column_names, new_fingerprint=key,
                   desc="tokenize")
    if not cfg.cache_dir:
        return raw.map(encode, keep_in_memory=True, load_from_cache_file=False, **options)
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    return raw.map(encode, load_from_cache_file=True,
                   cache_file_name=str(Path(cfg.cache_dir) / f"tokenized-{key}.arrow"), **options)


def _source_stamp(source: str) -> list:
    """Sizes and modification times of a local source's files (a rewritten file gets a new cache key)."""
    path = Path(source).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] * path.is_file()
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def micro_batches(docs: list[Document], cfg: DataConfig, micro_batch: int, pad_id: int, epoch_seed: int,
                  skip: int = 0) -> Iterator[dict]:
    """An endless, deterministic stream of micro-batches (dicts of CPU tensors: input_ids, labels, and
    position_ids when packed / attention_mask when padded): epoch e shuffles with seed (epoch_seed, e);
    ``skip`` micro-batches from the start are skipped without being built (resume continues exactly:
    the stream from skip=k equals the full stream with its first k dropped)."""
    stream = MicroBatches(docs, cfg.seq_len, cfg.packing, micro_batch, pad_id, epoch_seed, skip)
    stream.check()
    pin = cfg.pin_memory and torch.cuda.is_available()
    if cfg.num_workers == 0 and not pin:
        return iter(stream)
    return iter(DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin,
                           prefetch_factor=4 if cfg.num_workers else None))
