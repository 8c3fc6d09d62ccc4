"""The long-context ladder: how long a sequence one training step can take, rung by rung.

A rung is a set of switches on one model: the attention implementation, activation checkpointing
(every k-th layer, optionally with the saved inputs offloaded to host memory), the chunked
cross-entropy that never materialises the ``[tokens, vocab]`` logits, the tiled MLP
(``long_context.tiling``) and a RoPE extension past the position limit (``long_context.rope``).
``longest_trainable`` finds each rung's longest sequence at batch 1 by doubling the length until a
step runs out of memory, then bisecting: running out of memory is a result, not a crash. ``climb``
does it for every rung, each up to its own position limit. The step itself is the caller's
(``measure.ladder_bench.train_step``): this module measures nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..core import checkpointing, models
from ..core.errors import RecipeError
from . import rope, tiling


@dataclass(frozen=True)
class Rung:
    """One configuration of the ladder."""

    name: str
    attention: str = "sdpa"               # "eager": the [seq, seq] scores; "sdpa": PyTorch picks flash/cuDNN
    checkpoint_every: int | None = None   # None: keep all activations; k: recompute every k-th layer
    chunked_loss: bool = False            # fused chunked LM head + cross-entropy instead of full logits
    offload_activations: bool = False     # checkpointed layers' saved inputs in pinned host memory
    documented_checkpointing: bool = False  # transformers' own ``gradient_checkpointing_enable()``, as
                                            # its docs show it (every layer, its default settings)
    tile_mlp_tokens: int | None = None    # every decoder MLP computed in chunks of this many tokens
    rope_positions: int | None = None     # RoPE extended to this many positions (past the model's limit)


def past_the_limit(rung: Rung, tile_mlp_tokens: int, rope_positions: int) -> list[Rung]:
    """The two rungs ALST adds on top of ``rung``: ``+ tiled MLP`` (chunks of ``tile_mlp_tokens``), then
    ``+ RoPE extension`` (the same, with RoPE extended to ``rope_positions``)."""
    tiled = dataclasses.replace(rung, name="+ tiled MLP", tile_mlp_tokens=tile_mlp_tokens)
    return [tiled, dataclasses.replace(tiled, name="+ RoPE extension", rope_positions=rope_positions)]


def apply(model, rung: Rung) -> None:
    """Switch ``model`` to ``rung``'s attention, checkpointing, MLP tiling and RoPE, in place.

    Whatever an earlier rung set and this one does not is undone: the MLPs are untiled, and RoPE goes
    back to the model's own settings and position limit (a rung with ``rope_positions`` over that
    limit extends it, with ``rope.default_kind``: llama3 for a llama3-scaled model, else YaRN), so
    rungs applied one after another on one model leave nothing behind.
    """
    if rung.rope_positions is not None:
        rope.positive_tokens(rung.rope_positions, "rope_positions")
    if rung.tile_mlp_tokens is not None:
        tiling.tile_mlp(model, rung.tile_mlp_tokens)
    else:
        tiling.untile_mlp(model)
    rope.restore_context(model)
    if rung.rope_positions and rung.rope_positions > model.config.max_position_embeddings:
        rope.extend_context(model, rung.rope_positions, rope.default_kind(model.config))
    model.set_attn_implementation(models.attention_implementation(rung.attention))
    if rung.documented_checkpointing:
        if rung.checkpoint_every not in (None, 1) or rung.offload_activations:
            raise RecipeError("documented_checkpointing is transformers' every-layer checkpointing: "
                              "leave checkpoint_every and offload_activations unset")
        model.gradient_checkpointing_enable()
    elif rung.checkpoint_every:
        checkpointing.enable_checkpointing(model, every=rung.checkpoint_every,
                                           offload=rung.offload_activations)
    elif rung.offload_activations:
        raise RecipeError("offload_activations moves the checkpointed layers' inputs: "
                          "set checkpoint_every too")
    else:
        checkpointing.disable_checkpointing(model)
    model.train()


def longest_trainable(step: Callable[[int], dict], start: int, limit: int, refine: int = 2,
                      multiple: int = 1024) -> tuple[int | None, list[dict]]:
    """The longest length ``step`` trains without running out of memory, and every probe's row.

    Doubles from ``start`` up to ``limit`` (the model's position limit, probed last) until a step
    runs out of memory, then bisects ``refine`` times between the last fit and the first failure,
    on multiples of ``multiple``. Returns ``(None, rows)`` if even ``start`` does not fit.
    """
    if start < 1 or start > limit:
        raise RecipeError(f"start={start} must be in [1, limit={limit}]")
    lengths, length = [], start
    while length < limit:
        lengths.append(length)
        length *= 2
    lengths.append(limit)
    rows, best, failed = [], None, None
    for length in lengths:
        row = step(length)
        rows.append(row)
        if row["oom"]:
            failed = length
            break
        best = length
    if best is None or failed is None:
        return best, rows
    low, high = best, failed
    for _ in range(refine):
        middle = (low + high) // 2 // multiple * multiple
        if middle <= low:
            break
        row = step(middle)
        rows.append(row)
        low, high = (low, middle) if row["oom"] else (middle, high)
    return low, rows


def search_limit(rung: Rung, limit: int) -> int:
    """The longest length the search probes for ``rung``: ``limit`` (the model's position limit, or lower),
    or the rung's ``rope_positions`` where it extends RoPE past that."""
    return max(limit, rung.rope_positions or 0)


def climb(model, rungs: Sequence[Rung], step: Callable[[Rung, int], dict], start: int,
          limit: int | None = None, refine: int = 2, multiple: int | None = None,
          rerun_under_s: float | None = None) -> tuple[list[dict], list[dict]]:
    """Each rung's longest trainable length with ``step``'s row there, and every probe of the searches.

    Args:
        step: ``(rung, seq_len) -> row`` with ``oom``, and ``peak_bytes``, ``seconds``, ``tokens_per_s``
            when it fits (``host_bytes``, ``mfu`` and a profiled ``split`` too where it has them, else None
            in the summary); called on ``model`` after ``apply(model, rung)``.
        limit: where the search stops (default: the model's own position limit); a rung that extends
            RoPE searches up to its ``rope_positions`` instead (``search_limit``).
        multiple: the bisection's grid (default ``start``).
        rerun_under_s: the row at each rung's longest length comes from one more step there, warm (the
            search has just run one), unless the search's own step there took at least this many seconds:
            then that probe's row stands, its first-call costs a small share of it, and a step of minutes
            is not run twice. None: always one more step.
    """
    limit = limit or rope.original_limit(model)
    summary, probes = [], []
    for rung in rungs:
        apply(model, rung)
        top = search_limit(rung, limit)
        probed: dict[int, dict] = {}

        def probe(n: int, rung: Rung = rung, probed: dict = probed) -> dict:
            probed[n] = step(rung, n)
            return probed[n]

        best, rows = longest_trainable(probe, start, top, refine, multiple or start)
        probes += rows
        at_best = _row_at(best, probed.get(best), functools.partial(step, rung), rerun_under_s)
        measured = ("peak_bytes", "host_bytes", "seconds", "tokens_per_s", "mfu", "split")
        fits = {key: None if at_best["oom"] else at_best.get(key) for key in measured}
        summary.append({"name": rung.name, "longest": best, "limit": top, "at limit": best == top, **fits})
    return summary, probes


def _row_at(best: int | None, probed: dict | None, step: Callable[[int], dict],
            rerun_under_s: float | None) -> dict:
    """The row at a rung's longest length: the search's own (``probed``) where its step took at least
    ``rerun_under_s`` seconds, else one more step there."""
    if not best:
        return {"oom": True}
    slow = rerun_under_s is not None and probed is not None and (probed.get("seconds") or 0) >= rerun_under_s
    return probed if slow else step(best)
