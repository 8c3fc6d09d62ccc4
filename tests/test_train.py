"""train: token-normalised accumulation, the fused-head loss, the loop itself."""

import copy
import math

import pytest
import torch
from conftest import tiny_model
from torch.testing import assert_close

from recipes_lib.core import batches, losses, tasks, train

VOCAB = 64


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def docs():
    # Lengths 3..20 so micro-batches hold very different numbers of real tokens.
    return batches.random_documents(8, VOCAB, 3, 20, seed=1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(VOCAB)


def micro_batches(docs):
    return [batches.pad_batch(docs[i:i + 2], pad_id=0) for i in range(0, len(docs), 2)]


@pytest.mark.parametrize("fused_head", [True, False])
def test_accumulation_equals_one_large_batch(model, docs, fused_head):
    mbs = micro_batches(docs)
    assert len({mb["input_ids"].shape[1] for mb in mbs}) == len(mbs)  # all padded to different lengths
    assert len({losses.count_targets(mb["labels"]) for mb in mbs}) > 1

    model.zero_grad(set_to_none=True)
    step_loss = train.accumulate_gradients(model, mbs, fused_head=fused_head).item()
    accumulated = flat_grads(model).clone()

    model.zero_grad(set_to_none=True)
    big = batches.pad_batch(docs, pad_id=0)
    big_loss = train.accumulate_gradients(model, [big], fused_head=fused_head).item()
    reference = flat_grads(model).clone()
    model.zero_grad(set_to_none=True)

    assert rel_err(accumulated, reference) < 1e-5
    assert step_loss == pytest.approx(big_loss, rel=1e-5)
    # The returned loss is the mean per target token of the whole step.
    with torch.no_grad():
        expected = train.loss_sum(model, big, fused_head=False) / losses.count_targets(big["labels"])
    assert step_loss == pytest.approx(expected.item(), rel=1e-5)


def test_naive_mean_of_means_does_not_match(model, docs):
    """The common shortcut (mean loss per micro-batch, averaged) gives a different gradient."""
    mbs = micro_batches(docs)
    model.zero_grad(set_to_none=True)
    for mb in mbs:
        (train.loss_sum(model, mb) / losses.count_targets(mb["labels"]) / len(mbs)).backward()
    naive = flat_grads(model).clone()
    model.zero_grad(set_to_none=True)
    train.accumulate_gradients(model, [batches.pad_batch(docs, pad_id=0)])
    reference = flat_grads(model).clone()
    model.zero_grad(set_to_none=True)
    assert rel_err(naive, reference) > 1e-3


def test_accumulate_rejects_a_step_without_targets(model):
    batch = batches.pad_batch([batches.Document([1, 2, 3], [losses.IGNORE_INDEX] * 3)], pad_id=0)
    with pytest.raises(ValueError, match="no target tokens"):
        train.accumulate_gradients(model, [batch])


@pytest.mark.parametrize("packed", [False, True])
def test_fused_head_loss_equals_unfused(model, docs, packed):
    if packed:
        batch = batches.stack_rows(batches.pack_rows(docs, seq_len=40)[:2])
    else:
        batch = batches.pad_batch(docs[:4], pad_id=0)
    assert train._split_lm(model) is not None  # the fused path is really taken

    model.zero_grad(set_to_none=True)
    fused = train.loss_sum(model, batch, fused_head=True, chunk_size=7)
    fused.backward()
    g_fused = flat_grads(model).clone()
    model.zero_grad(set_to_none=True)
    plain = train.loss_sum(model, batch, fused_head=False)
    plain.backward()
    g_plain = flat_grads(model).clone()
    model.zero_grad(set_to_none=True)

    assert abs(fused.item() - plain.item()) / plain.item() < 1e-5
    assert rel_err(g_fused, g_plain) < 1e-5


def test_fused_head_loss_with_tied_embeddings(docs):
    model = tiny_model(VOCAB, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = batches.pad_batch(docs[:4], pad_id=0)
    train.loss_sum(model, batch, fused_head=True).backward()
    g_fused = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    train.loss_sum(model, batch, fused_head=False).backward()
    assert rel_err(g_fused, model.lm_head.weight.grad) < 1e-5


def test_real_tokens(docs):
    padded = batches.pad_batch(docs[:3], pad_id=0)
    assert train.real_tokens(padded) == sum(len(d.input_ids) for d in docs[:3])
    rows = batches.pack_rows(docs, seq_len=64)
    packed = batches.stack_rows(rows)
    n_real = sum(len(d.input_ids) for d in docs)
    assert packed["input_ids"].numel() > n_real  # the last row has a padding tail
    assert train.real_tokens(packed) == n_real


def test_train_raises_when_batches_run_out(docs):
    model = tiny_model(VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = micro_batches(docs)[:3]  # 3 micro-batches, but 2 steps x 2 need 4
    with pytest.raises(ValueError, match="ran out"):
        train.train(model, optimizer, batches, steps=2, accum_steps=2, progress=False)


def test_train_stats_and_update(docs):
    model = tiny_model(VOCAB)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mbs = micro_batches(docs)
    seen = []
    stats = train.train(model, optimizer, mbs, steps=2, accum_steps=2, progress=False,
                        clock=lambda step: (step(), 1.5)[1], on_step=lambda i, loss: seen.append((i, loss)))
    assert len(stats.losses) == 2 and stats.step_seconds == [1.5, 1.5]  # the clock times each step
    assert seen == list(enumerate(stats.losses))
    assert stats.tokens == sum(len(d.input_ids) for d in docs)
    assert stats.tokens_per_step == stats.tokens / 2
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step
    name = "model.embed_tokens.weight"
    assert not torch.equal(before[name], model.state_dict()[name])


def test_loss_fn_hook_replaces_the_loss(docs):
    """A loss hook returns a summed loss; the loop divides it by the step's target tokens."""
    model = tiny_model(VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    mbs = micro_batches(docs)[:2]
    targets = sum(losses.count_targets(mb["labels"]) for mb in mbs)
    doubled = train.train(model, optimizer, mbs, steps=1, accum_steps=2, progress=False,
                          loss_fn=lambda m, mb: 2 * train.loss_sum(m, mb))
    plain = train.train(model, optimizer, mbs, steps=1, accum_steps=2, progress=False)
    assert doubled.step_seconds == []  # no clock, no times
    assert doubled.losses[0] == pytest.approx(2 * plain.losses[0], rel=1e-5)
    with torch.no_grad():
        expected = sum(train.loss_sum(model, mb).item() for mb in mbs) / targets
    assert plain.losses[0] == pytest.approx(expected, rel=1e-5)


def test_train_lowers_the_loss(tokenizer):
    torch.manual_seed(0)
    model = tiny_model(len(tokenizer))
    docs = batches.encode(tokenizer, tasks.make_examples(64, seed=0), train_on_prompt=True)
    rows = batches.packed_batches(docs, seq_len=96, batch_size=4, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = train.train(model, optimizer, rows, steps=30, progress=False)
    assert len(stats.losses) == 30
    first, last = stats.losses[0], sum(stats.losses[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_cosine_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = train.cosine_schedule(optimizer, steps=10, warmup=2)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # the peak, at the end of the warm-up
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)  # floor at 10%
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_packed_documents_do_not_attend_to_each_other(model, docs):
    """A packed row's loss equals the sum of its documents' losses taken one at a time."""
    rows = batches.pack_rows(docs[:3], seq_len=64)
    assert len(rows) == 1
    packed = train.loss_sum(model, batches.stack_rows(rows), fused_head=False)
    alone = sum(train.loss_sum(model, batches.pad_batch([d], pad_id=0), fused_head=False) for d in docs[:3])
    assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_train_does_not_consume_extra_batches(docs):
    model = tiny_model(VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stream = iter(micro_batches(docs) * 2)  # 8 micro-batches
    train.train(model, optimizer, stream, steps=3, progress=False)
    assert len(list(stream)) == 5


def test_plain_step_matches_our_step_on_one_unpadded_micro_batch():
    """The plain transformers step (model's mean loss, clip, step) and ours (summed loss over the step's
    targets, clip, step) make the same update when nothing is padded: the benchmarks compare like for like."""
    ids = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids}
    models_ = [tiny_model(VOCAB) for _ in range(2)]
    models_[1].load_state_dict(models_[0].state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models_]
    plain = train.train(models_[0], optimizers[0], [batch], steps=1, progress=False, step_fn=train.plain_step)
    ours = train.train(models_[1], optimizers[1], [batch], steps=1, progress=False, fused_head=False)
    assert plain.losses[0] == pytest.approx(ours.losses[0], rel=1e-5)
    moved = [(p, q) for p, q in zip(models_[0].parameters(), models_[1].parameters())]
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in moved)
    assert not torch.allclose(next(models_[0].parameters()), next(tiny_model(VOCAB).parameters()))


def test_head_loss_hook_replaces_the_chunked_loss(docs):
    model = tiny_model(VOCAB)
    batch = micro_batches(docs)[0]
    calls = []

    def full_logits(hidden, weight, labels):
        calls.append(hidden.shape)
        return losses.cross_entropy_sum(hidden @ weight.T, labels)

    hooked = train.loss_sum(model, batch, head_loss=full_logits)
    assert calls and calls[0][-1] == model.config.hidden_size  # the hook got the final hidden states
    assert hooked.item() == pytest.approx(train.loss_sum(model, batch).item(), rel=1e-5)


def _fp16_batch(vocab: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 24), generator=generator)
    return [{"input_ids": ids, "labels": ids.clone()}]


def test_fp16_loss_scaling_trains_and_skips_overflowing_steps():
    """The path a T4 takes (no bf16): fp16 autocast with a GradScaler, run here on the CPU.

    A first scale of 2**40 makes the fp16 backward overflow: the scaler must skip those steps (weights
    untouched, scale halved each time) until the scale fits, and the loss must then fall with every
    recorded loss finite.
    """
    model = tiny_model(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    start = [p.detach().clone() for p in model.parameters()]
    step_losses, skipped = [], 0
    for _ in range(50):
        scale_before = scaler.get_scale()
        step_losses.append(train.optimizer_step(model, optimizer, _fp16_batch(), autocast_dtype=torch.float16,
                                                scaler=scaler, fused_head=False))
        skipped += scaler.get_scale() < scale_before
        if skipped and len(step_losses) == skipped:  # only skipped steps so far: nothing moved
            assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    assert skipped >= 1 and scaler.get_scale() < 2.0**40
    assert all(math.isfinite(loss) for loss in step_losses)
    assert step_losses[-1] < 0.7 * step_losses[skipped]  # it learns once the scale fits


def test_train_counts_the_steps_loss_scaling_skipped():
    """``train`` with fp16 autocast (CPU here, a T4 there) reports the steps its GradScaler skipped and
    that no inf/NaN step went ahead. A loss scaled by 1e6 overflows fp16 gradients at GradScaler's first
    scale (2**16): steps are skipped, the scale halves, until it fits; AdamW ignores the loss's scale."""
    model = tiny_model(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stats = train.train(model, optimizer, iter(_fp16_batch() * 60), steps=60, autocast_dtype=torch.float16,
                        loss_fn=lambda m, mb: 1e6 * m(**mb).loss, progress=False)
    assert stats.skipped_steps >= 1, "a loss of 1e6 x should overflow fp16 gradients at scale 2**16"
    assert stats.skipped_steps < 60 and stats.unskipped_nonfinite == 0
    finite = [loss for loss in stats.losses if math.isfinite(loss)]
    assert finite[-1] < 0.9 * finite[0], "it learns once the scale fits"
    plain = train.train(tiny_model(64), torch.optim.AdamW(model.parameters()), iter(_fp16_batch() * 2),
                        steps=2, progress=False)
    assert plain.skipped_steps == 0 and plain.unskipped_nonfinite == 0  # no scaler: nothing to skip


def test_train_warns_when_every_fp16_step_overflows():
    """An fp16 forward that itself makes inf (a loss of inf here) overflows at every scale: each step is
    skipped, the scale halves towards 0, ``train`` says what to change, and counts every step as skipped
    (at a scale of 0 the scale no longer falls, but the scaler still skips)."""
    model = tiny_model(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="overflowed at a scale of 1, which no longer enlarges"):
        stats = train.train(model, optimizer, iter(_fp16_batch() * 170), steps=170,
                            autocast_dtype=torch.float16, progress=False,
                            loss_fn=lambda m, mb: m(**mb).loss * float("inf"))
    assert stats.skipped_steps == 170 and stats.unskipped_nonfinite == 0
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
