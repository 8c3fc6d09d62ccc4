"""The notebooks' structure: paired twins in sync, one parameters cell, asserts; the scoreboard."""

import ast
import importlib.util
import json
import re
from pathlib import Path

import jupytext
import pytest

from recipes_lib import results
from recipes_lib.core import hardware

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_py_twin_matches_notebook(path):
    twin = jupytext.read(path.with_suffix(".py"))
    nb = jupytext.read(path)
    assert [c.source.strip() for c in nb.cells] == [c.source.strip() for c in twin.cells], \
        "notebook and its py:percent twin differ: run `make sync`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_and_asserts(path):
    cells = _code(jupytext.read(path))
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert sum("assert " in c.source for c in cells) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_twin_reads_like_a_recipe(path):
    """The twin parses; under 400 lines of code beside the install and parameters cells (which hold no
    logic: the install cell runs before the package exists, the parameters are the profiles' sizes); no
    function over 5 lines; no loop inside a loop."""
    source = path.with_suffix(".py").read_text()
    tree = ast.parse(source)
    cells = jupytext.read(path.with_suffix(".py")).cells
    setup = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and "## Setup" in c.source)
    logic = [c.source for i, c in enumerate(cells) if c.cell_type == "code" and i != setup + 1
             and "parameters" not in c.metadata.get("tags", [])]
    code = [line for cell in logic for line in cell.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) < 400, f"{len(code)} lines of code: move logic into recipes_lib"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno <= 5, f"{node.name} is longer than 5 lines"
        if isinstance(node, (ast.For, ast.While)):
            inner = [n for n in ast.walk(node) if n is not node and isinstance(n, (ast.For, ast.While))]
            assert not inner, f"a nested loop at line {node.lineno}"


def _stale() -> dict[str, str]:
    """Notebooks listed in results/STALE.md (``- `name`: reason``) with their reasons."""
    text = (ROOT / "results" / "STALE.md").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^- `([^`]+)`: (.+)$", text, re.M)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_come_from_the_committed_code(path):
    """The code cells hash to what the committed GPU results were saved with, or STALE.md lists it."""
    saved = [json.loads(f.read_text()) for f in (ROOT / "results").glob(f"{path.stem}.*.json")]
    assert saved, f"no committed results for {path.stem} in results/"
    if path.stem in _stale():
        return
    hashes = {payload.get("code_hash") for payload in saved}
    assert results.code_hash(path) in hashes, (
        f"{path.name}'s code cells changed since its committed GPU run: re-run it on a GPU and commit the "
        f"outputs, or list it in results/STALE.md with the reason")


def test_stale_list_names_real_notebooks():
    assert set(_stale()) <= {p.stem for p in NOTEBOOKS}, "results/STALE.md names no such notebook"


def test_code_hash_ignores_outputs_and_sees_code(tmp_path):
    nb = {"cells": [{"cell_type": "markdown", "source": "# t"},
                    {"cell_type": "code", "source": ["x = 1\n", "y = 2"], "outputs": []}]}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(nb))
    before = results.code_hash(path)
    nb["cells"][1]["outputs"] = [{"output_type": "stream", "text": "hi"}]
    nb["cells"][0]["source"] = "# other prose"
    path.write_text(json.dumps(nb))
    assert results.code_hash(path) == before
    nb["cells"][1]["source"] = ["x = 1\n", "y = 3"]
    path.write_text(json.dumps(nb))
    assert results.code_hash(path) != before


def _load_scoreboard():
    spec = importlib.util.spec_from_file_location("scoreboard", ROOT / "scripts" / "scoreboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_save_and_scoreboard(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "OUTPUTS", tmp_path)
    hw = hardware.detect("cpu")
    row = results.scoreboard_row("01", "QLoRA", "full", 2**30, 4 * 2**30, 300.0, 200.0)
    paths = results.save("nb", hw, results.environment(hw, seq_len=8), {"x": 1.0}, [row])
    assert paths == [tmp_path / "nb.json"]  # only a published reference run writes results/
    payload = json.loads(paths[0].read_text())
    assert payload["environment"]["device"] == "CPU" and payload["environment"]["seq_len"] == 8
    text = _load_scoreboard().table([payload])
    assert "| 01 | CPU | QLoRA | full | 1.000 | 4.000 | 0.25x | 300 | 200 | 1.50x |" in text
