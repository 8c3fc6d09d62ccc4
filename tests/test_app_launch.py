"""`recipes train` under `accelerate launch` and DeepSpeed: the shipped Accelerate files are ones Accelerate
reads and fit the shipped configs, a contradiction between the two is one clear message, the DeepSpeed
JSON files give the config notebook 02 builds; FSDP-QLoRA through the command; and, where DeepSpeed
is installed, a ZeRO-3 run that resumes exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from conftest import tiny_model

from recipes_lib.app import config, deepspeed_zero, distributed, launch, logs, trainer
from recipes_lib.core import train
from recipes_lib.core.errors import RecipeError
from recipes_lib.parallel import launcher

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = REPO / "configs" / "accelerate"
FITS = {"zero2": ("zero3.yaml", ["strategy=zero2"]), "zero3": ("zero3.yaml", []),
        "fsdp2": ("fsdp2-full.yaml", [])}


def _launch_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/accelerate/<name>.yaml` gives its processes,
    computed by Accelerate's own launch code (what `launch_command` does before it starts them)."""
    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / f"{name}.yaml"),
                                               "-m", "recipes_lib", "train", "CONFIG"])
    args, defaults, mixed_precision_from_file = _validate_launch_command(args)
    if not args.use_deepspeed:
        return prepare_multi_gpu_env(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_file else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return prepare_deepspeed_cmd_env(args)[1]


def _config(name: str, *extra: str) -> config.RunConfig:
    file, overrides = FITS[name]
    return config.load(REPO / "configs" / file, [*overrides, *extra])


@pytest.mark.parametrize("name", sorted(FITS))
def test_accelerate_files_hold_only_keys_accelerate_knows(name):
    path = ACCELERATE / f"{name}.yaml"
    settings = load_config_from_file(str(path))  # refuses an unknown top-level key
    known = {action.dest for action in launch_command_parser()._actions}
    for section, prefix in (("deepspeed_config", ""), ("fsdp_config", "fsdp_")):
        for key in getattr(settings, section):  # launch copies these onto its own options, unchecked
            option = key if key.startswith(prefix) else prefix + key
            assert option in known, f"{path.name}: {section}.{key} is no `accelerate launch` option"
    json_file = settings.deepspeed_config.get("deepspeed_config_file")
    assert json_file is None or (REPO / json_file).is_file()
    assert settings.mixed_precision is None  # model.precision decides (module docstring of app.launch)


@pytest.mark.parametrize("name", sorted(FITS))
def test_each_accelerate_file_fits_its_config_and_refuses_the_others(name):
    env = _launch_env(name)
    launch.check(_config(name), env)
    other = "fsdp2" if name != "fsdp2" else "zero3"
    with pytest.raises(RecipeError, match="the Accelerate config file says distributed_type"):
        launch.check(_config(other), env)
    if name == "zero3":
        with pytest.raises(RecipeError, match="zero_optimization.stage=3, but train.strategy is zero2"):
            deepspeed_zero.engine_config(_config("zero2"), 1, 16, True, tiny_model(),
                                         launch.deepspeed_file(env))


@pytest.mark.parametrize("change, overrides, expected", [
    ({"ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,zero_stage,mixed_precision"}, [],
     "sets zero_stage, mixed_precision"),
    ({"FSDP_VERSION": "1"}, [], "fsdp_version: 2"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "false"}, [], "set train.reshard: false"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, [], "set train.cpu_offload: true"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, ["checkpointing=false"], "set model.checkpointing: true"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, ["precision=bf16"], "model.precision decides"),
])
def test_accelerate_settings_the_config_does_not_follow_are_refused(change, overrides, expected):
    name = "zero3" if "ACCELERATE_CONFIG_DS_FIELDS" in change else "fsdp2"
    with pytest.raises(RecipeError, match=expected):
        launch.check(_config(name, *overrides), _launch_env(name) | change)
    launch.check(_config(name, *overrides), _launch_env(name))  # the file as shipped: fine


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_json_gives_the_config_notebook_02_builds(stage):
    cfg, model = _config(stage, "max_grad_norm=0.5"), train.LossModel(tiny_model())
    built = deepspeed_zero.engine_config(cfg, 4, 2, True, model)
    shipped = str(REPO / "configs" / "deepspeed" / f"{stage}.json")
    from_file = deepspeed_zero.engine_config(cfg, 4, 2, True, model, shipped)
    assert from_file == built
    assert built["train_batch_size"] == 2 * 2 * 4 and built["gradient_clipping"] == 0.5
    assert built["zero_optimization"]["stage"] == config.DEEPSPEED[stage]
    if stage == "zero3":  # zero.tune filled the "auto" buckets from the model's shapes
        assert built["zero_optimization"]["stage3_param_persistence_threshold"] == 64 * 32


