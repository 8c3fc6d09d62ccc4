"""Colab and small GPUs: the one install cell, the repository URL, profiles by GPU class, the simulation."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
import torch

from recipes_lib import notebook
from recipes_lib.core import hardware
from recipes_lib.core.errors import RecipeError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "scripts"))
import set_repo_url  # noqa: E402


def install_cell(path: Path) -> str:
    """The code cell right after the notebook's "## Setup" heading."""
    cells = jupytext.read(path).cells
    heading = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and "## Setup" in c.source)
    return cells[heading + 1].source


def test_one_install_cell_the_same_in_every_notebook():
    cells = {path.stem: install_cell(path) for path in NOTEBOOKS}
    assert len(cells) == 4 and len(set(cells.values())) == 1, "the install cells differ: make them one"
    cell = next(iter(cells.values()))
    assert "[notebooks]" in cell and "git\", \"clone" in cell
    assert "torch" not in re.sub(r"#.*", "", cell).replace("(torch>=2.6)", ""), "Colab's torch stays"


def test_the_notebooks_extra_has_what_the_notebooks_import():
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("bitsandbytes") for r in extras["notebooks"])
    assert any(r.startswith("torchao") for r in extras["notebooks"])


def run_cell(cell: str, env: dict, spec_found: bool, monkeypatch) -> list[list[str]]:
    """Execute the install cell with ``env``; returns the commands it would have run."""
    import importlib.util
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if not spec_found else object())
    for key in ("RECIPES_COLAB", "RECIPES_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    exec(compile(cell, "install-cell", "exec"), {"__name__": "__main__"})
    return calls


def test_install_cell_does_nothing_outside_colab(monkeypatch):
    assert "google.colab" not in sys.modules
    assert run_cell(install_cell(NOTEBOOKS[0]), {}, spec_found=False, monkeypatch=monkeypatch) == []


def test_install_cell_clones_then_installs_on_colab(monkeypatch, tmp_path):
    home = tmp_path / "recipes"
    calls = run_cell(install_cell(NOTEBOOKS[0]), {"RECIPES_COLAB": "1", "RECIPES_HOME": str(home)},
                     spec_found=False, monkeypatch=monkeypatch)
    assert calls[0][:2] == ["git", "clone"] and calls[0][-2:] == [set_repo_url.current_url(), str(home)]
    assert calls[1][:4] == [sys.executable, "-m", "pip", "install"] and calls[1][-1] == f"{home}[notebooks]"
    assert os.environ["RECIPES_HOME"] == str(home)


def test_install_cell_keeps_an_existing_clone_and_install(monkeypatch, tmp_path):
    calls = run_cell(install_cell(NOTEBOOKS[0]), {"RECIPES_COLAB": "1", "RECIPES_HOME": str(tmp_path)},
                     spec_found=True, monkeypatch=monkeypatch)
    assert calls == []


def test_repo_url_is_one_constant():
    url = set_repo_url.current_url()
    slug = url.removeprefix("https://github.com/")
    for path in NOTEBOOKS:
        cell = install_cell(path)
        assert f'REPO_URL = "{url}"' in cell, f"{path.name}: the clone line does not use {url}"
        badges = re.findall(r"colab\.research\.google\.com/github/([^)\s]+)", path.read_text())
        assert badges and all(b == f"{slug}/blob/main/notebooks/{path.name}" for b in badges), path.name
    readme = (ROOT / "README.md").read_text()
    linked = re.findall(r"colab\.research\.google\.com/github/([^)\s]+?)/blob/main/notebooks/", readme)
    assert len(linked) >= 4 and set(linked) == {slug}, "the README's Colab badges use another repository"


def test_set_repo_url_rewrites_every_place(tmp_path):
    for path in set_repo_url.files():
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    changed = set_repo_url.set_repo_url("https://github.com/someone/fork", tmp_path)
    assert len(changed) == len(set_repo_url.files())
    assert set_repo_url.current_url(tmp_path) == "https://github.com/someone/fork"
    text = (tmp_path / "notebooks" / NOTEBOOKS[0].name).read_text()
    assert "colab.research.google.com/github/someone/fork/blob/main" in text
    assert 'REPO_URL = \\"https://github.com/someone/fork\\"' in text
    with pytest.raises(SystemExit, match="GitHub URL"):
        set_repo_url.set_repo_url("https://gitlab.com/someone/fork", tmp_path)


# --- profiles by GPU class ---------------------------------------------------------------------------

def gpu(memory_gib: float, bf16: bool = True, simulated=None):
    cpu = hardware.detect("cpu")
    return dataclasses.replace(cpu, device=torch.device("cuda"), name="GPU", bf16=bf16,
                               memory_bytes=int(memory_gib * 2**30), simulated=simulated)


@pytest.mark.parametrize("memory,bf16,expected", [
    (15, False, "t4"), (16, True, "t4"), (40, False, "t4"), (22, True, "l4"), (24, True, "l4"),
    (40, True, "gpu"), (80, True, "gpu"), (141, True, "gpu")])
def test_gpu_class(memory, bf16, expected):
    assert hardware.gpu_class(gpu(memory, bf16)) == expected


def test_gpu_class_of_a_simulated_gpu_and_the_cpu():
    assert hardware.gpu_class(gpu(80, simulated="l4")) == "l4"
    assert hardware.gpu_class(hardware.detect("cpu")) == "cpu"


def test_simulated_class_reads_the_environment(monkeypatch):
    monkeypatch.delenv("RECIPES_SIMULATE_GPU", raising=False)
    assert hardware.simulated_class() is None
    monkeypatch.setenv("RECIPES_SIMULATE_GPU", "T4")
    assert hardware.simulated_class() == "t4"
    monkeypatch.setenv("RECIPES_SIMULATE_GPU", "a100")
    with pytest.raises(RecipeError, match="'t4' or 'l4'"):
        hardware.simulated_class()


PROFILES = {"cpu": {}, "t4": {}, "l4": {}, "gpu": {}}


@pytest.mark.parametrize("memory,bf16,expected", [(15, False, "t4"), (22, True, "l4"), (80, True, "gpu")])
def test_auto_profile_follows_the_class(memory, bf16, expected, monkeypatch):
    monkeypatch.delenv("RECIPES_PROFILE", raising=False)
    assert notebook.choose_profile(PROFILES, gpu(memory, bf16)) == expected
    assert notebook.choose_profile({"cpu": {}, "gpu": {}}, gpu(memory, bf16)) == "gpu"  # no small profile
    assert notebook.choose_profile(PROFILES, hardware.detect("cpu")) == "cpu"


def test_profile_override_wins(monkeypatch):
    monkeypatch.delenv("RECIPES_PROFILE", raising=False)
    assert notebook.choose_profile(PROFILES, gpu(80), "t4") == "t4"
    monkeypatch.setenv("RECIPES_PROFILE", "l4")
    assert notebook.choose_profile(PROFILES, gpu(15, False)) == "l4"
    monkeypatch.setenv("RECIPES_PROFILE", "a100")
    with pytest.raises(RecipeError, match="choose from"):
        notebook.choose_profile(PROFILES, gpu(80))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_a_profile_per_class(path):
    source = path.with_suffix(".py").read_text()
    for name in ("cpu", "gpu", "t4", "l4"):
        assert re.search(rf'"{name}": dict\(|PROFILES\["{name}"\]', source), f"{path.stem}: no {name} profile"
    assert "notebook.state_runtime(P" in source, f"{path.stem}: states no runtime estimate"


def test_targets_are_asserted_at_full_size_on_a_real_gpu_only():
    h100 = dataclasses.replace(gpu(80), name="NVIDIA H100 80GB HBM3")
    assert notebook.Targets("H100", h100).asserted
    assert not notebook.Targets("H100", h100, full_size=False).asserted
    assert not notebook.Targets("H100", dataclasses.replace(h100, simulated="t4")).asserted
    assert not notebook.Targets("H200", h100).asserted


def test_runtime_estimate_at_datasheet_rates(capsys):
    t4 = hardware.GPU_CLASSES["t4"]["datasheet"]
    est = notebook.runtime_estimate(hardware.DATASHEET_BF16_PEAK[t4] * 60,
                                    hardware.DATASHEET_BANDWIDTH[t4] * 30)
    assert est["gpu"] == "T4" and est["seconds"] == pytest.approx(90)
    stated = notebook.state_runtime({"profile": "cpu"}, hardware.DATASHEET_BF16_PEAK["T4"] * 63, 0, 0.35)
    assert stated["minutes"] == pytest.approx(3.0) and "about 3 min" in capsys.readouterr().out
    assert notebook.state_runtime({"profile": "l4"}, 1e15, 0)["gpu"] == "L4"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_simulated_t4_caps_memory_and_turns_bf16_off():
    code = ("from recipes_lib.core import hardware; import torch; hw = hardware.detect(); "
            "print(hw.memory_bytes, hw.bf16, hw.amp_dtype, hardware.gpu_class(hw)); "
            "x = torch.empty(int(16 * 2**30), dtype=torch.uint8, device='cuda')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, RECIPES_SIMULATE_GPU="t4", PYTHONPATH=str(ROOT)))
    shown = out.stdout.split()[:4]
    assert shown == [str(15 * 2**30), "False", "torch.float16", "t4"], out.stdout + out.stderr
    assert "OutOfMemoryError" in out.stderr, "16 GiB should not fit under a 15 GiB cap"


def test_recipes_home_points_the_package_at_a_clone(tmp_path):
    (tmp_path / "data").mkdir()
    code = ("from recipes_lib.core import models; from recipes_lib import results; "
            "print(models.REPO_ROOT, results.RESULTS)")
    env = dict(os.environ, RECIPES_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [str(tmp_path.resolve()), str(tmp_path.resolve() / "results")]
    env["RECIPES_HOME"] = str(tmp_path / "nowhere")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "has no data/ folder" in out.stderr


def test_compute_dtype_is_what_the_kernels_run_in():
    assert hardware.detect("cpu").compute_dtype == torch.float32
    assert gpu(80).compute_dtype == torch.bfloat16
    assert gpu(15, bf16=False).compute_dtype == torch.float16  # a T4: fp16 kernels, fp32 weights
    assert gpu(15, bf16=False).model_dtype == torch.float32
