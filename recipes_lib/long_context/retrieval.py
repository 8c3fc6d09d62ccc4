"""Long enough to matter: does a model use a context longer than it was trained on?

The synthetic ``kv`` task (``core.tasks.kv_example``) asks for one of many ``key = value`` facts; the
**distance** is the number of facts between the asked one and the question. Filled to a length
(``facts_for``), it asks the model to look back across that length. ``finetune`` trains a model
briefly on such prompts at a new length (RoPE extended by the caller, ``rope.extend_context``), the
way a long-context recipe adapts a model after extending its positions, and ``accuracy_by_distance``
scores exact match at each distance, before and after.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..core import batches, models, tasks, train
from ..core.errors import RecipeError
from ..measure import quality
from . import rope


def facts_for(tokenizer, seq_len: int, fill: float = 0.9, seed: int = 0) -> int:
    """How many kv facts make a prompt of about ``fill x seq_len`` tokens (answer and question included)."""
    probe = tasks.kv_example(random.Random(seed), 200, 0)
    per_fact = len(tokenizer(probe.text, add_special_tokens=False)["input_ids"]) / 200
    n_facts = int(fill * seq_len / per_fact)
    if n_facts < 2:
        raise RecipeError(f"seq_len={seq_len}: a kv prompt needs at least 2 facts "
                          f"(~{per_fact:.0f} tokens each)")
    return n_facts


def kv_sets(n_facts: int, distances: Sequence[int], per_distance: int, seed: int = 5) -> dict[int, list]:
    """``per_distance`` kv examples of ``n_facts`` facts at each distance (the facts between the asked one
    and the question)."""
    rng = random.Random(seed)
    return {d: [tasks.kv_example(rng, n_facts, d) for _ in range(per_distance)] for d in distances}


def token_span(tokenizer, example) -> int:
    """Tokens from the asked fact to the end of the question: how far back the answer lies."""
    key = example.prompt.split(" ask ")[1].split()[0]
    asked_on = example.prompt[example.prompt.index(f"{key} = "):]
    return len(tokenizer(asked_on, add_special_tokens=False)["input_ids"])


def mean_spans(tokenizer, sets: dict[int, list]) -> list[float]:
    """The mean ``token_span`` at each distance of ``sets``, in its order."""
    return [sum(token_span(tokenizer, ex) for ex in examples) / len(examples) for examples in sets.values()]


def accuracy_by_distance(model, tokenizer, sets: dict[int, list], batch_size: int = 64) -> list[float]:
    """Exact match (``quality.forced_exact_match``) at each distance of ``sets``, in its order."""
    return [sum(quality.forced_exact_match(model, tokenizer, examples, batch_size)) / len(examples)
            for examples in sets.values()]


def training_rows(tokenizer, seq_len: int, n_rows: int, min_facts: int = 24, seed: int = 7):
    """An endless stream of single rows of ``seq_len`` tokens: kv prompts of ``min_facts`` up to
    ``facts_for(seq_len)`` facts, asked at a random distance, every token scored (as in pre-training)."""
    rng, most = random.Random(seed), facts_for(tokenizer, seq_len)
    if not 2 <= min_facts <= most:
        raise RecipeError(f"min_facts={min_facts}: between 2 and {most} (what fills {seq_len} tokens)")

    def example():
        n = rng.randint(min_facts, most)
        return tasks.kv_example(rng, n, rng.randrange(n))

    docs = batches.encode(tokenizer, [example() for _ in range(n_rows + 8)], train_on_prompt=True)
    return batches.packed_batches(docs, seq_len, 1, seed=seed)


def finetune(model, tokenizer, seq_len: int, steps: int, lr: float, batch: int = 1, min_facts: int = 24,
             autocast_dtype: torch.dtype | None = None, seed: int = 7) -> train.TrainStats:
    """Fine-tune ``model`` for ``steps`` AdamW steps of ``batch`` rows of ``seq_len`` tokens of long kv
    prompts (``training_rows``), with warm-up and cosine decay; returns the loop's statistics.

    Extend the model's RoPE to ``seq_len`` first (``rope.extend_context``): this trains at that length,
    it does not change the positions.
    """
    rows = training_rows(tokenizer, seq_len, steps * batch, min_facts, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = train.cosine_schedule(optimizer, steps, warmup=max(1, steps // 10))
    return train.train(model, optimizer, rows, steps, accum_steps=batch, autocast_dtype=autocast_dtype,
                       scheduler=schedule, desc=f"fine-tune at {seq_len}")


def before_and_after(name: str, tokenizer, trained: int, seq_len: int, sets: dict[int, list], steps: int,
                     lr: float, batch: int = 1, autocast_dtype: torch.dtype | None = None, kind: str = "yarn",
                     min_facts: int = 24) -> tuple[dict[str, list[float]], train.TrainStats]:
    """Retrieval by distance (``accuracy_by_distance`` on ``sets``) of the model ``name`` three ways: as
    trained; with RoPE extended from its ``trained`` length to ``seq_len`` (``kind``), nothing else changed;
    and extended, then fine-tuned at ``seq_len`` (``finetune``: ``steps`` steps of ``batch`` rows at
    ``lr``, prompts of ``min_facts`` facts and more). Returns the accuracies by version, and the
    fine-tune's statistics."""
    factor = f"{kind} x{seq_len / trained:g}"

    def extended():
        model = models.load_model(name)
        rope.extend_context(model, seq_len, kind, trained=trained)
        return model

    tuned = extended()
    stats = finetune(tuned, tokenizer, seq_len, steps, lr, batch, min_facts, autocast_dtype)
    versions = {"as trained": models.load_model(name), f"{factor}, not fine-tuned": extended(),
                f"{factor}, fine-tuned ({steps * batch} rows)": tuned}
    return {label: accuracy_by_distance(model, tokenizer, sets) for label, model in versions.items()}, stats


def beyond(spans: Sequence[float], accuracy: dict[str, list[float]], trained: int) -> dict[str, float]:
    """Each version's mean accuracy over the distances whose answer lies further back (``spans``, tokens)
    than the ``trained`` length: what no row of its training ever asked of it."""
    far = [i for i, span in enumerate(spans) if span > trained]
    if not far:
        raise RecipeError(f"no distance lies beyond {trained} tokens (the farthest: {max(spans):.0f}): "
                          f"fill the prompts to a longer length")
    return {name: sum(values[i] for i in far) / len(far) for name, values in accuracy.items()}
