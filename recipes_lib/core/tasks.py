"""The project's synthetic tasks: exact answers, so accuracy is measurable without a hub data set.

Every example is one line, ``"<task>: <input> => <answer>"``. A model is scored by greedy-decoding
after ``"=>"`` and comparing the text with the answer (exact match), or by ROUGE-1 for ``summary``.

- ``copy``: repeat a list of letters (an induction-head task).
- ``sort``: sort a list of digits.
- ``add``: add two 2-digit numbers (digits are single tokens).
- ``kv``: long-range retrieval; a list of ``key=value`` facts, then a question about one of them.
  ``distance`` is the number of facts between the asked fact and the question.
- ``summary``: a two-sentence story and its three-word summary (scored with ROUGE-1 F1).

``reverse`` (a list of letters backwards) is kept out of pre-training (``TASKS``): fine-tuning
recipes teach it to the embedded model and measure how much each method learns.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

TASKS = ("copy", "sort", "add", "kv", "summary")
SEPARATOR = "=>"

_NAMES = ["ana", "ben", "cleo", "dan", "eva", "finn", "gus", "hana", "ivo", "jade", "kai", "lena"]
_VERBS = ["found", "painted", "sold", "carried", "lost", "cleaned", "bought", "hid"]
_ADJS = ["red", "small", "old", "shiny", "green", "heavy", "soft", "broken"]
_NOUNS = ["box", "lamp", "boat", "chair", "book", "cup", "kite", "drum"]
_PLACES = ["park", "kitchen", "market", "garden", "school", "harbor"]
_AFTER = ["went home", "sang a song", "took a nap", "called a friend", "ate bread", "read a map"]


@dataclass(frozen=True)
class Example:
    """One task instance: the prompt ends with the separator; the answer follows it."""

    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def _copy(rng: random.Random) -> Example:
    letters = rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))
    return Example("copy", f"copy: {' '.join(letters)} {SEPARATOR}", " ".join(letters))


def _sort(rng: random.Random) -> Example:
    digits = rng.choices(string.digits, k=rng.randint(3, 7))
    return Example("sort", f"sort: {' '.join(digits)} {SEPARATOR}", " ".join(sorted(digits)))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example("add", f"add: {a} + {b} {SEPARATOR}", str(a + b))


def kv_example(rng: random.Random, n_facts: int, distance: int) -> Example:
    """A retrieval example with ``n_facts`` facts; the asked one has ``distance`` facts after it."""
    if not 0 <= distance < n_facts:
        raise ValueError(f"distance must be in [0, n_facts={n_facts}), got {distance}")
    keys = rng.sample([a + b for a in string.ascii_lowercase for b in string.ascii_lowercase], n_facts)
    values = [str(rng.randint(100, 999)) for _ in keys]
    asked = n_facts - 1 - distance
    facts = " ; ".join(f"{k} = {v}" for k, v in zip(keys, values))
    return Example("kv", f"kv: {facts} ; ask {keys[asked]} {SEPARATOR}", values[asked])


def _kv(rng: random.Random) -> Example:
    n_facts = rng.randint(2, 24)
    return kv_example(rng, n_facts, rng.randrange(n_facts))


def _summary(rng: random.Random) -> Example:
    name, verb, adj, noun = rng.choice(_NAMES), rng.choice(_VERBS), rng.choice(_ADJS), rng.choice(_NOUNS)
    place, after = rng.choice(_PLACES), rng.choice(_AFTER)
    story = f"{name} {verb} the {adj} {noun} in the {place} . then {name} {after} ."
    return Example("summary", f"summary: {story} {SEPARATOR}", f"{name} {verb} {noun}")


def _reverse(rng: random.Random) -> Example:
    letters = rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))
    return Example("reverse", f"reverse: {' '.join(letters)} {SEPARATOR}", " ".join(reversed(letters)))


_GENERATORS = {"reverse": _reverse, "copy": _copy, "sort": _sort, "add": _add, "kv": _kv, "summary": _summary}


def make_examples(n: int, seed: int, tasks: tuple[str, ...] = TASKS) -> list[Example]:
    """``n`` examples drawn round-robin from ``tasks``, reproducible from ``seed``."""
    unknown = set(tasks) - set(_GENERATORS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {sorted(_GENERATORS)}")
    rng = random.Random(seed)
    return [_GENERATORS[tasks[i % len(tasks)]](rng) for i in range(n)]


def score(example: Example, prediction: str) -> float:
    """Exact match (1.0 or 0.0), or ROUGE-1 F1 for ``summary``."""
    prediction = prediction.strip()
    if example.task != "summary":
        return float(prediction == example.answer)
    return rouge1_f1(prediction, example.answer)


def rouge1_f1(prediction: str, reference: str) -> float:
    """Unigram-overlap F1 (ROUGE-1) between two whitespace-tokenised strings."""
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return 0.0
    overlap = sum(min(pred.count(w), ref.count(w)) for w in set(ref))
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
