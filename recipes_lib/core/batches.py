"""Tokenisation, packing and padding of the synthetic tasks, and micro-batch streams for training.

Two ways to batch variable-length documents:
- ``pad_batches``: each batch padded to its longest document (what a default data collator does);
  padding tokens cost compute and count for nothing.
- ``pack_rows``: documents concatenated into rows of exactly ``seq_len`` tokens, ``position_ids``
  restarting at every document, so attention stays inside a document (transformers builds the
  block-diagonal mask from the positions) and no compute is spent on padding.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .losses import IGNORE_INDEX
from .tasks import Example


@dataclass
class Document:
    """A tokenised training document and the labels to score (``IGNORE_INDEX`` where not)."""

    input_ids: list[int]
    labels: list[int]


def encode(tokenizer, examples: Sequence[Example], train_on_prompt: bool = False) -> list[Document]:
    """Tokenise examples as ``<bos> prompt answer <eos>``; the loss covers the answer (and eos).

    Args:
        train_on_prompt: also score the prompt tokens (pre-training) instead of the answer only.
    """
    docs = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id, *prompt, *answer, tokenizer.eos_token_id]
        n_masked = 1 if train_on_prompt else 1 + len(prompt)
        docs.append(Document(ids, [IGNORE_INDEX] * n_masked + ids[n_masked:]))
    return docs


def token_stream(tokenizer, examples: Sequence[Example]) -> torch.Tensor:
    """One long 1-D stream of ``<bos> example <eos>`` token ids, to cut into rows of any length."""
    ids: list[int] = []
    for tokens in tokenizer([ex.text for ex in examples], add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def random_documents(n: int, vocab_size: int, min_len: int, max_len: int, seed: int = 0) -> list[Document]:
    """Documents of uniformly random tokens and lengths: for speed and memory runs on random weights."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    docs = []
    for length in lengths:
        ids = torch.randint(0, vocab_size, (length,), generator=gen).tolist()
        docs.append(Document(ids, list(ids)))
    return docs


def pack_rows(docs: Sequence[Document], seq_len: int) -> list[dict]:
    """Concatenate documents into rows of ``seq_len`` tokens (a document longer than that is cut)."""
    rows, ids, labels, positions = [], [], [], []
    for doc in docs:
        d_ids, d_labels = doc.input_ids[:seq_len], doc.labels[:seq_len]
        if len(ids) + len(d_ids) > seq_len:
            rows.append(_row(ids, labels, positions, seq_len))
            ids, labels, positions = [], [], []
        ids += d_ids
        labels += [IGNORE_INDEX] + d_labels[1:]  # never predict across a document boundary
        positions += range(len(d_ids))
    if ids:
        rows.append(_row(ids, labels, positions, seq_len))
    return rows


def _row(ids: list[int], labels: list[int], positions: list[int], seq_len: int) -> dict:
    pad = seq_len - len(ids)
    # The tail is one more "document" of pad tokens: masked from the loss, attending only to itself.
    return {
        "input_ids": torch.tensor(ids + [0] * pad),
        "labels": torch.tensor(labels + [IGNORE_INDEX] * pad),
        "position_ids": torch.tensor(positions + list(range(pad))),
        "num_tokens": torch.tensor(len(ids)),  # real tokens, for throughput
    }


def pad_batch(docs: Sequence[Document], pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad documents to the longest one (or ``pad_to``), with an attention mask."""
    length = pad_to or max(len(d.input_ids) for d in docs)
    ids = torch.full((len(docs), length), pad_id)
    labels = torch.full((len(docs), length), IGNORE_INDEX)
    mask = torch.zeros((len(docs), length), dtype=torch.long)
    for i, doc in enumerate(docs):
        n = min(len(doc.input_ids), length)
        ids[i, :n] = torch.tensor(doc.input_ids[:n])
        labels[i, :n] = torch.tensor(doc.labels[:n])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def stack_rows(rows: Sequence[dict]) -> dict:
    """Stack packed rows into one micro-batch."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def packed_batches(docs: Sequence[Document], seq_len: int, batch_size: int, seed: int = 0) -> Iterator[dict]:
    """An endless stream of packed micro-batches ``[batch_size, seq_len]``, reshuffled every epoch."""
    rows = pack_rows(docs, seq_len)
    if len(rows) < batch_size:
        raise ValueError(f"{len(docs)} documents pack into {len(rows)} rows of {seq_len} tokens, "
                         f"fewer than batch_size={batch_size}: use more documents or shorter rows")
    return _endless(rows, batch_size, seed, stack_rows)


def padded_batches(docs: Sequence[Document], batch_size: int, pad_id: int, seed: int = 0,
                   pad_to: int | None = None) -> Iterator[dict]:
    """An endless stream of micro-batches padded to their longest document (or to ``pad_to``)."""
    return _endless(list(docs), batch_size, seed, lambda group: pad_batch(group, pad_id, pad_to))


def _endless(items: list, batch_size: int, seed: int, collate) -> Iterator[dict]:
    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([items[i] for i in order[start:start + batch_size]])
