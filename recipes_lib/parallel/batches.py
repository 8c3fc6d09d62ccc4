"""The global batches of a data-parallel run, and each rank's micro-batches cut from them.

Every step's global batch (padded rows of random tokens, documents of random length, so ranks hold
different numbers of real tokens) is the same whatever the number of processes; rank r trains on
its contiguous slice of rows, ``micro_batch`` rows at a time.
"""

from __future__ import annotations

from ..core import batches
from ..core.errors import RecipeError


def global_batches(steps: int, global_batch: int, seq_len: int, vocab_size: int, seed: int = 0,
                   full_rows: bool = False) -> list[dict]:
    """The padded global batch of every step: identical on every rank and for every world size.

    Args:
        full_rows: every row a whole ``seq_len`` document (speed runs); else lengths from
            ``seq_len // 4`` (at least 2) to ``seq_len``.
    """
    min_len = seq_len if full_rows else max(2, seq_len // 4)

    def step_docs(step: int):  # seeded per step, so step s's batch does not depend on the number of steps
        return batches.random_documents(global_batch, vocab_size, min_len=min_len, max_len=seq_len,
                                        seed=seed * 1_000_003 + step)
    return [batches.pad_batch(step_docs(s), pad_id=0, pad_to=seq_len) for s in range(steps)]


def check_divisible(rows: int, world_size: int, micro_batch: int) -> None:
    """RecipeError unless ``rows`` split evenly into ``world_size`` ranks of whole micro-batches."""
    if rows % (world_size * micro_batch):
        raise RecipeError(f"--global-batch {rows} must be a multiple of processes x --micro-batch "
                          f"({world_size} x {micro_batch})")


def rank_micro_batches(batch: dict, rank: int, world_size: int, micro_batch: int) -> list[dict]:
    """This rank's contiguous slice of the global batch, cut into micro-batches."""
    rows = batch["input_ids"].shape[0]
    check_divisible(rows, world_size, micro_batch)
    per_rank = rows // world_size
    start = rank * per_rank
    return [{k: v[i:i + micro_batch] for k, v in batch.items()}
            for i in range(start, start + per_rank, micro_batch)]
