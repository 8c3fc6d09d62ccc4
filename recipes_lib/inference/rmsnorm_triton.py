"""RMSNorm forward + backward as two Triton kernels that move the least bytes a fused norm can.

RMSNorm is memory-bound: a few FLOPs per element against 2 bytes (bf16) read or written, so its
time is bytes moved over memory bandwidth. For ``x`` of ``rows x hidden`` elements of ``s`` bytes:

- **forward** reads ``x`` once and writes ``y`` once: ``2 * rows * hidden * s``. One program per
  row loads the whole row into registers (``BLOCK = next_power_of_2(hidden)``, masked), reduces
  ``mean(x^2)`` in fp32, and writes ``y = x * rstd * w``. It also writes ``rstd`` (4 bytes a row,
  fp32) for the backward; the weight (``hidden * s``) is read by every program but stays in L2.
- **backward** reads ``x`` and ``dy`` once and writes ``dx`` once: ``3 * rows * hidden * s``.
  ``dx = rstd * (w*dy - x_hat * mean(w*dy * x_hat))`` with ``x_hat = x * rstd`` needs only its own
  row. The weight gradient ``dw = sum over rows of dy * x_hat`` needs every row; one program per
  row would have to write a ``rows x hidden`` fp32 buffer (more bytes than ``x`` itself) or add
  into ``dw`` with atomics (contended, and not deterministic). Instead a persistent grid of
  ``programs`` (about 32 warps' worth per SM) walks the rows ``program, program + programs, ...``
  and keeps a fp32 partial ``dw`` in registers across its rows. Each program writes its partial
  once, to a ``programs x hidden`` fp32 buffer, and ``torch`` sums it: ``2 * programs * hidden * 4``
  bytes, independent of ``rows``. On an H100 (132 SMs) at hidden 2048 that is 528 programs, 8.7 MB
  against the 1.34 GB a forward + backward moves for 64k rows in bf16: 0.6 %. The sum over rows
  is in a fixed order: deterministic.

Together that is ``5 * rows * hidden * s``: ``norms.bytes_moved``, the floor the notebook's
benchmark divides by the copy bandwidth. The formula written out in PyTorch operations launches a
kernel per operation, each reading and writing a full-size tensor; ``F.rms_norm`` and
``torch.compile`` fuse as well, and how close each comes to the floor is what the benchmark measures.

Everything is computed in fp32 inside the kernels: ``y`` and ``dx`` come out in ``x``'s dtype, ``dw``
in the weight's dtype. For bf16, fp16 and fp32 inputs that is what ``norms.rms_norm_reference`` does;
fp64 inputs are accepted but computed in fp32 too (errors near 1e-7, not 1e-16).

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter: ``TRITON_INTERPRET=1``
in the environment *before Python starts*. ``triton.jit`` picks the interpreter when it decorates a
function: this module's kernels at its import, Triton's own ``tl.sum`` at ``triton``'s first import,
which ``transformers`` already does. The interpreter runs each program in NumPy, one after another:
it runs the indexing, masks and fp32 arithmetic, not ``num_warps``, registers, speed or races.
"""

from __future__ import annotations

import os

import torch

from ..core.errors import RecipeError

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is installed with CUDA builds of torch only
    triton = None

# Read when the kernels below are decorated, which is when triton.jit decides whether to interpret them.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SET_TOO_LATE = ("TRITON_INTERPRET=1 was set after triton's first import (transformers imports it), so "
                 "Triton's own tl.sum is compiled, not interpreted: set it before Python starts")

# A whole row lives in registers, as fp32. ptxas for sm_90 (H100) fits the backward without spilling up to
# hidden 8192 (126 registers a thread at 16 warps); 16384 spills a little (136 bytes a thread at 32 warps);
# 32768 spills about 5x that. Wider rows would want a kernel that loops over chunks of the row.
MAX_HIDDEN = 16384
INTERPRETER_PROGRAMS = 4  # backward programs on the interpreter: few, so that each walks several rows


def available() -> bool:
    """Whether the kernels can run here: Triton is importable, and CUDA is there or the interpreter is on."""
    return triton is not None and (_INTERPRET or torch.cuda.is_available())