@pytest.mark.parametrize("content, expected", [
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4 but this run uses 2"),
    ({"gradient_clipping": 2.0}, "optim.max_grad_norm"),
    ({"bf16": {"enabled": False}}, "model.precision"),
    ({"optimizer": {"type": "Adam"}}, "steps its own AdamW"),
])
def test_deepspeed_json_that_contradicts_the_run_is_refused(tmp_path, content, expected):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}} | content))
    with pytest.raises(RecipeError, match=expected):
        deepspeed_zero.engine_config(_config("zero2"), 2, 2, True, tiny_model(), str(path))


@pytest.mark.parametrize("overrides, expected", [
    (["strategy=zero3", "method=qlora"], "set train.strategy: fsdp2 (FSDP-QLoRA)"),
    (["strategy=zero2", "precision=fp16"], "run bf16 or fp32 here"),
])
def test_impossible_deepspeed_combinations(overrides, expected):
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        config.load(None, overrides)


def test_zero_without_deepspeed_says_how_to_install_it_before_anything_loads(monkeypatch):
    monkeypatch.setattr(deepspeed_zero.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RecipeError, match="`pip install deepspeed`"):
        distributed.setup(config.load(None, ["strategy=zero3"]))


# fp32 (CPU's precision) on a GPU too, so that the comparisons below are as tight there
SMALL = ["max_steps=2", "checkpoint.every=1", "seq_len=64", "micro_batch=2", "global_batch=4",
         "log.progress=false", "log.tensorboard=false", "eval_every=0", "validation_fraction=0",
         "max_examples=64", "precision=fp32"]
EXAMPLE = REPO / "configs" / "lora-tiny-cpu.yaml"


def _small(out_dir, *extra) -> config.RunConfig:
    return config.load(EXAMPLE, [*SMALL, f"output.dir={out_dir}", *extra])


def _losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in logs.read_jsonl(Path(out_dir) / "metrics.jsonl") if "loss" in r}


def _move_checkpoint(run_dir: Path, step: int, to: Path) -> Path:
    """A fresh output folder holding only ``run_dir``'s checkpoint of ``step``."""
    name = f"checkpoint-{step:07d}"
    to.mkdir()
    os.rename(run_dir / name, to / name)
    return to / name


def test_fsdp_qlora_through_the_command_trains_like_qlora_and_resumes(tmp_path, monkeypatch):
    """FSDP2 over the NF4 base (bf16 storage) on one gloo rank, in this process: QLoRA's losses, and a
    resume from its sharded checkpoint repeats them."""
    trainer.run(_small(tmp_path / "qlora", "method=qlora"))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(launcher.free_port()))
    trainer.run(_small(tmp_path / "fsdp", "method=qlora", "strategy=fsdp2"))
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "qlora"), rel=1e-5)
    saved = _move_checkpoint(tmp_path / "fsdp", 1, tmp_path / "resumed")
    assert (saved / "sharded").is_dir()  # torch.distributed.checkpoint's shards
    monkeypatch.setenv("MASTER_PORT", str(launcher.free_port()))
    trainer.run(_small(tmp_path / "resumed", "method=qlora", "strategy=fsdp2"), resume_from=str(saved))
    assert _losses(tmp_path / "resumed") == {2: _losses(tmp_path / "fsdp")[2]}
    assert (tmp_path / "resumed" / "adapter" / "adapter_model.safetensors").is_file()


def test_zero3_trains_like_one_process_and_resumes_exactly(tmp_path):
    """ZeRO-3 under torchrun on one rank. Needs DeepSpeed (on CPU: DS_ACCELERATOR=cpu, and a C++ compiler
    for its shared-memory op, built once)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    steps = ["max_steps=4", "checkpoint.every=2"]

    def run(out_dir, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
                   f"--master-port={launcher.free_port()}", "-m", "recipes_lib", "train", str(EXAMPLE),
                   *SMALL, *steps, "strategy=zero3", f"output.dir={out_dir}", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run(tmp_path / "zero3")
    saved = _move_checkpoint(tmp_path / "zero3", 2, tmp_path / "resumed")
    assert (saved / deepspeed_zero.FOLDER).is_dir()  # Accelerate's save_state
    run(tmp_path / "resumed", "checkpoint.resume=true")
    first, again = _losses(tmp_path / "zero3"), _losses(tmp_path / "resumed")
    assert again == {3: first[3], 4: first[4]}
    trainer.run(_small(tmp_path / "single", *steps))  # one process's run, up to summation order
    assert first == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)


def test_deepspeed_refuses_fp16_on_a_gpu_without_bf16():
    with pytest.raises(RecipeError, match="runs bf16 or fp32 here"):
        deepspeed_zero.wrap(torch.nn.Linear(1, 1), None, _config("zero3"), 1, 1, torch.float16)
