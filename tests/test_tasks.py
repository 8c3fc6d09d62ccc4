"""tasks: deterministic generation, correct answers, kv distance semantics and scoring."""

import random

import pytest

from recipes_lib.core import tasks
from recipes_lib.core.tasks import Example


def test_make_examples_is_deterministic_per_seed():
    a, b = tasks.make_examples(50, seed=7), tasks.make_examples(50, seed=7)
    assert a == b
    assert a != tasks.make_examples(50, seed=8)


def test_make_examples_round_robin_over_tasks():
    examples = tasks.make_examples(12, seed=0, tasks=("add", "copy", "sort"))
    assert [ex.task for ex in examples] == ["add", "copy", "sort"] * 4
    default = tasks.make_examples(10, seed=0)
    assert [ex.task for ex in default] == list(tasks.TASKS) * 2


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="nope"):
        tasks.make_examples(3, seed=0, tasks=("copy", "nope"))


def test_every_text_has_the_separator():
    for ex in tasks.make_examples(200, seed=3):
        assert " => " in ex.text
        assert ex.prompt.endswith(" =>")
        assert ex.text == f"{ex.prompt} {ex.answer}"
        assert ex.prompt.startswith(f"{ex.task}: ")


def _body(ex: Example) -> list[str]:
    return ex.prompt.removeprefix(f"{ex.task}: ").removesuffix(" =>").split()


def test_answers_are_correct():
    for ex in tasks.make_examples(200, seed=4):
        if ex.task == "copy":
            assert ex.answer.split() == _body(ex)
        elif ex.task == "sort":
            assert ex.answer.split() == sorted(_body(ex))
        elif ex.task == "add":
            a, plus, b = _body(ex)
            assert plus == "+" and int(ex.answer) == int(a) + int(b)
        elif ex.task == "summary":
            name, verb, _the, _adj, noun = _body(ex)[:5]
            assert ex.answer == f"{name} {verb} {noun}"


def _facts(ex: Example) -> tuple[list[tuple[str, str]], str]:
    body = ex.prompt.removeprefix("kv: ").removesuffix(" =>")
    *facts, question = body.split(" ; ")
    assert question.startswith("ask ")
    return [tuple(f.split(" = ")) for f in facts], question.removeprefix("ask ")


@pytest.mark.parametrize("n_facts,distance", [(1, 0), (5, 0), (5, 2), (5, 4), (24, 17)])
def test_kv_example_distance(n_facts, distance):
    ex = tasks.kv_example(random.Random(n_facts * 100 + distance), n_facts, distance)
    facts, asked = _facts(ex)
    assert len(facts) == n_facts
    assert len({k for k, _ in facts}) == n_facts  # keys are unique, so the question is unambiguous
    index = [k for k, _ in facts].index(asked)
    assert n_facts - 1 - index == distance  # `distance` facts stand between the asked one and the end
    assert ex.answer == facts[index][1]


@pytest.mark.parametrize("distance", [-1, 3, 4])
def test_kv_example_rejects_bad_distance(distance):
    with pytest.raises(ValueError):
        tasks.kv_example(random.Random(0), 3, distance)


def test_score_exact_match():
    ex = Example("add", "add: 12 + 30 =>", "42")
    assert tasks.score(ex, "42") == 1.0
    assert tasks.score(ex, "  42 \n") == 1.0  # surrounding whitespace is stripped
    assert tasks.score(ex, "4 2") == 0.0
    assert tasks.score(ex, "421") == 0.0
    assert tasks.score(ex, "") == 0.0


def test_score_summary_uses_rouge1():
    ex = Example("summary", "summary: ... =>", "ana found box")
    assert tasks.score(ex, "ana found box") == 1.0
    assert tasks.score(ex, "ana found lamp") == pytest.approx(2 / 3)
    assert tasks.score(ex, "ben lost cup") == 0.0


def test_rouge1_f1_by_hand():
    # overlap 2, precision 2/3, recall 2/2 -> F1 = 2 * (2/3) * 1 / (2/3 + 1) = 0.8
    assert tasks.rouge1_f1("a b c", "a b") == pytest.approx(0.8)
    # repeated words count at most as often as in the reference: overlap min(2,1) + min(1,1) = 2
    assert tasks.rouge1_f1("a a b", "a b") == pytest.approx(0.8)
    # overlap 1, precision 1/4, recall 1/2 -> F1 = 2 * 1/8 / (3/4) = 1/3
    assert tasks.rouge1_f1("x y z a", "a q") == pytest.approx(1 / 3)
    assert tasks.rouge1_f1("", "a") == 0.0
    assert tasks.rouge1_f1("a", "") == 0.0
    assert tasks.rouge1_f1("b", "a") == 0.0