def num_warps_for(block: int) -> int:
    """Warps per program for a row of ``block`` elements: 8 to 16 elements per thread and array from 2048 on.

    At 16384, 32 warps (1024 threads, at most 64 registers each) spill less than 16 warps do.
    """
    if block >= 16384:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def backward_programs(rows: int, device: torch.device, num_warps: int) -> int:
    """Persistent backward grid: about 32 warps' worth of programs per SM, never more programs than rows.

    Measured on an H100 at ``[65536, 2048]`` bf16 (8 warps a program), forward + backward: 16 warps
    per SM took 1.38x the bandwidth floor, 32 warps 1.22x, 64 warps 1.28x. More rows in flight per SM
    hide more memory latency, until the partial ``dw`` buffers and the lost overlap at the end cost more.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = sms * max(1, 32 // num_warps)
    else:
        programs = INTERPRETER_PROGRAMS
    return max(1, min(programs, rows))


if triton is not None:

    @triton.jit
    def _rms_norm_forward_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows * stride can pass 2**31 elements
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)  # masked lanes are 0: they add nothing
        tl.store(RSTD + row, rstd)
        tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_backward_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,
                                  n_rows, n_cols, BLOCK: tl.constexpr):
        program = tl.program_id(0).to(tl.int64)  # in int64: program * stride can pass 2**31 elements
        programs = tl.num_programs(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        # Pointers advance by `programs` rows a step: row * stride itself could pass 2**31 elements.
        x_ptr, dy_ptr, dx_ptr = X + program * stride_x, DY + program * stride_dy, DX + program * stride_dx
        for row in range(program, n_rows, programs):
            x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            wdy = w * dy
            dx = rstd * (wdy - x_hat * (tl.sum(wdy * x_hat, axis=0) / n_cols))
            tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat
            x_ptr += programs * stride_x
            dy_ptr += programs * stride_dy
            dx_ptr += programs * stride_dx
        tl.store(DW_PARTIAL + program * n_cols + cols, dw, mask=mask)


def _as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``t`` as ``[rows, hidden]`` with unit stride along hidden (a copy only where a view can't be)."""
    t = t.reshape(-1, hidden)
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        hidden = x.shape[-1]
        x2 = _as_rows(x, hidden)
        weight = weight.contiguous()
        rows = x2.shape[0]
        y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(hidden)
        num_warps = num_warps_for(block)
        if rows > 0:
            _rms_norm_forward_kernel[(rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), hidden, eps,
                                              BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape, ctx.block, ctx.num_warps = x.shape, block, num_warps
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: create_graph=True raises, not drops
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, hidden = x2.shape
        dy2 = _as_rows(dy, hidden)  # an expanded dy (from .sum().backward()) has stride 0: copied here
        dx = torch.empty((rows, hidden), dtype=x2.dtype, device=x2.device)
        programs = backward_programs(rows, x2.device, ctx.num_warps)
        # Every program writes its whole partial, so no zeroing pass; without rows there is no launch.
        dw_partial = (torch.empty if rows > 0 else torch.zeros)((programs, hidden), dtype=torch.float32,
                                                               device=x2.device)
        if rows > 0:
            _rms_norm_backward_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0),
                                                   x2.stride(0), dx.stride(0), rows, hidden,
                                                   BLOCK=ctx.block, num_warps=ctx.num_warps)
        dw = dw_partial.sum(0).to(weight.dtype)
        dx = dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, (dw if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, with the fused Triton kernels.

    ``x`` may have any leading dimensions and strides; ``weight`` is ``(hidden,)``. Differentiable in
    ``x`` and ``weight`` (plain autograd; not traced into ``torch.compile`` graphs).
    """
    if not available():
        raise RecipeError("the Triton RMSNorm needs triton and a CUDA GPU (or TRITON_INTERPRET=1 set before "
                          "Python starts, to run on CPU); use norms.RMSNorm otherwise")
    if x.dim() >= 1 and x.shape[-1] == 0:
        raise RecipeError(f"x of shape {tuple(x.shape)} has an empty last dimension: nothing to normalise")
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise RecipeError(f"weight shape {tuple(weight.shape)} does not match x's last dimension: expected "
                          f"({x.shape[-1] if x.dim() else '?'},) for x of shape {tuple(x.shape)}")
    if weight.device != x.device:
        raise RecipeError(f"x is on {x.device} but weight on {weight.device}: move them to one device")
    if x.device.type != "cuda" and not _INTERPRET:
        raise RecipeError(f"x is on {x.device}: the Triton kernels run on CUDA tensors "
                          "(or on CPU with TRITON_INTERPRET=1 set before Python starts)")
    if _INTERPRET and type(tl.sum).__name__ != "InterpretedFunction":
        raise RecipeError(_SET_TOO_LATE)
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise RecipeError(f"x ({x.dtype}) and weight ({weight.dtype}) must be floating point")
    if x.shape[-1] > MAX_HIDDEN:
        raise RecipeError(f"hidden={x.shape[-1]} is over {MAX_HIDDEN}: these kernels hold a whole row in "
                          "registers; use norms.RMSNorm(fused=True) for rows this wide")
    return _RMSNormFunction.apply(x, weight, eps)
