"""Distillation: the student shape and initialisation, the loss, and bad input."""

import pytest
import torch
from conftest import tiny_model

from recipes_lib.core.errors import RecipeError
from recipes_lib.inference import distill


def test_layer_map_spreads_layers():
    assert distill.layer_map(4, 2) == [0, 3]
    assert distill.layer_map(16, 4) == [0, 5, 10, 15]


def test_student_copies_teacher_layers():
    teacher = tiny_model(num_hidden_layers=4)
    student = distill.make_student(teacher, 2)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_student_larger_than_teacher_is_refused():
    with pytest.raises(RecipeError, match="not smaller than its teacher"):
        distill.make_student(tiny_model(), 3)


def test_kd_loss_is_ce_at_zero_weight_and_zero_kl_for_identical_logits():
    logits = torch.randn(2, 6, 10)
    labels = torch.randint(0, 10, (2, 6))
    total, ce, kl = distill.kd_loss(logits, logits, labels, kl_weight=0.5)
    assert kl.abs() < 1e-6
    torch.testing.assert_close(total, 0.5 * ce)
    ce_only, _, _ = distill.kd_loss(logits, None, labels, kl_weight=0.0)
    torch.testing.assert_close(ce_only, ce)


def test_distillation_moves_student_towards_teacher():
    torch.manual_seed(0)
    teacher = tiny_model(num_hidden_layers=4)
    student = distill.make_student(teacher, 1, init_from_teacher=False)
    ids = torch.randint(0, 64, (4, 12))
    batch = {"input_ids": ids, "labels": ids}

    def kl():
        with torch.no_grad():
            return distill.kd_loss(student(ids).logits, teacher(ids).logits, ids, kl_weight=1.0)[2].item()

    before = kl()
    distill.distill(student, teacher, iter([batch] * 30), steps=30, lr=1e-2, kl_weight=1.0, progress=False)
    assert kl() < 0.5 * before
