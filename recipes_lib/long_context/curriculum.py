"""Sequence-length curriculum: start short, grow to the target length, at a fixed token budget.

Every step trains the same number of tokens (``tokens_per_step``), as ``tokens_per_step // L``
rows of ``L`` tokens cut from one token stream, so a short step costs less attention work
(``O(L)`` per token) for the same number of tokens. The lengths double in equal stages over the
first ``grow_fraction`` of the steps, then stay at the target. Both runs are judged by the loss on
held-out rows of the *target* length, against tokens and against training wall time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..core import train
from ..core.errors import RecipeError
from ..core.models import check_seq_len
from ..measure import timing


def length_schedule(target: int, steps: int, start: int | None = None,
                    grow_fraction: float = 0.5) -> list[int]:
    """Sequence length for each step: ``start, 2*start, ...`` in equal stages, then ``target``.

    ``start=None`` (or ``start == target``) is the fixed-length baseline.
    """
    start = start or target
    if target % start or (target // start) & (target // start - 1):
        raise RecipeError(f"start={start} must be target={target} divided by a power of two")
    if not 0.0 <= grow_fraction < 1.0:
        raise RecipeError(f"grow_fraction={grow_fraction} must be in [0, 1)")
    stages = []
    length = start
    while length < target:
        stages.append(length)
        length *= 2
    per_stage = int(steps * grow_fraction) // max(len(stages), 1)
    if stages and per_stage == 0:
        raise RecipeError(f"{steps} steps x grow_fraction={grow_fraction} leave no step for each of the "
                          f"{len(stages)} shorter lengths {stages}: raise steps or grow_fraction, "
                          "or start longer")
    schedule = [length for length in stages for _ in range(per_stage)]
    return schedule + [target] * (steps - len(schedule))


def rows_from_stream(stream: torch.Tensor, offset: int, seq_len: int, rows: int) -> tuple[dict, int]:
    """``rows`` consecutive rows of ``seq_len`` tokens from a 1-D token stream (wrapping around)."""
    need = rows * seq_len
    if need > stream.numel():
        raise RecipeError(f"a step needs {need} tokens but the stream holds {stream.numel()}")
    if offset + need > stream.numel():
        offset = 0
    ids = stream[offset:offset + need].view(rows, seq_len)
    return {"input_ids": ids, "labels": ids}, offset + need


@dataclass
class History:
    """A run's trace: per step the length, cumulative tokens and training seconds; eval points."""

    lengths: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_tokens: list[int] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)

    def step_seconds_by_length(self) -> dict[int, float]:
        """Median training seconds of one step at each sequence length the run used."""
        steps: dict[int, list[float]] = {}
        for length, before, after in zip(self.lengths, [0.0, *self.seconds], self.seconds):
            steps.setdefault(length, []).append(after - before)
        return {length: statistics.median(times) for length, times in steps.items()}

    def time_to_reach(self, loss: float) -> float | None:
        """Training seconds at the first evaluation whose loss is at or below ``loss`` (None if never)."""
        for seconds, value in zip(self.eval_seconds, self.eval_loss):
            if value <= loss:
                return seconds
        return None


def run(model, optimizer, schedule: Sequence[int], stream: torch.Tensor, tokens_per_step: int,
        evaluate: Callable[[], float], eval_every: int, scheduler=None, autocast_dtype=None,
        max_grad_norm: float | None = 1.0, progress: bool | None = None, desc: str = "train") -> History:
    """Train one step per entry of ``schedule`` (its sequence length), evaluating every ``eval_every`` steps.

    Evaluation time is not counted in ``seconds``: the comparison is training time.
    """
    if any(tokens_per_step % length for length in schedule):
        raise RecipeError(f"tokens_per_step={tokens_per_step} must be a multiple of every length in the "
                          "schedule")
    check_seq_len(model, max(schedule))
    history, offset, seen, elapsed = History(), 0, 0, 0.0

    def batches():  # one step's rows, cut from the stream at that step's length
        nonlocal offset
        for length in schedule:
            batch, offset = rows_from_stream(stream, offset, length, tokens_per_step // length)
            yield batch

    stream_of_batches = batches()
    bar = tqdm(total=len(schedule), desc=desc, disable=not train.show_progress(progress), leave=False)
    for start in range(0, len(schedule), eval_every):
        steps = min(eval_every, len(schedule) - start)
        stats = train.train(model, optimizer, stream_of_batches, steps=steps, autocast_dtype=autocast_dtype,
                            clock=timing.stepper(next(model.parameters()).device),
                            max_grad_norm=max_grad_norm, scheduler=scheduler, progress=False)
        for length, seconds, loss in zip(schedule[start:start + steps], stats.step_seconds, stats.losses):
            seen += tokens_per_step // length * length
            elapsed += seconds
            history.lengths.append(length)
            history.tokens.append(seen)
            history.seconds.append(elapsed)
            history.train_loss.append(loss)
        history.eval_tokens.append(seen)
        history.eval_seconds.append(elapsed)  # evaluation time is not training time
        history.eval_loss.append(evaluate())
        bar.update(steps)
        bar.set_postfix(L=schedule[start + steps - 1], loss=f"{history.train_loss[-1]:.3f}")
    bar.close()
    return history


@torch.no_grad()
def eval_loss(model, rows: torch.Tensor, autocast_dtype=None) -> float:
    """Mean next-token loss over held-out ``[n, seq_len]`` rows (the target length)."""
    model.eval()
    total = count = 0.0
    for row in rows.split(4):
        batch = {"input_ids": row, "labels": row}
        with train.autocast(row.device, autocast_dtype):
            total += train.loss_sum(model, batch).item()
        count += row.shape[0] * (row.shape[1] - 1)
    return total / count
