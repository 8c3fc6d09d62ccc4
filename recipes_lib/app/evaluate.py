"""``recipes eval RUN_OR_MODEL [--data ...]``: score a fine-tune against its base on held-out rows.

Scores, per model and per task (where the data has a ``task`` column):
- perplexity: exp of the mean next-token loss over the held-out documents' scored tokens (the
  responses, or every token of plain text), ``measure.quality.perplexity``;
- exact match: the greedy answer, stripped, equals the reference;
- ROUGE-1/2/L F1 through Google's ``rouge-score`` (the implementation behind most published ROUGE).
Answers are generated greedily by notebook 03's static-KV-cache step (``inference.generate``), a batch
of prompts of the same token length at a time (no padding, so nothing can leak into the answers).
``eval_results.json`` holds the scores side by side; ``predictions.jsonl`` every row's answers.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.errors import RecipeError
from ..inference import generate
from ..measure import quality
from . import eval_data

ROUGE = ("rouge1", "rouge2", "rougeL")


def rouge(names):
    """Google's ROUGE scorer, imported here so that the rest of the command runs without it."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise RecipeError("recipes eval scores ROUGE with rouge-score: pip install 'recipes_lib[eval]' "
                          "(or pip install rouge-score; requirements.txt has it)") from None
    return rouge_scorer.RougeScorer(list(names), use_stemmer=False)


@torch.no_grad()
def greedy_answers(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                   batch_size: int = 32, progress: bool = False) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids, up to the first ``eos_id``), by the static-cache step.

    Prompts are grouped by length, so every batch is a ``[rows, length]`` tensor without padding.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(map(len, prompts))
    if limit is not None and longest + max_new_tokens > limit:
        raise RecipeError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} passes the "
                          f"model's {limit} positions: lower --max-new-tokens or drop the longest rows")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [group[s:s + batch_size] for _, g in itertools.groupby(order, key=lambda i: len(prompts[i]))
               for group in [list(g)] for s in range(0, len(group), batch_size)]
    answers: list[list[int]] = [[] for _ in prompts]
    for rows in tqdm(batches, desc="generate", disable=not progress, leave=False):
        ids = torch.tensor([prompts[i] for i in rows], device=device)
        for i, new in zip(rows, generate.greedy_tokens(model, ids, max_new_tokens).tolist()):
            answers[i] = new[:new.index(eos_id)] if eos_id in new else new
    return answers


def text_scores(prediction: str, reference: str, scorer) -> dict[str, float]:
    """Exact match and ROUGE-1/2/L F1 of one answer."""
    rouge = scorer.score(reference, prediction)
    return {"exact_match": float(prediction.strip() == reference.strip()),
            **{name: rouge[name].fmeasure for name in ROUGE}}


