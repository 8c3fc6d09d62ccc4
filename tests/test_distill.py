"""Distillation: the student shape and initialisation, the loss against its formula, and bad input."""

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
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight,
                               teacher.model.layers[3].mlp.up_proj.weight)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_student_larger_than_teacher_is_refused():
    with pytest.raises(RecipeError, match="not smaller than its teacher"):
        distill.make_student(tiny_model(), 3)


def _batch():
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not scored
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # padding at the end of the last row
    labels[2, 7:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _by_hand(student, teacher, batch, temperature, kl_weight):
    """T^2 KL(teacher^T || student^T) and CE summed over the scored next tokens, in plain torch ops."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s, t = student(**inputs).logits[:, :-1].double(), teacher(**inputs).logits[:, :-1].double()
    targets, scored = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    p_teacher = torch.softmax(t / temperature, -1)
    kl = (p_teacher * (torch.log(p_teacher) - torch.log_softmax(s / temperature, -1))).sum(-1)
    nll = -torch.log_softmax(s, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    total = kl_weight * temperature**2 * kl[scored].sum() + (1 - kl_weight) * nll[scored].sum()
    return total, int(scored.sum())


def _untrained_pair():
    """A 4-layer tiny teacher, a randomly initialised 1-layer student of it, and one batch (seed 0)."""
    torch.manual_seed(0)
    teacher = tiny_model(num_hidden_layers=4)
    return teacher, distill.make_student(teacher, 1, init_from_teacher=False), _batch()


@pytest.mark.parametrize("kl_weight", [0.0, 0.5, 1.0])
def test_distillation_loss_is_hand_written_kl_plus_ce(kl_weight):
    teacher, student, batch = _untrained_pair()
    expected, _ = _by_hand(student, teacher, batch, 3.0, kl_weight)
    loss = distill.distillation_loss(teacher, temperature=3.0, kl_weight=kl_weight)(student, batch)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_distill_trains_with_the_loss_per_target_token():
    """The training loop divides the hook's sum by the scored tokens: its first loss is the per-token mean."""
    teacher, student, batch = _untrained_pair()
    with torch.no_grad():
        expected, n_targets = _by_hand(student, teacher, batch, 2.0, 1.0)
    losses = distill.distill(student, teacher, iter([batch] * 30), steps=30, lr=1e-2, kl_weight=1.0,
                             progress=False)
    assert losses[0] == pytest.approx(expected.item() / n_targets, rel=1e-5)
    assert losses[-1] < 0.5 * losses[0], "distillation should move the student towards its teacher"


def test_distill_records_the_cross_entropy_per_step():
    """``ce_per_step`` holds each step's CE per target token: all of the loss with ``kl_weight=0``, its
    CE part (by hand) with KL; ``kd_and_ce`` starts both runs from the same student on the same batches."""
    teacher, student, batch = _untrained_pair()
    with torch.no_grad():
        ce_only, n_targets = _by_hand(student, teacher, batch, 2.0, 0.0)
    ce = []
    losses = distill.distill(distill.make_student(teacher, 1, init_from_teacher=False), teacher,
                             iter([batch] * 5), steps=5, kl_weight=0.5, progress=False, ce_per_step=ce)
    assert len(ce) == 5 and ce[0] == pytest.approx(ce_only.item() / n_targets, rel=1e-5)
    assert losses[0] != pytest.approx(ce[0], rel=1e-3), "with KL the loss is not the cross-entropy"
    students, curves = distill.kd_and_ce(student, teacher, lambda: iter([batch] * 5), 5, progress=False)
    assert list(curves) == list(distill.RUNS) and all(len(c) == 5 for c in curves.values())
    kd, ce_run = curves.values()
    assert kd[0] == pytest.approx(ce_run[0], rel=1e-6) and kd[1] != pytest.approx(ce_run[1], rel=1e-6)
    assert not any(torch.equal(p, q) for p, q in zip(students["CE only"].parameters(), student.parameters()))
