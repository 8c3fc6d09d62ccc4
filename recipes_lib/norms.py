"""LayerNorm -> RMSNorm: the module, the swap that carries weights over, and the kernel benchmark.

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

from . import measure, rmsnorm_triton
from .hardware import RecipeError


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
    """Replace every ``nn.LayerNorm`` in ``model`` by an ``RMSNorm`` with its weight and bias; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                if len(child.normalized_shape) != 1 or child.weight is None:
                    raise RecipeError(f"{name}: only LayerNorms over the last dimension with a weight can be swapped")
                norm = RMSNorm(child.normalized_shape[0], child.eps, bias=child.bias is not None, fused=fused)
                norm.to(device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                    if child.bias is not None:
                        norm.bias.copy_(child.bias)
                setattr(parent, name, norm)
                swapped += 1
    if swapped == 0:
        raise RecipeError("no nn.LayerNorm in this model: it already uses RMSNorm (Llama, Qwen, ...) or a custom norm")
    return swapped


def set_fused(model: nn.Module, fused: bool) -> None:
    """Switch every RMSNorm of ``model`` between the native fused kernel and the written-out formula."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused = fused


# --- kernel benchmark -------------------------------------------------------------------------

def norm_functions(hidden: int, device: torch.device, dtype: torch.dtype, compile: bool) -> dict[str, Callable]:
    """The norms to compare, each ``(x, weight, bias) -> y``: LayerNorm, RMSNorm eager / native / compiled,
    and on a GPU with Triton our two-kernel RMSNorm (``rmsnorm_triton``)."""
    eps = 1e-5
    functions = {
        "LayerNorm (native)": lambda x, w, b: F.layer_norm(x, (hidden,), w, b, eps),
        "RMSNorm (eager formula)": lambda x, w, b: rms_norm_reference(x, w, eps),
        "RMSNorm (F.rms_norm)": lambda x, w, b: F.rms_norm(x, (hidden,), w, eps),
    }
    if compile:
        functions["RMSNorm (compiled)"] = torch.compile(lambda x, w, b: rms_norm_reference(x, w, eps), dynamic=False)
    if device.type == "cuda" and rmsnorm_triton.available():
        functions["RMSNorm (Triton)"] = lambda x, w, b: rmsnorm_triton.rms_norm(x, w, eps)
    return functions


def forward_backward_seconds(fn: Callable, rows: int, hidden: int, device: torch.device, dtype: torch.dtype,
                             repeats: int = 20, warmup: int = 3) -> float:
    """Median time of ``fn``'s forward and backward on ``[rows, hidden]`` (gradients for x and weight)."""
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(rows, hidden, device=device, dtype=dtype)

    def step():
        x.grad = w.grad = b.grad = None
        fn(x, w, b).backward(grad)

    return measure.median_seconds(step, device, repeats, warmup)


def bytes_moved(rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Least bytes a fused forward + backward must move: read x, write y; read x and dy, write dx."""
    return 5 * rows * hidden * torch.tensor([], dtype=dtype).element_size()


def copy_bandwidth(device: torch.device, n_bytes: int = 2**30, repeats: int = 20) -> float:
    """Measured memory bandwidth, bytes/s, from a large device-to-device copy (read + write counted)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = measure.median_seconds(lambda: dst.copy_(src), device, repeats, warmup=3)
    return 2 * n_bytes / seconds


def train_step_seconds(model: nn.Module, batch: int, seq_len: int, repeats: int = 5, warmup: int = 2,
                       autocast_dtype: torch.dtype | None = None) -> float:
    """Median time of one forward + backward of ``model`` on random tokens (the end-to-end cost of its norms)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return measure.median_seconds(step, device, repeats, warmup)
