"""Structured pruning: the student's shape, its weights cut from the teacher's important channels, heads
and neurons, the depth-only special case, and the shape carried from a large teacher to a small one."""

import itertools

import pytest
import torch
from conftest import tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from recipes_lib.core import batches, models, tasks
from recipes_lib.core.errors import RecipeError
from recipes_lib.inference import distill, prune
from recipes_lib.measure import decode_cost, decode_sweep

WIDE = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=128)  # head_dim 8, two query heads per key/value head


def _calibration(vocab=64, n=3, seed=0):
    ids = torch.randint(0, vocab, (n, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, 8:] = 0  # padding is not measured
    return [{"input_ids": ids, "attention_mask": mask}]


def test_pruned_shapes_are_student_config():
    teacher = tiny_model(**WIDE)
    student = prune.prune_student(teacher, 2, 1, _calibration())
    config = decode_cost.student_config(teacher.config, 2, 1)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.num_hidden_layers) == (16, 2, 1, 32, 2)
    reference = type(teacher)(config)
    assert {k: v.shape for k, v in student.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    student(**_calibration()[0])  # and it runs


def test_full_width_is_make_students_depth_only_copy():
    teacher = tiny_model(**WIDE)
    pruned, copied = prune.prune_student(teacher, 2, 4, _calibration()), distill.make_student(teacher, 2)
    assert pruned.config.hidden_size == teacher.config.hidden_size
    expected = copied.state_dict()
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_importance_drops_what_the_teacher_never_uses():
    """Channels, key/value heads and neurons zeroed in the teacher are the ones cut."""
    teacher = tiny_model(**WIDE)
    dead = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:32]
    live = torch.tensor(sorted(set(range(64)) - set(dead.tolist())))
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, dead] = 0  # tied with the LM head
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
        last = teacher.model.layers[3]
        last.self_attn.v_proj.weight[0:8] = 0     # key/value head 0: its group's output is zero
        last.self_attn.v_proj.weight[16:24] = 0   # key/value head 2
        last.mlp.up_proj.weight[64:] = 0           # the upper half of the neurons
    student = prune.prune_student(teacher, 2, 2, _calibration())  # teacher layers [0, 3]
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, live])
    kept_kv = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
    torch.testing.assert_close(student.model.layers[1].self_attn.v_proj.weight,
                               last.self_attn.v_proj.weight[kept_kv][:, live], rtol=0, atol=0)
    kept_q = torch.cat([torch.arange(16, 32), torch.arange(48, 64)])  # the query heads of kv heads 1, 3
    torch.testing.assert_close(student.model.layers[1].self_attn.o_proj.weight,
                               last.self_attn.o_proj.weight[live][:, kept_q], rtol=0, atol=0)
    torch.testing.assert_close(student.model.layers[1].mlp.down_proj.weight,
                               last.mlp.down_proj.weight[live][:, :64], rtol=0, atol=0)
    scores = prune.importance(teacher, _calibration(), [3])
    assert scores["hidden"][dead].max() == 0 and scores["hidden"][live].min() > 0
    assert scores["groups"][3][[0, 2]].max() == 0 and scores["groups"][3][[1, 3]].min() > 0


def _correlation(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_pruned_student_predicts_like_its_teacher():
    """On the embedded (trained) model's task text, a student of half the depth and 3/4 of the width
    pruned from it has logits that follow the teacher's far better than a random initialisation of the
    same shape (Pearson r over all logits, measured: 0.49 against 0.005; 0.86 at full depth)."""
    teacher = models.load_model("data/tiny-llama", dtype=torch.float32)
    tokenizer = models.load_tokenizer("data/tiny-llama")
    docs = batches.encode(tokenizer, tasks.make_examples(24, seed=5), train_on_prompt=True)
    calibration = list(itertools.islice(batches.padded_batches(docs, 8, tokenizer.pad_token_id), 2))
    held_out = next(batches.padded_batches(batches.encode(tokenizer, tasks.make_examples(8, seed=6),
                                                          train_on_prompt=True), 8, tokenizer.pad_token_id))
    pruned = prune.prune_student(teacher, 2, 3, calibration)
    random = type(teacher)(pruned.config)
    inputs = {"input_ids": held_out["input_ids"], "attention_mask": held_out["attention_mask"]}
    with torch.no_grad():
        real = held_out["attention_mask"].bool()
        t, p, r = (m(**inputs).logits[real] for m in (teacher, pruned, random))
    pruned_r, random_r = _correlation(t, p), _correlation(t, r)
    print(f"logit correlation with the teacher: pruned {pruned_r:.3f}, random {random_r:.3f}")
    assert pruned_r > 0.35 and abs(random_r) < 0.1


def test_scaled_shape_from_the_8b_shape_to_the_embedded_model():
    big, small = decode_sweep.shape_config("llama-3.1-8b"), models.load_model("data/tiny-llama").config
    assert (big.num_hidden_layers, big.num_key_value_heads) == (32, 8)
    assert prune.scaled_shape({"layers": 16, "num_key_value_heads": 4}, big, small) == (2, 2)
    assert prune.scaled_shape({"layers": 32, "num_key_value_heads": 1}, big, small) == (4, 1)  # 0.5 -> 1
    assert prune.scaled_shape({"layers": 3, "num_key_value_heads": 8}, big, small) == (1, 4)  # at least 1
    assert prune.scaled_shape(decode_cost.student_config(big, 24, 6), big, small) == (3, 3)


def test_what_cannot_be_pruned_is_refused():
    with pytest.raises(RecipeError, match="Llama-family"):
        prune.prune_student(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)), 1, 1,
                            _calibration())
    with pytest.raises(RecipeError, match="not smaller"):
        prune.prune_student(tiny_model(**WIDE), 4, 4, _calibration())
    with pytest.raises(RecipeError, match="does not fit"):
        prune.prune_student(tiny_model(**WIDE), 2, 5, _calibration())
