"""The notebooks' preamble: quiet libraries, the hardware, the profile's parameters, and targets.

Every notebook starts with the same two lines::

    from recipes_lib import notebook
    hw, P, targets = notebook.setup(PROFILES, MODEL, benchmark_gpu="H100")

``P`` is the profile's parameters, chosen by the class of the hardware found
(``hardware.gpu_class``): ``"cpu"`` at CI size; ``"t4"`` and ``"l4"`` sized for a 16 GB T4 (fp16 with
loss scaling) and a 24 GB L4 or A10, each about ten minutes there; ``"gpu"`` at full size for 40 GB
and more. ``PROFILE`` or ``RECIPES_PROFILE`` overrides the choice. ``P["model"]`` is overridden by
``MODEL`` or ``RECIPES_MODEL``. ``P["reference"]`` is True for the GPU profile with its own model on a
real (not simulated) GPU: the runs whose figures ``results.save(..., publish=P["reference"])`` keeps
in ``results/``. ``targets`` records each GPU target where it is measured, prints it, and asserts all
of them in the notebook's last cell, on the GPU they were set for and at the size they were set for
only (the ``"gpu"`` profile).

``runtime_estimate`` states how long a profile's work takes at a GPU class's datasheet rates.
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
    full_size: bool = True  # False for the small classes' profiles: targets are set at full size

    @property
    def asserted(self) -> bool:
        """True on the GPU the targets were set for, at full size: there a miss fails the notebook."""
        return self.gpu in self.hw.name and self.full_size and not self.hw.simulated

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
        where = ("asserted" if self.asserted else f"printed only: this is not a {self.gpu}"
                 if self.gpu not in self.hw.name else "printed only: not the full-size profile")
        print(f"{met} of {len(self.rows)} targets met ({where})")
        if self.asserted:
            assert not self.missed(), f"missed on the {self.gpu}: {self.missed()}"


def choose_profile(profiles: dict[str, dict], hw: Hardware, profile: str = "auto") -> str:
    """``RECIPES_PROFILE`` or ``profile`` if it names one, else the profile of this hardware's class
    (``hardware.gpu_class``; a notebook without that class's profile takes ``gpu`` on CUDA)."""
    name = os.environ.get("RECIPES_PROFILE", profile)
    if name == "auto":
        name = hardware.gpu_class(hw)
        name = name if name in profiles else ("gpu" if hw.cuda else "cpu")
    if name not in profiles:
        raise RecipeError(f"PROFILE={name!r}; choose from {sorted(profiles)} or 'auto'")
    return name


def runtime_estimate(flops: float, bytes_moved: float, gpu: str = "t4") -> dict:
    """Seconds that ``flops`` of matmul work and ``bytes_moved`` of memory traffic take at the datasheet
    rates of GPU class ``gpu`` (``hardware.GPU_CLASSES``): a floor, one each, summed (no overlap)."""
    name = hardware.GPU_CLASSES[gpu]["datasheet"]
    peak, bandwidth = hardware.DATASHEET_BF16_PEAK[name], hardware.DATASHEET_BANDWIDTH[name]
    return {"gpu": name, "flops": flops, "bytes": bytes_moved, "peak_flops": peak, "bandwidth": bandwidth,
            "seconds": flops / peak + bytes_moved / bandwidth}


def state_runtime(P: dict, flops: float, bytes_moved: float, efficiency: float = 0.35) -> dict:
    """Print and return ``runtime_estimate`` for the GPU class of profile ``P`` (T4 for the CPU profile):
    at datasheet rates, and at ``efficiency`` of them (about what this package's training steps reach)."""
    gpu = P["profile"] if P["profile"] in hardware.GPU_CLASSES else "t4"
    est = runtime_estimate(flops, bytes_moved, gpu)
    est["efficiency"], est["minutes"] = efficiency, est["seconds"] / efficiency / 60
    print(f"work of this profile: {flops / 1e15:,.1f} PFLOP and {bytes_moved / 1e12:,.2f} TB of memory "
          f"traffic; on a {est['gpu']} ({est['peak_flops'] / 1e12:.0f} TFLOP/s, "
          f"{est['bandwidth'] / 1e9:,.0f} GB/s datasheet): {est['seconds'] / 60:.1f} min at those rates, "
          f"about {est['minutes']:.0f} min at {efficiency:.0%} of them, plus loading and compiling")
    return est


def setup(profiles: dict[str, dict], model: str | None = None, profile: str = "auto",
          benchmark_gpu: str = "H100", seed: int = 0) -> tuple[Hardware, dict, Targets]:
    """Quiet the libraries, detect the hardware, pick the profile; returns ``(hw, P, targets)``."""
    quiet()
    torch.manual_seed(seed)
    hw = hardware.detect()
    name = choose_profile(profiles, hw, profile)
    P = dict(profiles[name], profile=name)
    override = model or os.environ.get("RECIPES_MODEL")
    P["reference"] = hw.cuda and name == "gpu" and not override and not hw.simulated  # kept in results/
    if "model" in P:
        P["model"] = override or P["model"]
    print(hw.summary())
    shown = {k: v for k, v in P.items() if k not in ("profile", "reference")}
    print(f"profile: {name} | {json.dumps(shown, default=str)}")
    return hw, P, Targets(benchmark_gpu, hw, full_size=name == "gpu")
