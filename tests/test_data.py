"""data: encoding, packing (exact row length, restarted positions, masked boundaries), padding, streams."""

import pytest
import torch

from recipes_lib.core import batches, tasks
from recipes_lib.core.batches import Document
from recipes_lib.core.losses import IGNORE_INDEX


def _docs(lengths, start=1):
    """Documents of distinct non-zero tokens (0 is the pad id), labels = ids."""
    docs, token = [], start
    for n in lengths:
        ids = list(range(token, token + n))
        token += n
        docs.append(Document(ids, list(ids)))
    return docs


def test_encode_masks_the_prompt(tokenizer):
    ex = tasks.Example("add", "add: 12 + 30 =>", "42")
    [doc] = batches.encode(tokenizer, [ex])
    prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(" 42", add_special_tokens=False)["input_ids"]
    assert doc.input_ids == [tokenizer.bos_token_id, *prompt, *answer, tokenizer.eos_token_id]
    n = 1 + len(prompt)
    assert doc.labels[:n] == [IGNORE_INDEX] * n
    assert doc.labels[n:] == [*answer, tokenizer.eos_token_id]
    assert tokenizer.decode(doc.labels[n:-1]).strip() == "42"

    [pre] = batches.encode(tokenizer, [ex], train_on_prompt=True)
    assert pre.input_ids == doc.input_ids
    assert pre.labels == [IGNORE_INDEX] + doc.input_ids[1:]


def test_random_documents_shape_and_determinism():
    docs = batches.random_documents(20, vocab_size=10, min_len=3, max_len=6, seed=2)
    assert len(docs) == 20
    assert all(3 <= len(d.input_ids) <= 6 and d.labels == d.input_ids for d in docs)
    assert all(0 <= t < 10 for d in docs for t in d.input_ids)
    again = batches.random_documents(20, 10, 3, 6, seed=2)
    assert [d.input_ids for d in docs] == [d.input_ids for d in again]


def test_pack_rows_layout():
    lengths = [5, 4, 6, 3, 7, 2, 8]
    docs = _docs(lengths)
    rows = batches.pack_rows(docs, seq_len=12)
    assert len(rows) > 1
    for row in rows:
        for key in ("input_ids", "labels", "position_ids"):
            assert row[key].shape == (12,)

    # No token lost or duplicated, and the order of documents is kept.
    ids = torch.cat([r["input_ids"] for r in rows])
    assert int((ids != 0).sum()) == sum(lengths)
    assert ids[ids != 0].tolist() == [t for d in docs for t in d.input_ids]

    # position_ids restart at 0 at every document; the first label of each document is masked.
    starts = []
    for row in rows:
        real = row["input_ids"] != 0
        pos, labels, row_ids = row["position_ids"][real], row["labels"][real], row["input_ids"][real]
        for i in range(len(pos)):
            if pos[i] == 0:
                starts.append(int(row_ids[i]))
                assert labels[i] == IGNORE_INDEX
            else:
                assert pos[i] == pos[i - 1] + 1
                assert labels[i] == row_ids[i]  # the rest of the labels are kept
        # Padding is never scored.
        assert torch.all(row["labels"][~real] == IGNORE_INDEX)
    assert starts == [d.input_ids[0] for d in docs]


def test_pack_rows_keeps_document_labels_masking():
    doc = Document([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4])
    [row] = batches.pack_rows([doc, doc], seq_len=10)
    assert row["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 3, 4] * 2 + [IGNORE_INDEX] * 2
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_pack_rows_exact_fit_and_truncation():
    rows = batches.pack_rows(_docs([4, 4, 9]), seq_len=8)
    assert len(rows) == 2
    assert int((rows[0]["input_ids"] != 0).sum()) == 8  # 4 + 4 fill the row exactly, no padding
    assert rows[1]["input_ids"].tolist() == list(range(9, 17))  # the 9-token document is cut to 8
    assert rows[1]["position_ids"].tolist() == list(range(8))


def test_pad_batch_masks():
    docs = [Document([7, 8, 9], [IGNORE_INDEX, 8, 9]), Document([5], [5])]
    batch = batches.pad_batch(docs, pad_id=3)
    assert batch["input_ids"].tolist() == [[7, 8, 9], [5, 3, 3]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 8, 9], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]

    wide = batches.pad_batch(docs, pad_id=3, pad_to=5)
    assert wide["input_ids"].shape == (2, 5)
    assert wide["attention_mask"].sum().item() == 4
    narrow = batches.pad_batch(docs, pad_id=3, pad_to=2)
    assert narrow["input_ids"].tolist() == [[7, 8], [5, 3]]


def test_stack_rows():
    rows = batches.pack_rows(_docs([3, 3, 3, 3]), seq_len=6)
    batch = batches.stack_rows(rows)
    assert batch["input_ids"].shape == (2, 6)
    assert torch.equal(batch["input_ids"][1], rows[1]["input_ids"])


def test_packed_batches_stream():
    docs = _docs([5] * 12)
    stream = batches.packed_batches(docs, seq_len=10, batch_size=2, seed=0)  # 6 rows -> 3 batches per epoch
    drawn = [next(stream) for _ in range(7)]  # goes past one epoch: endless
    assert all(b["input_ids"].shape == (2, 10) for b in drawn)
    epoch = torch.cat([b["input_ids"] for b in drawn[:3]]).flatten()
    assert sorted(epoch.tolist()) == list(range(1, 61))  # each row once per epoch


def test_packed_batches_too_few_rows():
    with pytest.raises(ValueError, match="batch_size"):
        batches.packed_batches(_docs([5, 5]), seq_len=10, batch_size=2)


def test_padded_batches_stream():
    docs = _docs([2, 5, 3, 4])
    stream = batches.padded_batches(docs, batch_size=2, pad_id=0, seed=1)
    first_epoch = [next(stream) for _ in range(2)]
    for b in first_epoch:
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())
    assert sorted(int(n) for b in first_epoch for n in b["attention_mask"].sum(1)) == [2, 3, 4, 5]
