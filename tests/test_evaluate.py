"""evaluate: greedy answers, per-task scores and perplexity on a tiny untrained model."""

import math

import pytest
import torch
from conftest import tiny_model

from recipes_lib.core import batches, losses, tasks
from recipes_lib.measure import quality


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(len(tokenizer), max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def examples():
    return tasks.make_examples(10, seed=5)


def test_task_scores_on_an_untrained_model(model, fresh_tokenizer, examples):
    scores = quality.task_scores(model, fresh_tokenizer, examples, max_new_tokens=3)
    assert set(scores) == set(tasks.TASKS) | {"mean"}
    per_task = [scores[t] for t in tasks.TASKS]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in scores.values())
    assert scores["mean"] == pytest.approx(sum(per_task) / len(per_task))


def test_greedy_answers_do_not_depend_on_batching(model, fresh_tokenizer, examples):
    """Left padding in a batch must give the same continuation as each prompt alone."""
    prompts = [ex.prompt for ex in examples[:5]]
    batched = quality.greedy_answers(model, fresh_tokenizer, prompts, max_new_tokens=3)
    alone = [quality.greedy_answers(model, fresh_tokenizer, [p], max_new_tokens=3)[0] for p in prompts]
    assert len(batched) == 5 and all(isinstance(a, str) for a in batched)
    assert batched == alone
    assert not model.training  # generation runs in eval mode


def test_task_scores_aggregation(monkeypatch, examples):
    """Perfect answers score 1 per task, wrong ones 0; summary gets partial ROUGE credit."""
    monkeypatch.setattr(quality, "greedy_answers", lambda m, t, prompts, **kw: [ex.answer for ex in examples])
    assert quality.task_scores(None, None, examples) == {**{t: 1.0 for t in tasks.TASKS}, "mean": 1.0}

    def partial(m, t, prompts, **kw):
        # Right for copy, and the first two summary words (ROUGE-1 F1 2/3); wrong elsewhere.
        return [ex.answer if ex.task == "copy" else
                " ".join(ex.answer.split()[:2]) + " zzz" if ex.task == "summary" else "nope"
                for ex in examples]
    monkeypatch.setattr(quality, "greedy_answers", partial)
    scores = quality.task_scores(None, None, examples)
    assert scores["copy"] == 1.0 and scores["add"] == scores["sort"] == scores["kv"] == 0.0
    assert scores["summary"] == pytest.approx(2 / 3)
    assert scores["mean"] == pytest.approx((1 + 2 / 3) / 5)


def test_perplexity_matches_per_document_losses(model, tokenizer, examples):
    docs = batches.encode(tokenizer, examples[:6])
    ppl = quality.perplexity(model, docs, tokenizer.pad_token_id, batch_size=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([doc.input_ids])
            total += losses.cross_entropy_sum(model(input_ids=ids).logits, torch.tensor([doc.labels])).item()
            count += sum(1 for label in doc.labels[1:] if label != losses.IGNORE_INDEX)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-4)
    assert 1.0 < ppl < 10 * len(tokenizer)  # an untrained model is near uniform
