"""LayerNorm -> RMSNorm: the module, the swap that carries weights over, and the kernels to compare.

LayerNorm centres and scales: ``y = (x - mean(x)) / sqrt(var(x) + eps) * w + b``: two reductions
per row (mean, then variance). RMSNorm only scales: ``y = x / sqrt(mean(x^2) + eps) * w (+ b)``:
one reduction, no centring. Both are memory-bound: a fused kernel reads ``x`` once and writes ``y``
once, so the floor for forward + backward is the bytes moved over the memory bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import RecipeError
from . import rmsnorm_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The formula, in fp32 at least: ``x / sqrt(mean(x^2) + eps) * weight (+ bias)``, in ``x``'s dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(compute)
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with an optional bias (kept when it replaces a LayerNorm that had one).

    Args:
        fused: use ``torch.nn.functional.rms_norm`` (one native kernel where PyTorch has one)
            instead of the formula written out in PyTorch operations (several kernels).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, bias: bool = False, fused: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.eps, self.fused = eps, fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            y = F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return rms_norm_reference(x, self.weight, self.eps, self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}, fused={self.fused}"


def count_layernorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.LayerNorm) for m in model.modules())


def swap_layernorm(model: nn.Module, fused: bool = False) -> int:
    """Replace every ``nn.LayerNorm`` in ``model`` by an ``RMSNorm`` (same weight, bias); returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                if len(child.normalized_shape) != 1 or child.weight is None:
                    raise RecipeError(f"{name}: only LayerNorms over the last dimension with a weight "
                                      "can be swapped")
                norm = RMSNorm(child.normalized_shape[0], child.eps, bias=child.bias is not None, fused=fused)
                norm.to(device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                    if child.bias is not None:
                        norm.bias.copy_(child.bias)
                setattr(parent, name, norm)
                swapped += 1
    if swapped == 0:
        raise RecipeError("no nn.LayerNorm in this model: it already uses RMSNorm (Llama, Qwen, ...) "
                          "or a custom norm")
    return swapped


def set_fused(model: nn.Module, fused: bool) -> None:
    """Switch every RMSNorm of ``model`` between the native fused kernel and the written-out formula."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused = fused


def norm_functions(hidden: int, device: torch.device, dtype: torch.dtype,
                   compile: bool) -> dict[str, Callable]:
    """The norms to compare, each ``(x, weight, bias) -> y``: LayerNorm, RMSNorm eager / native / compiled,
    and on a GPU with Triton our two-kernel RMSNorm (``rmsnorm_triton``)."""
    eps = 1e-5
    functions = {
        "LayerNorm (native)": lambda x, w, b: F.layer_norm(x, (hidden,), w, b, eps),
        "RMSNorm (eager formula)": lambda x, w, b: rms_norm_reference(x, w, eps),
        "RMSNorm (F.rms_norm)": lambda x, w, b: F.rms_norm(x, (hidden,), w, eps),
    }
    if compile:
        functions["RMSNorm (compiled)"] = torch.compile(lambda x, w, b: rms_norm_reference(x, w, eps),
                                                        dynamic=False)
    if device.type == "cuda" and rmsnorm_triton.available():
        functions["RMSNorm (Triton)"] = lambda x, w, b: rmsnorm_triton.rms_norm(x, w, eps)
    return functions


def triton_errors(hidden: int, device: torch.device, dtype: torch.dtype, rows: int = 4096,
                  eps: float = 1e-5) -> dict[str, float]:
    """Largest errors of ``rmsnorm_triton`` against the formula in fp64: ``y``, ``dx``, ``dw`` (relative)."""
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
    dy = torch.randn_like(x)
    rmsnorm_triton.rms_norm(x, w, eps).backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, eps)
    y64.backward(dy.double())
    return {"y": (rmsnorm_triton.rms_norm(x, w, eps).double() - y64).abs().max().item(),
            "dx": (x.grad.double() - x64.grad).abs().max().item(),
            "dw (relative)": ((w.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()).item()}
