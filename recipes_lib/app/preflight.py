"""Checks ``recipes train``, ``eval`` and ``estimate`` make before anything loads, so that a mistake costs
one message at once instead of a minute of hub retries or a run written over another.

``local_model`` refuses a model name meant as a local folder that is not there (a path, or a near miss
of a folder beside it such as ``data/tiny-lama``); a hub id (``org/name``) goes on to the hub.
``output_dir`` refuses to start a run over the checkpoints of an earlier one unless it resumes them.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..core.errors import RecipeError
from . import checkpoint, data
from .config import RunConfig


def local_model(name: str | None, key: str, paths: bool = True) -> None:
    """Raise where ``name`` is meant as a local folder that does not exist; ``key`` names the setting.
    ``paths=False`` leaves names written as paths (``./x``, ``a/b/c``) to the caller's own message."""
    if name is None or name.startswith("random:"):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        return
    parent = path.parent
    folders = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    near = difflib.get_close_matches(path.name, folders, n=1)
    explicit = paths and (name.startswith((".", "/", "~")) or name.count("/") > 1)
    if not explicit and not (name.count("/") == 1 and near):  # a hub id such as org/name
        return
    hint = f"; did you mean {str(parent / near[0])!r}?" if near else ""
    raise RecipeError(f"{key}: there is no folder at {name!r}{data.from_cwd(path)}{hint}")


def output_dir(cfg: RunConfig, resume_from: str | None) -> None:
    """Raise where ``output.dir`` holds an earlier run's checkpoints and this run would start over them."""
    if resume_from is not None or cfg.checkpoint.resume:
        return
    last = checkpoint.latest(cfg.output.dir)
    if last is not None:
        raise RecipeError(f"output.dir {cfg.output.dir} already holds {last.name} from an earlier run: add "
                          f"checkpoint.resume=true to continue it (or --resume {last}), or set another "
                          f"output.dir (or delete that folder) to start over")


def resume_path(cfg: RunConfig, resume_from: str | None) -> None:
    """Raise where ``--resume`` names no checkpoint, listing those of ``output.dir``."""
    if resume_from is None or (Path(resume_from) / "state.pt").is_file():
        return
    found = [p.name for p in checkpoint.checkpoints(cfg.output.dir)]
    held = f"{cfg.output.dir} holds {', '.join(found)}" if found else f"{cfg.output.dir} holds none"
    raise RecipeError(f"--resume {resume_from}: there is no checkpoint there (a checkpoint-<step> folder "
                      f"with state.pt); {held} (checkpoint.resume=true takes the latest)")


def train(cfg: RunConfig, resume_from: str | None) -> None:
    """Every check of ``recipes train``."""
    output_dir(cfg, resume_from)
    resume_path(cfg, resume_from)
    local_model(cfg.model.source, "model.source")
    local_model(cfg.model.tokenizer, "model.tokenizer")


def step_of(folder: Path) -> int:
    """The step of a ``checkpoint-<step>`` folder."""
    return int(folder.name.rsplit("-", 1)[1])
