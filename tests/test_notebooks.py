"""The notebooks' structure: paired twins in sync, one parameters cell, asserts; the scoreboard."""

import importlib.util
import json
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
