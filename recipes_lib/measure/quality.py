"""Quality: exact-match accuracy (ROUGE-1 for summaries) on the synthetic tasks, and perplexity."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..core import losses, tasks
from ..core.batches import Document, encode, pad_batch
from ..core.tasks import Example


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12,
                   batch_size: int = 64, progress: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` up to the end-of-sequence token, decoded to text."""
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    answers: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="eval", leave=False):
        chunk = [tokenizer.bos_token + p for p in prompts[start:start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    tokenizer.padding_side = side
    return [a.strip() for a in answers]


def task_scores(model, tokenizer, examples: Sequence[Example], **kwargs) -> dict[str, float]:
    """Mean score per task (exact match; ROUGE-1 F1 for ``summary``) and their mean as ``"mean"``."""
    predictions = greedy_answers(model, tokenizer, [ex.prompt for ex in examples], **kwargs)
    by_task: dict[str, list[float]] = defaultdict(list)
    for ex, pred in zip(examples, predictions):
        by_task[ex.task].append(tasks.score(ex, pred))
    result = {task: sum(v) / len(v) for task, v in sorted(by_task.items())}
    result["mean"] = sum(result.values()) / len(result)
    return result


@torch.no_grad()
def perplexity(model, docs: Sequence[Document], pad_id: int, batch_size: int = 16) -> float:
    """exp(mean next-token loss) over the scored tokens of ``docs``."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(docs), batch_size):
        batch = pad_batch(docs[start:start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += losses.cross_entropy_sum(logits, batch["labels"]).item()
        count += losses.count_targets(batch["labels"])
    return math.exp(total / count)


@torch.no_grad()
def forced_exact_match(model, tokenizer, examples: Sequence[Example], batch_size: int = 64) -> list[float]:
    """Exact match by teacher forcing: 1.0 where the greedy next token is right at every answer position.

    That is the answer greedy decoding would produce (answer tokens, then end-of-sequence), scored in
    one forward pass per batch. Rows are right-padded and run without a padding mask: causal attention
    never looks right, so the padding changes nothing before it (and sliding windows need no mask).
    """
    model.eval()
    device = next(model.parameters()).device
    docs = [d.input_ids for d in encode(tokenizer, examples)]
    answer_lengths = [len(tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"]) + 1
                      for ex in examples]
    scores: list[float] = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([d + [tokenizer.pad_token_id] * (width - len(d)) for d in chunk], device=device)
        predicted = model(input_ids=ids).logits.argmax(-1)
        for row, doc, n in zip(predicted, chunk, answer_lengths[start:start + batch_size]):
            targets = torch.tensor(doc[-n:], device=device)
            scores.append(float(torch.equal(row[len(doc) - n - 1:len(doc) - 1], targets)))
    return scores


def summary(model, tokenizer, examples: Sequence[Example], docs: Sequence[Document]) -> dict:
    """Perplexity on ``docs`` and the mean task score on ``examples`` (and each task's), in one dict."""
    scores = task_scores(model, tokenizer, examples)
    return {"perplexity": perplexity(model, docs, tokenizer.pad_token_id), "accuracy": scores["mean"],
            "per_task": scores}


def curve_ends(curves: dict[str, Sequence[float]], last: int = 10) -> dict[str, float]:
    """Two loss curves compared at their ends: each curve's mean over its ``last`` steps (by name), the
    ``gap`` between those means, and the ``noise`` to judge it by: the larger of the two curves' mean
    step-to-step change over those steps (a gap under ~2x the noise is no measurable difference)."""
    if len(curves) != 2 or any(len(c) < 2 for c in curves.values()):
        raise ValueError("curve_ends compares two curves of at least 2 steps each")
    tails = {name: list(c)[-last:] for name, c in curves.items()}
    means = {name: sum(t) / len(t) for name, t in tails.items()}
    noise = max(sum(abs(b - a) for a, b in zip(t, t[1:])) / (len(t) - 1) for t in tails.values())
    first, second = means.values()
    return {**means, "gap": abs(first - second), "noise": noise}
