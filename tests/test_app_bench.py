"""`recipes bench`: every recipe of the four notebooks runs against its reference at a tiny size and
prints its row; the multi-GPU ones say what they need; bad input gets one clear message."""

import pytest
import torch

from recipes_lib.app import bench_cmd, cli, techniques
from recipes_lib.core.errors import RecipeError

TINY = dict(seq_len=64, micro_batch=2, steps=2)
# What must hold even at this size (memory only: at a few milliseconds per step, speed is noise).
CLAIMS = {
    "qlora": lambda ref, row: row["memory"].states < 0.5 * ref["memory"].states,
    "int8": lambda ref, row: row["memory"].parameters < 0.5 * ref["memory"].parameters,
    "distillation": lambda ref, row: row["memory"].parameters < ref["memory"].parameters,
    # on a CPU there is nowhere to offload to: the same bytes
    "optimizer-offload": lambda ref, row: row["memory"].optimizer == ref["memory"].optimizer,
}
# Every recipe of notebooks 01-04 (their section titles), under the names `recipes bench` knows.
NOTEBOOKS = {"01": {"qlora", "qlora-compiled", "checkpointing", "grad-accumulation", "optimizer-offload"},
             "02": {"fsdp2", "bf16-mixed-precision", "fsdp-qlora", "data-loading"},
             "03": {"int8", "distillation", "flash-attention", "rmsnorm"},
             "04": {"sparse-attention", "chunked-ce", "activation-offload", "curriculum", "sliding-window"}}
MULTI_GPU = [name for name, t in techniques.TECHNIQUES.items() if t.kind == "multi-gpu"]
ONE_DEVICE = [name for name in techniques.TECHNIQUES if name not in MULTI_GPU]


def test_list_names_every_recipe_of_the_four_notebooks(capsys):
    assert cli.main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()[1:]
    by_notebook = {}
    for line in listed:
        name, notebook = line.split()[:2]
        by_notebook.setdefault(notebook, set()).add(name)
    assert by_notebook == NOTEBOOKS


@pytest.mark.parametrize("name", ONE_DEVICE)
def test_each_technique_runs_against_its_reference(name, tiny_model_dir):
    # the tiny test Llama, or the technique's own model (rmsnorm: a LayerNorm model)
    model = None if techniques.TECHNIQUES[name].default_model else tiny_model_dir
    result = bench_cmd.run(name, model=model, **TINY)
    reference, technique = result["rows"]
    assert reference["name"] != technique["name"]
    for row in (reference, technique):
        assert not row["oom"]
        assert 0 < row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        split = row["memory"]
        if split is not None:  # the parts add up to the peak
            assert split.peak > 0
            assert split.parameters + split.gradients + split.optimizer + split.activations >= split.peak
    if name in CLAIMS and not torch.cuda.is_available():
        assert CLAIMS[name](reference, technique), bench_cmd.summary(result)
    shown = bench_cmd.summary(result)
    assert f"{technique['name']} vs {reference['name']}: tokens/s" in shown
    assert "MFU" in shown and "tokens/s" in shown.splitlines()[2]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="runs for real on 2 GPUs")
@pytest.mark.parametrize("name", MULTI_GPU)
def test_multi_gpu_techniques_say_what_they_need(name, capsys):
    assert cli.main(["bench", "--technique", name]) == 2
    assert "needs at least 2 GPUs (found " in capsys.readouterr().err
    with pytest.raises(RecipeError, match="--nproc 2 runs it on 2 CPU processes"):
        bench_cmd.run(name, nproc=1, **TINY)


def test_bad_input_gets_one_clear_message(capsys):
    assert cli.main(["bench", "--technique", "flash-attn"]) == 2
    err = capsys.readouterr().err
    assert "unknown technique 'flash-attn'; known: " in err and all(n in err for n in techniques.TECHNIQUES)
    assert cli.main(["bench", "--technique", "qlora", "--model", "./no/such/model"]) == 2
    assert "--model: there is no folder at './no/such/model'" in capsys.readouterr().err
    assert cli.main(["bench", "--technique", "rmsnorm", "--model", "data/tiny-llama", "--seq-len", "64"]) == 2
    assert "no nn.LayerNorm in this model" in capsys.readouterr().err
    assert cli.main(["bench"]) == 2
    assert "recipes bench --list" in capsys.readouterr().err
