"""`recipes export axolotl`: every shipped config exports to keys of Axolotl's schema with the same run's
settings; keys with no equivalent are named; the README's mapping table is the code's; bad input gets
one clear message. Where Axolotl's schema imports (scripts/axolotl_keys.py says how), the files are also
validated by its pydantic models."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from recipes_lib.app import cli, config, export

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))


def _export(tmp_path, config_path, *extra, gpus=1) -> dict:
    out = tmp_path / f"{Path(config_path).stem}.axolotl.yaml"
    assert cli.main(["export", "axolotl", str(config_path), *extra, "-o", str(out), "--gpus", str(gpus)]) == 0
    return yaml.safe_load(out.read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_exports_to_axolotl_keys(tmp_path, path):
    cfg = config.load(path)
    gpus = 2 if cfg.train.strategy != "single" else 1
    out = _export(tmp_path, path, gpus=gpus)
    assert set(out) <= export.schema_keys()
    assert out["base_model"] == cfg.model.source and out["sequence_len"] == cfg.data.seq_len
    assert out["micro_batch_size"] * out["gradient_accumulation_steps"] * gpus == cfg.train.global_batch
    assert out["sample_packing"] == cfg.data.packing and out["learning_rate"] == cfg.optim.lr
    assert (out["lr_scheduler"], out["cosine_min_lr_ratio"], out["warmup_steps"]) == \
        ("cosine", 0.1, cfg.optim.warmup_steps)
    assert out["datasets"][0]["path"] == cfg.data.source
    assert out.get("adapter") == (None if cfg.model.method == "full" else cfg.model.method)
    assert out.get("load_in_4bit", False) == (cfg.model.method == "qlora")
    if cfg.train.strategy == "fsdp2":
        assert out["fsdp_version"] == 2
        assert out["fsdp_config"]["transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert out["fsdp_config"]["reshard_after_forward"] == cfg.train.reshard
    if cfg.train.strategy in ("zero2", "zero3"):
        assert out["deepspeed"]["zero_optimization"]["stage"] == int(cfg.train.strategy[-1])


def test_keys_without_an_equivalent_are_named(tmp_path, capsys):
    base = REPO / "configs" / "lora-tiny-cpu.yaml"
    _export(tmp_path, base, "model.sliding_window=64", "model.checkpointing=true", "model.checkpoint_every=2",
            "train.eval_batches=3", "data.seed=5")
    err = capsys.readouterr().err
    for key in ("model.sliding_window=64", "model.checkpoint_every=2", "train.eval_batches=3", "data.seed=5"):
        assert f"warning: {key}" in err, err
    assert "note: not exported, at their defaults" in err and "log.progress" in err
    written = (tmp_path / "lora-tiny-cpu.axolotl.yaml").read_text()
    assert "# warning: model.sliding_window=64 has no Axolotl equivalent" in written


def test_every_key_is_mapped_or_named_and_the_readme_has_the_table():
    assert set(config.keys()) == set(export.MAPPING) | set(export.UNMAPPED)
    assert not set(export.MAPPING) & set(export.UNMAPPED)
    assert export.mapping_markdown() in (REPO / "README.md").read_text()


def test_bad_input_gets_one_clear_message(tmp_path, capsys):
    assert cli.main(["export", "axolotl", "configs/no-such.yaml"]) == 2
    assert "config 'configs/no-such.yaml' does not exist" in capsys.readouterr().err
    rows = tmp_path / "qa.jsonl"
    rows.write_text(json.dumps({"question": "copy: a =>", "answer": "a"}) + "\n")
    assert cli.main(["export", "axolotl", "configs/lora-tiny-cpu.yaml", f"data.source={rows}",
                     "-o", str(tmp_path / "x.yaml")]) == 2
    assert "column 'prompt' is not in" in capsys.readouterr().err
    assert cli.main(["export", "axolotl", "configs/lora-tiny-cpu.yaml", "--gpus", "3", "-o",
                     str(tmp_path / "y.yaml")]) == 2
    assert "not a multiple of train.micro_batch=4 x --gpus=3" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("axolotl") is None,
                    reason="Axolotl's schema is not importable (scripts/axolotl_keys.py says how)")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_exported_configs_validate_with_axolotls_schema(tmp_path, path):
    sys.path.insert(0, str(REPO / "scripts"))
    import axolotl_keys

    gpus = 2 if config.load(path).train.strategy != "single" else 1
    _export(tmp_path, path, gpus=gpus)
    assert axolotl_keys.validate(str(tmp_path / f"{path.stem}.axolotl.yaml"), gpus) == []
