"""Input pipelines that starve the accelerator or keep it fed.

- ``naive_loader``: a ``Dataset`` that tokenises raw text in ``__getitem__`` (every row, every epoch)
  and a ``DataLoader`` with no workers, so the training loop waits while the host tokenises.
- ``efficient_loader`` over ``packed_dataset``: tokenised once with ``datasets`` (batched, by the
  Rust tokenizer), packed into rows of exactly ``seq_len`` tokens, saved as Arrow files that are
  memory-mapped on every later call; worker processes prefetch batches into pinned memory while the
  accelerator computes, and the copy to the device does not block the host.

Both yield ``{"input_ids": [B, T] long, "labels": [B, T] long}`` with ``labels == input_ids`` (the
model shifts them), so one training step consumes either. ``measure.pipeline.time_pipeline``
measures how much of the wall time the accelerator sat idle waiting for input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from . import tasks
from .errors import RecipeError
from .models import CACHE_DIR


def raw_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` raw text documents from the synthetic tasks (no download needed)."""
    if n_docs < 1:
        raise RecipeError(f"n_docs={n_docs}: a corpus needs at least one document")
    return [ex.text for ex in tasks.make_examples(n_docs, seed)]


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise RecipeError(f"seq_len={seq_len}: a row needs at least 2 tokens (an input and the next token "
                          "to predict)")


def _check_batching(batch_size: int, num_workers: int = 0) -> None:
    if batch_size < 1:
        raise RecipeError(f"batch_size={batch_size}: use at least 1 row per batch")
    if num_workers < 0:
        raise RecipeError(f"num_workers={num_workers}: use 0 (load in the training process) or more workers")


def _too_small(what: str, n_rows: int, batch_size: int) -> RecipeError:
    return RecipeError(f"the corpus gives {n_rows} {what}, fewer than batch_size={batch_size}: "
                       "use more documents, shorter rows or a smaller batch")


def document_ids(tokens: list[int], tokenizer) -> list[int]:
    """A document's tokens framed as ``<bos> tokens <eos>`` (a marker the tokenizer lacks is left out)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [*([bos] if bos is not None else []), *tokens, *([eos] if eos is not None else [])]


class OnTheFlyRows(Dataset):
    """Row ``i``: documents ``i, i+1, ...`` (wrapping round), tokenised on each access, cut to ``seq_len``."""

    def __init__(self, texts: Sequence[str], tokenizer, seq_len: int):
        self.texts, self.tokenizer, self.seq_len = list(texts), tokenizer, seq_len

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        ids: list[int] = []
        doc = index
        while len(ids) < self.seq_len:
            tokens = self.tokenizer(self.texts[doc % len(self.texts)], add_special_tokens=False)["input_ids"]
            ids += document_ids(tokens, self.tokenizer)
            doc += 1
        row = torch.tensor(ids[:self.seq_len], dtype=torch.long)
        return {"input_ids": row, "labels": row.clone()}


def naive_loader(texts: Sequence[str], tokenizer, seq_len: int, batch_size: int, seed: int = 0) -> DataLoader:
    """The pipeline that starves the accelerator: tokenise on the fly, no workers, pageable memory."""
    _check_seq_len(seq_len)
    _check_batching(batch_size)
    if len(texts) < batch_size:
        raise _too_small("rows (one per document)", len(texts), batch_size)
    return DataLoader(OnTheFlyRows(texts, tokenizer, seq_len), batch_size=batch_size, shuffle=True,
                      drop_last=True, num_workers=0, pin_memory=False,
                      generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _datasets_progress():
    """Show ``datasets``' progress bars unless ``RECIPES_PROGRESS=0`` (set for saved notebooks)."""
    quiet = os.environ.get("RECIPES_PROGRESS", "1") == "0" and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _tokenize(texts: Sequence[str], tokenizer) -> datasets.Dataset:
    """One row per document, ``<bos> tokens <eos>``, tokenised a thousand documents per call."""

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [document_ids(doc, tokenizer) for doc in ids]}

    corpus = datasets.Dataset.from_dict({"text": list(texts)})
    return corpus.map(encode, batched=True, batch_size=1000, remove_columns=["text"], desc="tokenize")


def _pack(tokenized: datasets.Dataset, seq_len: int) -> datasets.Dataset:
    """Rows of exactly ``seq_len`` tokens cut from the concatenated documents (the tail is dropped)."""
    stream = tokenized.data.column("input_ids").combine_chunks().flatten()  # Arrow, no Python lists
    n_rows = len(stream) // seq_len
    ids = pa.FixedSizeListArray.from_arrays(stream.slice(0, n_rows * seq_len).cast(pa.int32()), seq_len)
    return datasets.Dataset(pa.table({"input_ids": ids, "labels": ids}))


def _tokenizer_state(tokenizer) -> str:
    """What decides the token ids: the fast tokenizer's definition (less its padding and truncation
    settings, which each call changes), or the vocabulary of a tokenizer without a Rust backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(tokenizer.get_vocab(), sort_keys=True)
    state = json.loads(backend.to_str())
    state.pop("padding", None)
    state.pop("truncation", None)
    return json.dumps(state, sort_keys=True)


def _cache_key(texts: Sequence[str], tokenizer, seq_len: int) -> str:
    """A digest of everything the packed rows depend on: texts, tokenizer, special ids, row length."""
    digest = hashlib.sha256(f"{seq_len}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|".encode())
    digest.update(_tokenizer_state(tokenizer).encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    return f"packed-{seq_len}-{digest.hexdigest()[:16]}"


def packed_dataset(texts: Sequence[str], tokenizer, seq_len: int, cache_dir: str | Path | None = None
                   ) -> datasets.Dataset:
    """Tokenised and packed once, saved under ``cache_dir``; later calls memory-map the saved Arrow files.

    Args:
        cache_dir: folder for the packed data sets (default ``$RECIPES_CACHE/dataload``); each corpus,
            tokenizer and ``seq_len`` gets its own sub-folder, so a changed input is never served stale.
    """
    _check_seq_len(seq_len)
    folder = Path(cache_dir or CACHE_DIR / "dataload") / _cache_key(texts, tokenizer, seq_len)
    if not (folder / "dataset_info.json").exists():
        staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")  # a crash leaves no half-written cache
        with _datasets_progress():
            _pack(_tokenize(texts, tokenizer), seq_len).save_to_disk(str(staging))
        staging.replace(folder)
    return datasets.load_from_disk(str(folder))


def efficient_loader(dataset: datasets.Dataset, batch_size: int, device: torch.device, num_workers: int = 2,
                     prefetch_factor: int = 4, seed: int = 0) -> DataLoader:
    """The pipeline that keeps the accelerator fed: packed rows, worker processes, pinned memory, prefetch.

    Args:
        num_workers: processes that fetch batches while the training process computes (0: fetch inline).
        prefetch_factor: batches each worker keeps ready ahead of the training loop.
    """
    _check_batching(batch_size, num_workers)
    if len(dataset) < batch_size:
        raise _too_small("packed rows", len(dataset), batch_size)
    workers = num_workers > 0
    return DataLoader(dataset.with_format("torch"), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      prefetch_factor=prefetch_factor if workers else None, persistent_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


def to_device(batch: dict, device: torch.device) -> dict:
    """Copy a batch to ``device`` without blocking the host (asynchronous from pinned memory)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
