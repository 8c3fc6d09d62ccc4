"""Where measured figures go: ``outputs/`` for every run, ``results/`` for GPU runs worth committing.

Each notebook saves one JSON: its environment (GPU, torch, transformers, model shape, batch, length),
its figures, and scoreboard rows (each technique's memory and tokens/s against its baseline).
``scripts/scoreboard.py`` gathers the rows of all notebooks into one table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path

import torch
import transformers

from .core.hardware import Hardware
from .core.models import REPO_ROOT

OUTPUTS = Path(os.environ.get("RECIPES_OUTPUTS", REPO_ROOT / "outputs"))
RESULTS = REPO_ROOT / "results"


def environment(hw: Hardware, **setup) -> dict:
    """What a figure depends on: the device, library versions and the run's shape."""
    return {"device": hw.name, "device_type": hw.device.type, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "peak_flops_bf16_datasheet": hw.peak_flops, **setup}


def scoreboard_row(notebook: str, technique: str, baseline: str, memory_bytes: int | None,
                   baseline_memory_bytes: int | None, tokens_per_s: float | None,
                   baseline_tokens_per_s: float | None) -> dict:
    """One line of the scoreboard: a technique against its baseline (None where it does not apply)."""
    return {"notebook": notebook, "technique": technique, "baseline": baseline,
            "memory_bytes": memory_bytes, "baseline_memory_bytes": baseline_memory_bytes,
            "tokens_per_s": tokens_per_s, "baseline_tokens_per_s": baseline_tokens_per_s}


def code_cells(path: str | Path) -> list[str]:
    """The sources of a notebook's code cells, in order."""
    cells = json.loads(Path(path).read_text())["cells"]
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in cells if c["cell_type"] == "code"]


def code_hash(path: str | Path) -> str:
    """sha256 of a notebook's code cells (trailing white space ignored): what produced its outputs."""
    text = "\n\0".join(source.rstrip() for source in code_cells(path))
    return hashlib.sha256(text.encode()).hexdigest()


def notebook_path(notebook: str) -> Path:
    return REPO_ROOT / "notebooks" / f"{notebook}.ipynb"


def save(notebook: str, hw: Hardware, environment_: dict, figures: dict, scoreboard: list[dict],
         publish: bool = False) -> list[Path]:
    """Write ``outputs/<notebook>.json``; with ``publish`` (a reference GPU run) also
    ``results/<notebook>.<gpu>.json``. Both record ``code_hash`` of the notebook's code cells."""
    source = notebook_path(notebook)
    payload = {"notebook": notebook, "code_hash": code_hash(source) if source.exists() else None,
               "environment": environment_, "figures": figures, "scoreboard": scoreboard}
    text = json.dumps(payload, indent=2, default=_plain) + "\n"
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    paths = [OUTPUTS / f"{notebook}.json"]
    if publish:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", hw.name.removeprefix("NVIDIA ")).strip("-")
        RESULTS.mkdir(exist_ok=True)
        paths.append(RESULTS / f"{notebook}.{slug}.json")
    for path in paths:
        path.write_text(text)
    return paths


def _plain(value):
    if isinstance(value, torch.dtype):
        return str(value)
    if hasattr(value, "__dict__"):
        return vars(value)
    return str(value)
