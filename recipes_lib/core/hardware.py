"""What this machine can do: device, precision, attention backends, bitsandbytes, peak FLOP/s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

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
    def needs_loss_scaling(self) -> bool:
        return self.amp_dtype == torch.float16

    @property
    def model_dtype(self) -> torch.dtype:
        """dtype to hold weights in: bf16 where the GPU has it; else fp32 (fp16 AMP needs fp32 masters)."""
        return torch.bfloat16 if self.amp_dtype == torch.bfloat16 else torch.float32

    def summary(self) -> str:
        peak = f"{self.peak_flops / 1e12:.0f} TFLOP/s bf16 (datasheet)" if self.peak_flops else "unknown"
        memory = f"{self.memory_bytes / 2**30:.0f} GiB" if self.memory_bytes else "host memory"
        return (f"device: {self.name} ({self.device.type}, {memory}) | weights dtype: {self.model_dtype} "
                f"| SDPA backends: {', '.join(self.sdpa_backends)} | bitsandbytes: {self.bitsandbytes} "
                f"| peak: {peak}")


def peak_flops_for(name: str) -> float | None:
    """Datasheet dense bf16 peak for a GPU name as CUDA reports it, or None if unknown."""
    for key in sorted(DATASHEET_BF16_PEAK, key=len, reverse=True):
        if key in name:
            return DATASHEET_BF16_PEAK[key]
    return None


def sdpa_backends(device: torch.device) -> tuple[str, ...]:
    """SDPA kernels that actually run here, found by trying each on a small causal bf16/fp32 input."""
    from torch.nn.attention import sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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


@functools.cache
def detect(device: str | None = None) -> Hardware:
    """Probe the (first) CUDA GPU if there is one, else the CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name, bf16 = props.name, torch.cuda.is_bf16_supported()
        memory, peak = props.total_memory, peak_flops_for(props.name)
    else:
        name, bf16, memory, peak = "CPU", True, None, None
    return Hardware(dev, name, bf16, sdpa_backends(dev), bitsandbytes_works(dev), peak, memory)


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
