"""models: resolving names, random shapes, loading (quantized too), attention choice, limits, counts."""

import dataclasses
import json
import shutil
import sys
import warnings

import bitsandbytes as bnb
import pytest
import torch
from conftest import checkpointing_on, tiny_config, tiny_model

from recipes_lib.core import hardware, models
from recipes_lib.core.errors import RecipeError

TINY_SHAPE = {"_comment": "a test shape", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 128}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def random_shapes(tmp_path, monkeypatch):
    shapes, cache = tmp_path / "configs", tmp_path / "cache"
    shapes.mkdir()
    (shapes / "tiny.json").write_text(json.dumps(TINY_SHAPE))
    monkeypatch.setattr(models, "SHAPES_DIR", shapes)
    monkeypatch.setattr(models, "CACHE_DIR", cache)
    return cache


@pytest.mark.parametrize("name", ["/no/such/model/dir", "./nope", "~/nope-model", "just-a-name"])
def test_resolve_missing_path(name):
    with pytest.raises(RecipeError, match="MODEL=") as info:
        models.resolve(name)
    assert name in str(info.value)


def test_resolve_local_dir_and_hub_id(tiny_model_dir):
    assert models.resolve(tiny_model_dir) == tiny_model_dir
    assert models.resolve("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # no network needed


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B",
                                    "HuggingFaceTB/SmolLM2-1.7B"])
def test_resolve_hub_ids_with_dots(hub_id):
    assert models.resolve(hub_id) == hub_id


def test_resolve_unknown_random_shape(random_shapes):
    with pytest.raises(RecipeError, match="nope") as info:
        models.resolve("random:nope")
    assert "tiny" in str(info.value)  # lists the known shapes


def test_random_shape_loads_and_is_cached(random_shapes, monkeypatch):
    model = models.load_model("random:tiny")
    assert model.training
    assert model.config.hidden_size == 32 and model.config.num_key_value_heads == 2
    assert not hasattr(model.config, "_comment")
    assert next(model.parameters()).dtype == torch.float32
    target = random_shapes / "random-tiny"
    assert (target / "config.json").exists()

    # The second time it is read from the cache, not built again.
    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached random shape")
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_config", no_rebuild)
    assert models.resolve("random:tiny") == str(target)
    again = models.load_model("random:tiny")
    for a, b in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(a, b)


def test_load_model_defaults(tiny_model_dir):
    model = models.load_model(tiny_model_dir)
    assert model.training  # from_pretrained returns eval mode; load_model switches
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config._attn_implementation == "sdpa"
    assert not checkpointing_on(model)
    eager = models.load_model(tiny_model_dir, attn_implementation="eager", dtype=torch.float64)
    assert eager.config._attn_implementation == "eager"
    assert {p.dtype for p in eager.parameters()} == {torch.float64}


def test_load_model_gradient_checkpointing(tiny_model_dir):
    model = models.load_model(tiny_model_dir, gradient_checkpointing=True)
    assert checkpointing_on(model) and model.training


def test_load_model_missing_weights_is_a_recipe_error(tiny_model_dir, tmp_path):
    shutil.copy(f"{tiny_model_dir}/config.json", tmp_path / "config.json")
    with pytest.raises(RecipeError, match="could not load MODEL"):
        models.load_model(str(tmp_path))


def test_load_tokenizer(tiny_model_dir, tokenizer, tmp_path):
    tok = models.load_tokenizer(tiny_model_dir)
    assert len(tok) == len(tokenizer) and tok.pad_token == "<pad>"
    # Without a pad token, the eos token pads.
    no_pad = models.load_tokenizer(tiny_model_dir)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_load_model_bogus_quantization(tiny_model_dir):
    with pytest.raises(RecipeError, match="bogus"):
        models.load_model(tiny_model_dir, quantization="bogus")


def test_load_model_nf4(tiny_model_dir):
    model = models.load_model(tiny_model_dir, quantization="nf4")
    assert model.training
    for layer in model.model.layers:
        for name in DECODER_LINEARS:
            module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            assert isinstance(module, bnb.nn.Linear4bit), name
            assert module.weight.quant_state.quant_type == "nf4"
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    # A 4-bit weight counts as its number of values: the same total as the unquantized model.
    assert models.count_parameters(model)[1] == models.count_parameters(models.load_model(tiny_model_dir))[1]
    logits = model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def test_nf4_without_bitsandbytes_warns_and_loads_unquantized(tiny_model_dir):
    hw = dataclasses.replace(hardware.detect(), bitsandbytes=False)
    with pytest.warns(UserWarning, match="bitsandbytes"):
        model = models.load_model(tiny_model_dir, quantization="nf4", hw=hw)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_attention_implementation_flash_attention_2_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    with pytest.warns(UserWarning, match="flash-attn"):
        assert models.attention_implementation("flash_attention_2") == "sdpa"


@pytest.mark.parametrize("requested", ["sdpa", "eager", "flex_attention"])
def test_attention_implementation_passes_others_through(requested):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.attention_implementation(requested) == requested


def test_check_seq_len():
    model = tiny_model(64)  # 128 positions
    models.check_seq_len(model, 128)
    models.check_seq_len(model.config, 1)
    with pytest.raises(RecipeError, match="SEQ_LEN=129"):
        models.check_seq_len(model, 129)
    with pytest.raises(RecipeError, match="128"):
        models.check_seq_len(tiny_config(), 4096)
    models.check_seq_len(object(), 10**9)  # no limit known: nothing to check


def test_count_parameters():
    model = tiny_model(64)
    total = sum(p.numel() for p in model.parameters())
    assert models.count_parameters(model) == (total, total)
    model.model.embed_tokens.weight.requires_grad_(False)
    assert models.count_parameters(model) == (total - 64 * 32, total)

    packed = torch.nn.Module()
    packed.w = torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
    packed.b = torch.nn.Parameter(torch.zeros(3))
    assert models.count_parameters(packed) == (3, 8 * 2 + 3)  # two 4-bit values per byte

