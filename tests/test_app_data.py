"""recipes_lib.app.data: the run's data config, loading (files, folders, formats), labels, the
validation split, the error messages, and the resumable micro-batch stream (packed and padded)."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import warnings
from pathlib import Path

import datasets
import pandas as pd
import pydantic
import pytest
import torch
from transformers import AutoTokenizer

from recipes_lib.app import data
from recipes_lib.app.batching import MicroBatches
from recipes_lib.app.data import DataConfig, load_documents, micro_batches
from recipes_lib.core import batches, tasks
from recipes_lib.core.batches import Document
from recipes_lib.core.errors import RecipeError
from recipes_lib.core.losses import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "tiny-llama"
# A small template: a <s> once, "role: content" lines, </s> closing each assistant turn.
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<s>' if loop.first else '' }}"
                 "{{ m['role'] }}: {{ m['content'] }}\n"
                 "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
ROWS = [{"prompt": f"add: {a} + {b} =>", "response": str(a + b), "note": "x"} for a, b in
        [(12, 30), (45, 11), (20, 20), (33, 44), (10, 99), (57, 21), (64, 18), (71, 15)]]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture
def chat_tok():
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(**fields) -> DataConfig:
    return DataConfig(**{"validation_fraction": 0.0, "seq_len": 256, **fields})


def scored(doc: Document) -> list[int]:
    return [t for t, label in zip(doc.input_ids, doc.labels) if label != IGNORE_INDEX]


def take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# --- config ---------------------------------------------------------------------------------------

def test_config_defaults_and_descriptions():
    c = DataConfig()
    assert (c.source, c.format, c.packing, c.seq_len, c.train_on_prompt) == (
        "data/instruct.jsonl", "prompt_response", True, 512, False)
    assert all(f.description for f in DataConfig.model_fields.values())


@pytest.mark.parametrize("field, value, words", [
    ("format", "sharegpt", ["format", "prompt_response", "chat", "text", "use"]),
    ("seq_len", 8, ["seq_len", "at least 16"]),
    ("validation_fraction", 0.5, ["validation_fraction", "[0, 0.5)", "use 0"]),
    ("validation_fraction", -0.1, ["validation_fraction", "[0, 0.5)"]),
    ("max_examples", 0, ["max_examples", "positive", "null"]),
    ("num_workers", -1, ["num_workers", "use 0"]),
    ("prompt_column", " ", ["prompt_column", "empty"]),
    ("seqlen", 64, ["seqlen", "Extra inputs are not permitted"]),
])
def test_config_errors_name_key_choices_and_fix(field, value, words):
    with pytest.raises(pydantic.ValidationError) as err:
        DataConfig(**{field: value})
    for word in words:
        assert word in str(err.value)


# --- the shipped data -----------------------------------------------------------------------------

def test_shipped_datasets_are_the_build_scripts_output():
    path = ROOT / "scripts/build_instruct_data.py"
    spec = importlib.util.spec_from_file_location("build_instruct_data", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    instruct, chat = ROOT / "data/instruct.jsonl", ROOT / "data/instruct_chat.jsonl"
    assert instruct.stat().st_size < 400_000
    rows = [json.loads(line) for line in instruct.read_text().splitlines()]
    assert rows == script.instruct_rows(2000, seed=15)
    assert {r["task"] for r in rows} == {"reverse", *tasks.TASKS}
    conversations = [json.loads(line) for line in chat.read_text().splitlines()]
    assert conversations == script.chat_rows(200, seed=16)
    assert all(m["role"] in ("system", "user", "assistant") for c in conversations for m in c["messages"])


def test_tiny_llama_tokenizer_has_the_special_tokens(tok):
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3


# --- loading and labels ---------------------------------------------------------------------------

def test_prompt_response_matches_core_encode_and_scores_response_only(tok):
    train, val = load_documents(cfg(max_examples=60, seq_len=512), tok)
    rows = [json.loads(line) for line in (ROOT / "data/instruct.jsonl").read_text().splitlines()[:60]]
    expected = batches.encode(tok, [tasks.Example(r["task"], r["prompt"], r["response"]) for r in rows])
    assert (train, val) == (expected, [])
    for doc, row in zip(train, rows):
        n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
        assert doc.labels[:1 + n_prompt] == [IGNORE_INDEX] * (1 + n_prompt)
        assert tok.decode(scored(doc)) == " " + row["response"] + tok.eos_token


def test_train_on_prompt_scores_everything_but_bos(tok):
    (doc, *_), _ = load_documents(cfg(max_examples=4, train_on_prompt=True), tok)
    assert doc.labels == [IGNORE_INDEX] + doc.input_ids[1:]


def test_text_format(tmp_path, tok):
    texts = [{"text": "copy: a b => a b"}, {"text": ""}, {"text": "sort: 3 1"}]
    source = write_jsonl(tmp_path / "t.jsonl", texts)
    docs, _ = load_documents(cfg(source=source, format="text"), tok)
    assert len(docs) == 2  # the empty text is dropped
    assert docs[0].input_ids[0] == tok.bos_token_id and docs[0].input_ids[-1] == tok.eos_token_id
    assert tok.decode(docs[0].input_ids[1:-1]) == "copy: a b => a b"
    assert docs[0].labels == [IGNORE_INDEX] + docs[0].input_ids[1:]


def test_chat_scores_assistant_turns_only(chat_tok):
    train, _ = load_documents(cfg(source=str(ROOT / "data/instruct_chat.jsonl"), format="chat", seq_len=512,
                                  max_examples=30), chat_tok)
    rows = [json.loads(line) for line in (ROOT / "data/instruct_chat.jsonl").read_text().splitlines()[:30]]
    assert len(train) == 30
    for doc, row in zip(train, rows):
        assert chat_tok.decode(doc.input_ids) == chat_tok.apply_chat_template(row["messages"], tokenize=False)
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert chat_tok.decode(scored(doc)) == "".join(f" {a}\n</s>" for a in answers)
    two_turns = next(d for d, r in zip(train, rows) if len(r["messages"]) >= 4)
    unscored = chat_tok.decode([t for t, label in zip(two_turns.input_ids, two_turns.labels) if label < 0])
    assert "user:" in unscored and "assistant:" in unscored and "</s>" not in unscored


def test_chat_train_on_prompt_and_rows_without_assistant(tmp_path, chat_tok):
    messages = [{"role": "user", "content": "copy: a =>"}, {"role": "assistant", "content": "a"}]
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}, {"messages": messages[:1]}])
    docs, _ = load_documents(cfg(source=source, format="chat", train_on_prompt=True), chat_tok)
    assert len(docs) == 1 and docs[0].labels == [IGNORE_INDEX] + docs[0].input_ids[1:]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet", "saved"])
def test_loads_files_and_saved_folders(tmp_path, tok, suffix):
    frame = pd.DataFrame(ROWS)
    path = tmp_path / f"d.{suffix}"
    if suffix in ("jsonl", "json"):
        frame.to_json(path, orient="records", lines=suffix == "jsonl")
    elif suffix == "csv":
        frame.to_csv(path, index=False)  # read back, the sums are integers: converted to text
    elif suffix == "parquet":
        frame.to_parquet(path)
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(path))
    docs, _ = load_documents(cfg(source=str(path)), tok)
    assert tok.decode(scored(docs[0])) == " 42" + tok.eos_token and len(docs) == len(ROWS)


def test_validation_split_disjoint_and_deterministic(tok):
    c = cfg(max_examples=200, validation_fraction=0.1, seed=3)
    train, val = load_documents(c, tok)
    assert (len(train), len(val)) == (180, 20)
    key = [tuple(d.input_ids) for d in train], [tuple(d.input_ids) for d in val]
    assert not set(key[0]) & set(key[1])
    again = load_documents(c, tok)
    assert again == (train, val)
    _, other = load_documents(c.model_copy(update={"seed": 4}), tok)
    assert other != val and len(other) == 20


def test_long_documents_truncated_with_one_warning(tmp_path, tok):
    rows = [{"prompt": "copy: " + "a " * 40 + "=>", "response": "a"}] * 3 + ROWS
    with pytest.warns(UserWarning, match=r"^3 of 11 documents are longer than seq_len=16") as record:
        docs, _ = load_documents(cfg(source=write_jsonl(tmp_path / "d.jsonl", rows), seq_len=16), tok)
    assert len(record) == 1 and max(len(d.input_ids) for d in docs) == 16


def test_tokenised_cache_is_reused_and_keyed(tmp_path, tok, monkeypatch):
    c = cfg(source=write_jsonl(tmp_path / "d.jsonl", ROWS), cache_dir=str(tmp_path / "cache"))
    first = load_documents(c, tok)
    assert list((tmp_path / "cache").glob("tokenized-*.arrow"))

    def fail(*args):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(data, "encode_rows", fail)
    assert load_documents(c, tok) == first  # served from the cache: no tokenisation
    with pytest.raises(AssertionError, match="tokenised again"):  # another setting: another cache file
        load_documents(c.model_copy(update={"train_on_prompt": True}), tok)


# --- error messages -------------------------------------------------------------------------------

def test_missing_source_lists_accepted_formats(tok):
    with pytest.raises(RecipeError, match=r"data/nope\.jsonl does not exist: give a \.jsonl, \.json, \.parq"):
        load_documents(cfg(source="data/nope.jsonl"), tok)


def test_unreadable_suffix(tmp_path, tok):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(RecipeError, match=r"'\.txt' files are not read; give a \.jsonl"):
        load_documents(cfg(source=str(tmp_path / "d.txt")), tok)


def test_missing_column_names_it_the_columns_and_the_key(tmp_path, tok):
    source = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(RecipeError) as err:
        load_documents(cfg(source=source), tok)
    assert "column 'prompt'" in str(err.value) and "['question', 'answer']" in str(err.value)
    assert "set prompt_column" in str(err.value)
    templated = AutoTokenizer.from_pretrained(TINY, chat_template="x")
    with pytest.raises(RecipeError, match="column 'messages'.*set messages_column"):
        load_documents(cfg(source=source, format="chat"), templated)


def test_empty_dataset_and_empty_after_filtering(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RecipeError, match="has no rows"):
        load_documents(cfg(source=str(tmp_path / "empty.jsonl")), tok)
    blank = [{"prompt": "p", "response": " "}, {"prompt": "p", "response": None}]
    source = write_jsonl(tmp_path / "blank.jsonl", blank)
    with pytest.raises(RecipeError, match="all 2 rows are empty after filtering"):
        load_documents(cfg(source=source), tok)


def test_chat_without_template_says_how_to_fix(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = None  # the embedded tokenizer ships one: take it away
    with pytest.raises(RecipeError, match="chat template.*set tokenizer.chat_template.*format: prompt_resp"):
        load_documents(cfg(source=str(ROOT / "data/instruct_chat.jsonl"), format="chat"), tok)


def test_unstable_chat_template_is_refused(tmp_path, chat_tok):
    chat_tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                             {"role": "assistant", "content": "b"}]}])
    with pytest.raises(RecipeError, match="prefixes are stable"):
        load_documents(cfg(source=source, format="chat"), chat_tok)


@pytest.mark.parametrize("packing", [True, False])
def test_too_few_documents_for_one_micro_batch(packing):
    docs = [Document([1, 5, 6, 2], [-100, 5, 6, 2])] * 3
    with pytest.raises(RecipeError, match="fewer than one micro-batch of 4"):
        micro_batches(docs, cfg(packing=packing, seq_len=16), 4, 0, 0)


# --- micro-batches --------------------------------------------------------------------------------

def toy_docs(n: int = 30) -> list[Document]:
    gen = torch.Generator().manual_seed(0)
    docs = []
    for i in range(n):
        length = int(torch.randint(3, 30, (1,), generator=gen))
        ids = [1] + torch.randint(3, 50, (length,), generator=gen).tolist()
        docs.append(Document(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return docs


def test_packed_batches_shapes_positions_and_padding():
    docs = toy_docs()
    batch = next(micro_batches(docs, cfg(seq_len=32), 3, pad_id=99, epoch_seed=0))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(v.shape == (3, 32) and v.dtype == torch.long for v in batch.values())
    for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        starts = (pos == 0).nonzero().flatten().tolist()
        assert len(starts) >= 2  # documents (and the padding tail) restart their positions
        assert all(labels[s] == IGNORE_INDEX for s in starts)  # never predict across a boundary
        tail = ids == 99  # toy tokens are < 50
        assert (labels[tail] == IGNORE_INDEX).all()


def test_padded_batches_shapes_and_mask():
    docs = toy_docs()
    stream = micro_batches(docs, cfg(seq_len=20, packing=False), 4, pad_id=7, epoch_seed=0)
    for batch in take(stream, 10):
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 20
        assert (batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1])  # padded to the longest
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 7).all()
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_padded_epoch_covers_every_document_once():
    docs = [Document([1, i, 2], [IGNORE_INDEX, i, 2]) for i in range(10, 22)]
    epoch = take(micro_batches(docs, cfg(seq_len=16, packing=False), 4, 0, epoch_seed=5), 3)
    seen = sorted(int(t) for b in epoch for t in b["input_ids"][:, 1])
    assert seen == list(range(10, 22))
    next_epoch = take(micro_batches(docs, cfg(seq_len=16, packing=False), 4, 0, epoch_seed=5, skip=3), 3)
    assert not same_batches(epoch, next_epoch)  # reshuffled


@pytest.mark.parametrize("packing", [True, False])
def test_skip_resumes_exactly_across_epochs(packing, monkeypatch):
    docs, c = toy_docs(), cfg(seq_len=32, packing=packing)
    full = take(micro_batches(docs, c, 2, 0, epoch_seed=9), 40)  # several epochs
    for k in (1, 7, 23):
        assert same_batches(take(micro_batches(docs, c, 2, 0, epoch_seed=9, skip=k), 40 - k), full[k:])
    assert same_batches(take(micro_batches(docs, c, 2, 0, epoch_seed=9), 40), full)  # deterministic
    assert not same_batches(take(micro_batches(docs, c, 2, 0, epoch_seed=10), 40), full)
    built = []
    original = data.MicroBatches.build
    monkeypatch.setattr(data.MicroBatches, "build", lambda self, b: built.append(b) or original(self, b))
    take(micro_batches(docs, c, 2, 0, epoch_seed=9, skip=30), 2)
    assert len(built) == 2  # skipped batches are never built


def test_workers_give_the_same_stream():
    docs, c = toy_docs(), cfg(seq_len=32)
    inline = take(micro_batches(docs, c, 2, 0, epoch_seed=1, skip=3), 12)
    workers = micro_batches(docs, c.model_copy(update={"num_workers": 2}), 2, 0, epoch_seed=1, skip=3)
    assert same_batches(take(workers, 12), inline)


def test_shipped_data_through_the_whole_pipeline(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the default seq_len nothing is truncated
        train, val = load_documents(DataConfig(), tok)
    assert (len(train), len(val)) == (1900, 100)
    batch = next(micro_batches(train, DataConfig(), 8, tok.pad_token_id, epoch_seed=0))
    assert batch["input_ids"].shape == (8, 512) and (batch["labels"] != IGNORE_INDEX).sum() > 8


def test_unknown_split_says_which_to_set(tmp_path, tok):
    with pytest.raises(RecipeError, match=r"has no split 'validation'.*set split to one it has"):
        load_documents(cfg(source=write_jsonl(tmp_path / "d.jsonl", ROWS), split="validation"), tok)


def test_best_fit_packing_fills_rows_and_splits_no_document():
    gen = random.Random(0)
    docs = [Document([1] * n, [1] * n) for n in (gen.randint(256, 2047) for _ in range(600))]
    batches = MicroBatches(docs, seq_len=2048, packing=True, micro_batch=8, pad_id=0, epoch_seed=0)
    rows = batches.rows(0)
    assert sorted(i for row in rows for i in row) == list(range(len(docs)))  # each document once, whole
    assert all(sum(len(docs[i].input_ids) for i in row) <= 2048 for row in rows)
    fill = sum(len(d.input_ids) for d in docs) / (2048 * len(rows))
    assert fill > 0.95, f"rows only {fill:.1%} full"
    assert rows != batches.rows(1)  # every epoch packs a new shuffle