def score_model(model, tokenizer, rows: eval_data.Rows, max_new_tokens: int, batch_size: int,
                progress: bool = False) -> tuple[dict, list[str | None]]:
    """(scores, predictions) of one model on the held-out rows."""
    result = {"perplexity": quality.perplexity(model, rows.docs, tokenizer.pad_token_id, batch_size)}
    asked = [i for i, p in enumerate(rows.prompts) if p is not None]
    predictions: list[str | None] = [None] * len(rows.prompts)
    if not asked:
        return result, predictions
    tokens = greedy_answers(model, [rows.prompts[i] for i in asked], max_new_tokens, tokenizer.eos_token_id,
                            batch_size, progress)
    scorer = rouge(ROUGE)
    per_row: dict[str, list[dict]] = defaultdict(list)
    for i, new in zip(asked, tokens):
        predictions[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        scores = text_scores(predictions[i], rows.references[i], scorer)
        per_row["all"].append(scores)
        if rows.tasks[i] is not None:
            per_row[rows.tasks[i]].append(scores)
    means = {task: {k: statistics.fmean(s[k] for s in rows_) for k in rows_[0]} | {"rows": len(rows_)}
             for task, rows_ in per_row.items()}
    result |= {k: v for k, v in means.pop("all").items() if k != "rows"}
    if means:
        result["per_task"] = dict(sorted(means.items()))
    return result, predictions


def answer_budget(rows: eval_data.Rows, tokenizer, requested: int | None) -> int:
    """New tokens per answer: ``requested``, else the longest reference's tokens + 4 (room to overshoot)."""
    if requested is not None:
        if requested < 1:
            raise RecipeError(f"--max-new-tokens={requested}: give a positive number of tokens")
        return requested
    references = [r for r in rows.references if r is not None]
    if not references:
        return 1
    return max(len(tokenizer(" " + r, add_special_tokens=False)["input_ids"]) for r in references) + 4


def run(name: str, data_updates: dict, out_dir: str | None = None, base: str | None = None,
        max_new_tokens: int | None = None, batch_size: int = 32, progress: bool = True) -> dict:
    """Evaluate ``name`` (a run folder or a model), with its base beside it; write and return the results."""
    tgt = eval_data.target(name, base)
    tokenizer = eval_data.tokenizer_of(tgt)
    cfg, own = eval_data.data_config(tgt, data_updates)
    rows = eval_data.held_out(cfg, tokenizer, own)
    budget = answer_budget(rows, tokenizer, max_new_tokens)
    loaders = {"fine-tuned" if tgt.base else "model": lambda: eval_data.tuned_model(tgt)}
    if tgt.base:
        loaders = {"base": lambda: eval_data.base_model(tgt), **loaders}
    scores, predictions = {}, {}
    for label, loader in loaders.items():
        scores[label], predictions[label] = score_model(loader(), tokenizer, rows, budget, batch_size,
                                                        progress)
    results = {"target": name, "base_model": tgt.base,
               "data": {"source": cfg.source, "split": cfg.split, "format": cfg.format,
                        "rows": len(rows.docs), "held_out": rows.note,
                        "excluded_as_trained_on": rows.excluded},
               "generation": {"max_new_tokens": budget, "batch_size": batch_size,
                              "decoding": "greedy, static KV cache (inference.generate), no padding"},
               "scores": scores}
    if "base" in scores:
        results["change"] = {k: scores["fine-tuned"][k] - scores["base"][k] for k in scores["base"]
                             if isinstance(scores["base"][k], float)}
    out = Path(out_dir) if out_dir else (Path(name) / "eval" if tgt.config or tgt.trained else Path("eval"))
    write(out, results, rows, predictions)
    results["written"] = [str(out / "eval_results.json"), str(out / "predictions.jsonl")]
    return results


def write(out: Path, results: dict, rows: eval_data.Rows, predictions: dict[str, list]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "predictions.jsonl", "w") as f:
        for i, prompt in enumerate(rows.prompt_texts):
            record = {"prompt": prompt, "reference": rows.references[i], "task": rows.tasks[i]}
            record |= {f"{label}": answers[i] for label, answers in predictions.items()}
            f.write(json.dumps(record) + "\n")


def table(results: dict) -> str:
    """The scores side by side, one metric a line (per-task exact match and ROUGE-L below)."""
    scores = results["scores"]
    labels = list(scores)
    lines = [f"{'metric':<28}" + "".join(f"{label:>14}" for label in labels)
             + ("      change" if "change" in results else "")]

    def line(name: str, values: list, change=None):
        cells = "".join(f"{v:>14.4f}" if isinstance(v, float) else f"{'-':>14}" for v in values)
        lines.append(f"{name:<28}{cells}" + (f"{change:>+12.4f}" if change is not None else ""))

    first = scores[labels[0]]
    for key in [k for k in first if k != "per_task"]:
        line(key, [scores[label].get(key) for label in labels], results.get("change", {}).get(key))
    for task in first.get("per_task", {}):
        for key in ("exact_match", "rougeL"):
            values = [scores[label]["per_task"][task][key] for label in labels]
            line(f"  {task}: {key}", values, values[-1] - values[0] if len(values) > 1 else None)
    data = results["data"]
    lines.append(f"{data['rows']} rows of {data['source']} ({data['held_out']})")
    return "\n".join(lines)
