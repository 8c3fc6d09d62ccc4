"""losses: the fused chunked LM head + cross-entropy against the plain full-logits reference."""

import pytest
import torch
from torch.testing import assert_close

from recipes_lib.core import losses
from recipes_lib.core.losses import IGNORE_INDEX

BATCH, SEQ, HIDDEN, VOCAB = 2, 7, 16, 50  # 14 tokens


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[0, 0] = labels[0, 3] = labels[1, 4] = labels[1, 5] = IGNORE_INDEX
    return hidden, weight, labels


def reference(hidden, weight, labels):
    return losses.cross_entropy_sum(hidden @ weight.T, labels)


def test_shift_labels_and_count_targets():
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 8], [IGNORE_INDEX, 1, 2, 3]])
    shifted = [[6, IGNORE_INDEX, 8, IGNORE_INDEX], [1, 2, 3, IGNORE_INDEX]]
    assert losses.shift_labels(labels).tolist() == shifted
    assert losses.count_targets(labels) == 5  # the first label of a row is never a target


def test_cross_entropy_sum_matches_a_loop():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 6, generator=gen)
    labels = torch.tensor([[0, 2, IGNORE_INDEX, 5]])
    expected = sum(-torch.log_softmax(logits[0, t], -1)[labels[0, t + 1]] for t in (0, 2))
    assert_close(losses.cross_entropy_sum(logits, labels), expected)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 7, 14, 2048])  # 3 and 5 do not divide 14 tokens
def test_linear_cross_entropy_matches_reference(inputs, chunk_size):
    hidden, weight, labels = inputs
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    expected = reference(h_ref, w_ref, labels)
    got = losses.linear_cross_entropy(h, w, labels, chunk_size=chunk_size)
    assert got.shape == () and got.dtype == torch.float32
    assert abs(got.item() - expected.item()) / expected.item() < 1e-5

    # An upstream gradient other than 1 checks that backward scales by it.
    (2.5 * expected).backward()
    (2.5 * got).backward()
    assert rel_err(h.grad, h_ref.grad) < 1e-5
    assert rel_err(w.grad, w_ref.grad) < 1e-5
    assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    # Ignored positions get no gradient at all.
    ignored = losses.shift_labels(labels) == IGNORE_INDEX
    assert torch.all(h.grad[ignored] == 0)


def test_linear_cross_entropy_frozen_weight(inputs):
    hidden, weight, labels = inputs
    h_ref, h = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    expected = reference(h_ref, weight, labels)
    got = losses.linear_cross_entropy(h, weight, labels, chunk_size=4)
    assert abs(got.item() - expected.item()) / expected.item() < 1e-5
    expected.backward()
    got.backward()
    assert weight.grad is None
    assert rel_err(h.grad, h_ref.grad) < 1e-5


def test_linear_cross_entropy_all_ignored_is_zero(inputs):
    hidden, weight, _ = inputs
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    labels = torch.full((BATCH, SEQ), IGNORE_INDEX)
    loss = losses.linear_cross_entropy(h, w, labels, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_linear_cross_entropy_gradient_accumulates_into_existing_grad(inputs):
    """Two backward passes add up, as autograd does for the reference."""
    hidden, weight, labels = inputs
    w = weight.clone().requires_grad_()
    for _ in range(2):
        losses.linear_cross_entropy(hidden, w, labels, chunk_size=3).backward()
    w_ref = weight.clone().requires_grad_()
    (2 * reference(hidden, w_ref, labels)).backward()
    assert rel_err(w.grad, w_ref.grad) < 1e-5


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_linear_cross_entropy_rejects_non_positive_chunk(inputs, chunk_size):
    hidden, weight, labels = inputs
    with pytest.raises(ValueError, match="chunk_size"):
        losses.linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)


def test_linear_cross_entropy_uneven_chunks_and_no_grad():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 100, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(50, (1, 100), generator=gen)
    reference = losses.cross_entropy_sum(hidden @ weight.T, labels)
    for chunk in (7, 33, 100, 1000):
        torch.testing.assert_close(losses.linear_cross_entropy(hidden, weight, labels, chunk), reference)
    with torch.no_grad():
        torch.testing.assert_close(losses.linear_cross_entropy(hidden, weight, labels, 7), reference.detach())
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive whole number"):
            losses.linear_cross_entropy(hidden, weight, labels, bad)
