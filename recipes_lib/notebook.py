"""The notebooks' preamble: quiet libraries, the hardware, the profile's parameters, and targets.

Every notebook starts with the same two lines::

    from recipes_lib import notebook
    hw, P, targets = notebook.setup(PROFILES, MODEL, benchmark_gpu="H100")

``P`` is the profile's parameters (``"cpu"`` at CI size, ``"gpu"`` at full size, chosen from the
hardware unless ``PROFILE`` or ``RECIPES_PROFILE`` names one), with ``P["model"]`` overridden by
``MODEL`` or ``RECIPES_MODEL``. ``P["reference"]`` is True for the GPU profile with its own model on
a GPU: the runs whose figures ``results.save(..., publish=P["reference"])`` keeps in ``results/``.
``targets`` records each GPU target where it is measured, prints it, and asserts all of them in the
notebook's last cell, on the GPU they were set for only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from . import quiet
from .core import hardware
from .core.errors import RecipeError
from .core.hardware import Hardware


@dataclass
class Targets:
    """GPU targets of one notebook: recorded and printed as measured, asserted together at the end."""

    gpu: str
    hw: Hardware
    rows: list[dict] = field(default_factory=list)

    @property
    def asserted(self) -> bool:
        """True on the GPU the targets were set for: there a miss fails the notebook."""
        return self.gpu in self.hw.name

    def check(self, name: str, value: str, met: bool) -> bool:
        """Record and print one target's outcome; returns whether it was met."""
        self.rows.append({"target": name, "measured": value, "met": bool(met)})
        print(f"target ({self.gpu}): {name}: {value} -> {'met' if met else 'MISSED'}")
        return bool(met)

    def missed(self) -> list[str]:
        return [row["target"] for row in self.rows if not row["met"]]

    def assert_all(self) -> None:
        """Print the summary; on the benchmark GPU, fail if any target was missed."""
        met = len(self.rows) - len(self.missed())
        where = "asserted" if self.asserted else f"printed only: this is not a {self.gpu}"
        print(f"{met} of {len(self.rows)} targets met ({where})")
        if self.asserted:
            assert not self.missed(), f"missed on the {self.gpu}: {self.missed()}"


def choose_profile(profiles: dict[str, dict], hw: Hardware, profile: str = "auto") -> str:
    """``RECIPES_PROFILE`` or ``profile`` if it names one, else ``gpu`` on CUDA and ``cpu`` elsewhere."""
    name = os.environ.get("RECIPES_PROFILE", profile)
    name = ("gpu" if hw.cuda else "cpu") if name == "auto" else name
    if name not in profiles:
        raise RecipeError(f"PROFILE={name!r}; choose from {sorted(profiles)} or 'auto'")
    return name


def setup(profiles: dict[str, dict], model: str | None = None, profile: str = "auto",
          benchmark_gpu: str = "H100", seed: int = 0) -> tuple[Hardware, dict, Targets]:
    """Quiet the libraries, detect the hardware, pick the profile; returns ``(hw, P, targets)``."""
    quiet()
    torch.manual_seed(seed)
    hw = hardware.detect()
    name = choose_profile(profiles, hw, profile)
    P = dict(profiles[name], profile=name)
    override = model or os.environ.get("RECIPES_MODEL")
    P["reference"] = hw.cuda and name == "gpu" and not override  # the run results/ keeps (see publish)
    if "model" in P:
        P["model"] = override or P["model"]
    print(hw.summary())
    shown = {k: v for k, v in P.items() if k not in ("profile", "reference")}
    print(f"profile: {name} | {json.dumps(shown, default=str)}")
    return hw, P, Targets(benchmark_gpu, hw)
