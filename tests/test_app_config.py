"""The `recipes train` config: YAML + overrides validated before anything loads, one clear message."""

from pathlib import Path

import pytest

from recipes_lib.app import config
from recipes_lib.core.errors import RecipeError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_and_example_configs_validate():
    assert config.load(None).train.max_steps == 100
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config.load(path)


def test_reference_config_matches_the_code():
    assert (REPO / "configs" / "reference.yaml").read_text() == config.reference_yaml(), \
        "regenerate configs/reference.yaml with recipes_lib.app.config.reference_yaml()"
    text = config.reference_yaml()
    for key, (default, _) in config.keys().items():
        assert f"  {key.split('.')[1]}:" in text


def test_overrides_dotted_and_unique_leaf():
    cfg = config.load(REPO / "configs" / "lora-tiny-cpu.yaml", ["lr=1e-4", "train.max_steps=7",
                                                                "max_grad_norm=null", "method=qlora"])
    assert cfg.optim.lr == 1e-4 and cfg.train.max_steps == 7
    assert cfg.optim.max_grad_norm is None and cfg.model.method == "qlora"
    assert cfg.data.seq_len == 256  # the file's value, untouched


@pytest.mark.parametrize("overrides, expected", [
    (["lerning_rate=1"], "unknown key 'lerning_rate'"),
    (["lr=fast"], "optim.lr"),
    (["method=adapter"], "'full', 'lora' or 'qlora'"),
    (["every=3"], "in several sections"),
    (["max_steps"], "not key=value"),
])
def test_bad_overrides_name_the_key(overrides, expected):
    with pytest.raises(RecipeError, match=expected if "'" not in expected else None) as info:
        config.load(None, overrides)
    assert expected in str(info.value)


def test_unknown_key_in_a_file_suggests_the_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 1e-4\ntrain:\n  max_step: 3\n")
    with pytest.raises(RecipeError) as info:
        config.load(path)
    message = str(info.value)
    assert "unknown key 'optim.learning_rate'" in message and "unknown key 'train.max_step'" in message
    assert "did you mean 'train.max_steps'" in message


@pytest.mark.parametrize("overrides, expected", [
    (["optim.offload=true"], "set optim.max_grad_norm: null"),
    (["method=qlora", "strategy=fsdp2", "cpu_offload=true"], "FSDP2 cannot offload 4-bit weights"),
    (["cpu_offload=true"], "set train.strategy: fsdp2"),
    (["offload_activations=true"], "set model.checkpointing: true"),
    (["optim.offload=true", "max_grad_norm=null", "strategy=ddp"], "runs in one process"),
    (["global_batch=10", "micro_batch=4"], "not a multiple of train.micro_batch=4"),
    (["nf4_base=torch"], "set model.method: qlora"),
    (["method=qlora", "nf4_base=torchao", "strategy=ddp"], "set model.nf4_base: bitsandbytes"),
])
def test_impossible_combinations_are_refused(overrides, expected):
    with pytest.raises(RecipeError) as info:
        config.load(None, overrides)
    assert expected in str(info.value)


def test_differences_ignore_resumable_keys():
    saved = config.load(None).model_dump()
    assert config.differences(saved, config.load(None, ["max_steps=500", "checkpoint.every=5"])) == []
    changed = config.differences(saved, config.load(None, ["lr=1e-3", "lora_r=4"]))
    assert changed == ["model.lora_r: 16 -> 4", "optim.lr: 0.0002 -> 0.001"]


def test_missing_file_and_not_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping of sections"):
        config.load(tmp_path / "list.yaml")


def test_qlora_on_the_torch_base_builds_compiled_layers():
    from recipes_lib.app import trainer
    from recipes_lib.core import hardware
    from recipes_lib.memory import nf4

    cfg = config.load(None, ["method=qlora", "nf4_base=torch", "compile=true", "checkpointing=true"])
    model = trainer.build_model(cfg, hardware.detect("cpu"))
    assert any(isinstance(m, nf4.NF4Linear) for m in model.modules())
    layers = model.get_base_model().model.layers
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)
