"""Checkpoints a run can resume from exactly, written atomically, the last K kept.

A checkpoint is a folder ``checkpoint-<step>`` in the output folder holding the trained weights (the
adapters only, for LoRA and QLoRA), the optimizer, scheduler and loss-scaler states, every RNG state,
the data position and the run's config (FSDP2: sharded by ``torch.distributed.checkpoint``, loadable
on another number of ranks; DeepSpeed: Accelerate's ``save_state``, for the same number). It is
written to a temporary folder and renamed into place, so a run killed during a save leaves the
previous checkpoint whole. ``load`` refuses a checkpoint whose config differs from the run's in
anything but how long, how often and where it logs.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..core.errors import RecipeError
from ..memory import qlora
from . import config as config_
from . import deepspeed_zero, distributed

PREFIX = "checkpoint-"


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes: all of them, or the adapters only."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out_dir: str | Path, step: int, lm, optimizer, scheduler, scaler, cfg: config_.RunConfig,
         data_position: int, keep_last: int, model=None, ctx=None) -> Path:
    """Write ``checkpoint-<step>`` atomically, then delete all but the ``keep_last`` newest.

    ``lm`` is the bare model (its parameter names are the checkpoint's); ``model``, the same model as
    wrapped for FSDP2, whose shards every rank writes with ``torch.distributed.checkpoint``, or the
    DeepSpeed engine, whose partitions every rank writes with Accelerate's ``save_state``. Otherwise
    the main process writes everything. All ranks call this.
    """
    out_dir = Path(out_dir)
    main = ctx is None or ctx.is_main
    final = out_dir / f"{PREFIX}{step:07d}"
    tmp = out_dir / f".tmp-{PREFIX}{step:07d}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    sharded = model is not None and cfg.train.strategy == "fsdp2"
    engine = model is not None and cfg.train.strategy in config_.DEEPSPEED
    if sharded:
        distributed.save_sharded(tmp, model, optimizer)
    elif engine:
        deepspeed_zero.save(tmp, model)
    if main:
        if not (sharded or engine):
            torch.save(trained_state(lm), tmp / "model.pt")
        torch.save({"optimizer": None if sharded or engine else optimizer.state_dict(), "sharded": sharded,
                    "deepspeed": engine, "ranks": ctx.world_size if ctx else 1,
                    "scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "data_position": data_position, "config": cfg.model_dump(),
                    "nf4_base": qlora.base_of(lm)}, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:  # on disk before the rename makes it the latest
            os.fsync(f.fileno())
    distributed.publish(tmp, final, ctx)
    if main:
        for old in checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints in ``out_dir``, oldest first (half-written ``.tmp-`` folders excluded)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.glob(f"{PREFIX}*") if (p / "state.pt").is_file())


def latest(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def load(path: str | Path, lm, optimizer, scheduler, scaler, cfg: config_.RunConfig, model=None) -> dict:
    """Restore a checkpoint into the run's objects; returns ``{"step", "data_position"}``.

    ``model``: the FSDP2-wrapped model, for a sharded checkpoint (on any number of ranks); the DeepSpeed
    engine, for its checkpoint (on the same number of ranks).
    """
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise RecipeError(f"{path} is not a checkpoint (no state.pt): pass a {PREFIX}<step> folder")
    state = torch.load(path / "state.pt", weights_only=False)
    changed = config_.differences(state["config"], cfg)
    saved_base, base = saved_nf4_base(state), qlora.base_of(lm)
    if saved_base != base and saved_base != "auto":  # "auto": saved before the base was recorded, unknown
        changed.append(f"the 4-bit base: {saved_base} -> {base} (set model.nf4_base: {saved_base or 'auto'})")
    if changed:
        raise RecipeError(f"{path} was saved by another configuration; these keys differ:\n  "
                          + "\n  ".join(changed) + "\nresume with the config it was saved with, or start "
                          "a new run in another output.dir")
    if state.get("sharded"):
        distributed.load_sharded(path, model, optimizer)
    elif state.get("deepspeed"):
        deepspeed_zero.load(path, model, state["ranks"])
    else:
        weights = torch.load(path / "model.pt", weights_only=True)
        params = dict(lm.named_parameters())
        missing = set(weights) - set(params)
        if missing:
            raise RecipeError(f"{path} holds weights this model lacks: {sorted(missing)[:3]} ...")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return {"step": state["step"], "data_position": state["data_position"]}


def saved_nf4_base(state: dict) -> str | None:
    """The 4-bit base a checkpoint's run held: saved since ``model.nf4_base: auto``; before, its config's
    (``"auto"`` for the few saved between the two: unknown, not checked on resume)."""
    if "nf4_base" in state:
        return state["nf4_base"]
    model = state["config"]["model"]
    return model.get("nf4_base", "bitsandbytes") if model.get("method") == "qlora" else None
