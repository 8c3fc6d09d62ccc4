"""What this machine can do: device, precision, attention backends, bitsandbytes, peak FLOP/s.

``gpu_class`` sorts it into the classes the notebooks size their profiles for: ``"t4"`` (16 GB, no
bf16: fp16 with loss scaling), ``"l4"`` (24 GB: L4, A10), ``"gpu"`` (40 GB and more: A100, H100, H200)
and ``"cpu"``. ``RECIPES_SIMULATE_GPU=t4`` (or ``l4``) makes a larger GPU act as one of the small
classes: ``detect`` caps this process's CUDA allocator at that class's memory
(``torch.cuda.set_per_process_memory_fraction``: past it, allocations raise out-of-memory) and, for
``t4``, turns bf16 off. Kernel availability and speed are not simulated: an H100 still runs flash
attention and runs it about 15x faster than a T4.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from .errors import RecipeError

# The SDPA backends by name, fastest first: the one table every module looks them up in.
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, without sparsity).
DATASHEET_BF16_PEAK = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
    "A100": 312e12, "A10G": 125e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12, "V100": 125e12,
}

# Datasheet memory bandwidth (bytes/s), for time estimates of memory-bound work.
DATASHEET_BANDWIDTH = {
    "H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
    "A100": 2.0e12, "A10G": 600e9, "A10": 600e9, "L40S": 864e9, "L40": 864e9, "L4": 300e9,
    "RTX 4090": 1.0e12, "RTX 3090": 936e9, "T4": 320e9, "V100": 900e9,
}

# The GPU classes the notebooks' profiles are sized for: memory (bytes) a simulated one is capped at,
# whether it has bf16, and the datasheet GPU whose rates its time estimates use (T4: fp16 tensor cores).
GPU_CLASSES = {
    "t4": dict(memory=15 * 2**30, bf16=False, datasheet="T4", label="T4 (16 GB, fp16 + loss scaling)"),
    "l4": dict(memory=22 * 2**30, bf16=True, datasheet="L4", label="L4 / A10 (24 GB, bf16)"),
    "gpu": dict(memory=None, bf16=True, datasheet="H100 SXM", label="A100 / H100 / H200 (40-141 GB)"),
}


@dataclass(frozen=True)
class Hardware:
    """Capabilities of the device the recipes will run on."""

    device: torch.device
    name: str
    bf16: bool
    sdpa_backends: tuple[str, ...]
    bitsandbytes: bool
    peak_flops: float | None
    memory_bytes: int | None
    simulated: str | None = None  # "t4" or "l4" when RECIPES_SIMULATE_GPU makes this GPU act as one

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Mixed-precision dtype: bf16 where supported, fp16 (loss scaling) on older GPUs, none on CPU."""
        if not self.cuda:
            return None
        return torch.bfloat16 if self.bf16 else torch.float16

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the kernels run in: the autocast dtype on a GPU (fp16 on a T4), else the weights'."""
        return self.amp_dtype or self.model_dtype

    @property
    def needs_loss_scaling(self) -> bool:
        return self.amp_dtype == torch.float16

    @property
    def model_dtype(self) -> torch.dtype:
        """dtype to hold weights in: bf16 where the GPU has it; else fp32 (fp16 AMP needs fp32 masters)."""
        return torch.bfloat16 if self.amp_dtype == torch.bfloat16 else torch.float32

    def summary(self) -> str:
        peak = f"{self.peak_flops / 1e12:.0f} TFLOP/s bf16 (datasheet)" if self.peak_flops else "unknown"
        memory = f"{self.memory_bytes / 2**30:.0f} GiB" if self.memory_bytes else "host memory"
        if self.simulated:
            memory += f", simulating a {GPU_CLASSES[self.simulated]['label']}"
        return (f"device: {self.name} ({self.device.type}, {memory}) | weights dtype: {self.model_dtype} "
                f"| SDPA backends: {', '.join(self.sdpa_backends)} | bitsandbytes: {self.bitsandbytes} "
                f"| peak: {peak}")


def peak_flops_for(name: str) -> float | None:
    """Datasheet dense bf16 peak for a GPU name as CUDA reports it, or None if unknown."""
    for key in sorted(DATASHEET_BF16_PEAK, key=len, reverse=True):
        if key in name:
            return DATASHEET_BF16_PEAK[key]
    return None


def sdpa_backends(device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    """SDPA kernels that actually run here, found by trying each on a small causal input of ``dtype``
    (default: bf16 on a GPU, fp32 on a CPU; a GPU without bf16 runs its kernels in fp16)."""
    from torch.nn.attention import sdpa_kernel

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    q = torch.randn(1, 2, 128, 64, device=device, dtype=dtype)
    found = []
    for name, backend in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            found.append(name)
        except RuntimeError:
            continue
    return tuple(found)


def bitsandbytes_works(device: torch.device) -> bool:
    """True if bitsandbytes imports and can quantize to 4-bit NF4 on ``device``."""
    try:
        import bitsandbytes.functional as bnbf
        bnbf.quantize_4bit(torch.randn(64, 64, device=device, dtype=torch.float32), quant_type="nf4")
        return True
    except Exception:  # an import error, a missing native library, or no kernel for this device
        return False


def gpu_class(hw: Hardware) -> str:
    """The profile class of ``hw``: "cpu", "t4" (under 20 GiB or no bf16), "l4" (under 36 GiB) or "gpu"."""
    if not hw.cuda:
        return "cpu"
    if hw.simulated:
        return hw.simulated
    memory = hw.memory_bytes or 0
    if not hw.bf16 or memory < 20 * 2**30:
        return "t4"
    return "l4" if memory < 36 * 2**30 else "gpu"


def simulated_class() -> str | None:
    """``RECIPES_SIMULATE_GPU`` ("t4" or "l4"), checked; None when unset."""
    name = os.environ.get("RECIPES_SIMULATE_GPU", "").strip().lower() or None
    if name is not None and name not in ("t4", "l4"):
        raise RecipeError(f"RECIPES_SIMULATE_GPU={name!r}: set it to 't4' or 'l4', or unset it")
    return name


@functools.cache
def detect(device: str | None = None) -> Hardware:
    """Probe the (first) CUDA GPU if there is one, else the CPU; ``RECIPES_SIMULATE_GPU`` shrinks a GPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    simulated = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name, bf16 = props.name, torch.cuda.is_bf16_supported()
        memory, peak = props.total_memory, peak_flops_for(props.name)
        simulated = simulated_class()
        if simulated:
            cap = GPU_CLASSES[simulated]["memory"]
            if cap >= memory:
                raise RecipeError(f"RECIPES_SIMULATE_GPU={simulated}: this {name} has only "
                                  f"{memory / 2**30:.0f} GiB, not more than the {cap / 2**30:.0f} GiB "
                                  "it would cap")
            torch.cuda.set_per_process_memory_fraction(cap / memory, torch.cuda.current_device())
            memory, bf16 = cap, bf16 and GPU_CLASSES[simulated]["bf16"]
    else:
        name, bf16, memory, peak = "CPU", True, None, None
    kernel_dtype = None if dev.type != "cuda" else torch.bfloat16 if bf16 else torch.float16
    return Hardware(dev, name, bf16, sdpa_backends(dev, kernel_dtype), bitsandbytes_works(dev), peak, memory,
                    simulated)


def raise_recompile_limit(limit: int = 64) -> None:
    """Let torch.compile keep up to ``limit`` versions of one function (one per shape, model or mask).

    Past dynamo's default of 8 it silently falls back to eager code, which for a compiled decode step
    or FlexAttention means a different, much slower (or memory-hungry) program.
    """
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
