"""Documents to an endless, resumable stream of packed or padded micro-batches.

``MicroBatches`` plans each epoch from document lengths alone (a shuffle seeded by
``(epoch_seed, epoch)``, then rows filled best-fit decreasing), so skipping to
micro-batch k costs no tensor building, and builds only the batches it yields. As a ``DataLoader``
``IterableDataset``, worker w of W builds batches w, w+W, ...; the loader returns them in that order,
so the stream is the same with any number of workers.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..core.batches import Document, pack_rows, pad_batch, stack_rows
from ..core.errors import RecipeError


class MicroBatches(IterableDataset):
    """Micro-batches of ``micro_batch`` rows of ``seq_len`` tokens (packed: ``input_ids``, ``labels``,
    ``position_ids``) or of documents padded to the longest (``input_ids``, ``labels``,
    ``attention_mask``); the first ``skip`` are not built. A partial last batch of an epoch is dropped."""

    def __init__(self, docs: Sequence[Document], seq_len: int, packing: bool, micro_batch: int, pad_id: int,
                 epoch_seed: int, skip: int = 0):
        if micro_batch < 1 or skip < 0:
            raise RecipeError(f"micro_batch={micro_batch}, skip={skip}: use micro_batch >= 1 and skip >= 0")
        self.docs, self.seq_len, self.packing = docs, seq_len, packing
        self.micro_batch, self.pad_id, self.epoch_seed, self.skip = micro_batch, pad_id, epoch_seed, skip

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.docs)))
        random.Random(f"{self.epoch_seed}:{epoch}").shuffle(order)  # a str seed: the same in every process
        return order

    def rows(self, epoch: int) -> list[list[int]]:
        """The documents of each packed row this epoch, by best-fit decreasing: longest first, each into
        the fullest row it still fits (a new row if none), then the rows shuffled. No document is
        split, and rows come out nearly full (next-fit in shuffled order leaves about a quarter of a
        row empty when documents run up to ``seq_len``)."""
        length = {i: min(len(self.docs[i].input_ids), self.seq_len) for i in self.order(epoch)}
        rows: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (tokens left, row index), sorted
        for i in sorted(length, key=lambda i: -length[i]):  # stable: ties keep the shuffled order
            k = bisect.bisect_left(free, (length[i], -1))
            if k < len(free):
                left, r = free.pop(k)
                rows[r].append(i)
            else:
                left, r = self.seq_len, len(rows)
                rows.append([i])
            bisect.insort(free, (left - length[i], r))
        random.Random(f"{self.epoch_seed}:{epoch}:rows").shuffle(rows)
        return rows

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """This epoch's micro-batches: per batch, its rows (packed) or its documents (padded) as indices."""
        units = self.rows(epoch) if self.packing else [[i] for i in self.order(epoch)]
        return [units[b * self.micro_batch:(b + 1) * self.micro_batch]
                for b in range(len(units) // self.micro_batch)]

    def check(self) -> None:
        """Raise a ``RecipeError`` if the data does not fill one micro-batch."""
        n = len(self.rows(0)) if self.packing else len(self.docs)
        if n < self.micro_batch:
            unit = f"packed rows of seq_len={self.seq_len}" if self.packing else "documents"
            raise RecipeError(f"{len(self.docs)} documents give {n} {unit}, fewer than one micro-batch of "
                              f"{self.micro_batch}: give more data or use a smaller micro-batch")

    def build(self, batch: list[list[int]]) -> dict:
        if not self.packing:
            docs = [self.docs[i] for (i,) in batch]
            return pad_batch([Document(d.input_ids[:self.seq_len], d.labels[:self.seq_len]) for d in docs],
                             self.pad_id)
        out = stack_rows([pack_rows([self.docs[i] for i in row], self.seq_len)[0] for row in batch])
        real = torch.arange(self.seq_len) < out.pop("num_tokens")[:, None]
        out["input_ids"] = out["input_ids"].masked_fill(~real, self.pad_id)  # the tail: pad tokens, unscored
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index, epoch, skip = 0, 0, self.skip  # index: position in the stream that follows the skip
        while True:
            plan = self.plan(epoch)
            if not plan:
                self.check()
                raise RecipeError(f"epoch {epoch} fills no micro-batch of {self.micro_batch}: give more data")
            if skip >= len(plan):
                skip -= len(plan)
            else:
                for batch in plan[skip:]:
                    if index % workers == worker:
                        yield self.build(batch)
                    index += 1
                skip = 0
            epoch += 1
