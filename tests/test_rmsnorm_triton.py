"""The Triton RMSNorm against norms.rms_norm_reference and its autograd: on CPU under Triton's interpreter.

Skipped without triton (CI installs none). ``triton.jit`` chooses the interpreter when it decorates a
function, and Triton's own helpers (``tl.sum``, ``tl.zeros``) are decorated when ``triton`` is first
imported: here that is conftest's ``transformers`` import, before this module runs, so setting
TRITON_INTERPRET=1 in this module comes too late. Unless the session was started with it (or has a GPU),
``test_in_a_process_started_with_the_interpreter`` runs this file again in a child pytest that is.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from recipes_lib.core.errors import RecipeError
from recipes_lib.inference import norms, rmsnorm_triton

EPS = 1e-6
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
runs_kernels = pytest.mark.skipif(not rmsnorm_triton.available(),
                                  reason="no GPU: runs in the child process started with TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(),
                    reason="this process is the interpreter one, or has a GPU: the kernel tests run here")
def test_in_a_process_started_with_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    repo = Path(__file__).resolve().parent.parent
    child = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-rs"],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in child.stdout and "runs in the child process" not in child.stdout  # kernels ran there


@pytest.mark.skipif(rmsnorm_triton.available(), reason="the kernels can run here")
def test_without_gpu_or_interpreter_is_refused():
    with pytest.raises(RecipeError, match="needs triton and a CUDA GPU"):
        rmsnorm_triton.rms_norm(torch.randn(2, 8), torch.ones(8))


@pytest.mark.skipif(INTERPRETED, reason="here triton was first imported with the interpreter on")
def test_interpreter_switched_on_too_late_is_refused(monkeypatch):
    monkeypatch.setattr(rmsnorm_triton, "_INTERPRET", True)  # as if TRITON_INTERPRET=1 came after triton
    with pytest.raises(RecipeError, match="after triton's first import"):
        rmsnorm_triton.rms_norm(torch.randn(2, 8), torch.ones(8))


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    return x, w, dy


@runs_kernels
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(6, 64), (2, 5, 96)])  # 96: not a power of two (masked lanes); 3-D
def test_forward_matches_reference(shape, dtype, tol):
    x, w, _ = _inputs(shape, dtype)
    y = rmsnorm_triton.rms_norm(x, w, EPS)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, norms.rms_norm_reference(x, w, EPS), rtol=tol, atol=tol)


# 11 and 9 rows over the interpreter's 4 backward programs (3, 3, 3, 2 and 3, 2, 2, 2 rows each);
# 2 rows: a grid of 2, capped by the rows.
@runs_kernels
@pytest.mark.parametrize("shape", [(11, 96), (3, 3, 40), (2, 64)])
def test_backward_matches_autograd_of_reference(shape):
    x, w, dy = _inputs(shape, torch.float32, seed=1)
    dx, dw = torch.autograd.grad(rmsnorm_triton.rms_norm(x, w, EPS), (x, w), dy)
    ref_dx, ref_dw = torch.autograd.grad(norms.rms_norm_reference(x, w, EPS), (x, w), dy)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-4)


@runs_kernels
def test_bf16_backward_keeps_dtypes_and_is_close():
    x, w, dy = _inputs((5, 48), torch.bfloat16, seed=2)
    dx, dw = torch.autograd.grad(rmsnorm_triton.rms_norm(x, w, EPS), (x, w), dy)
    assert dx.dtype == dw.dtype == torch.bfloat16
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref_dx, ref_dw = torch.autograd.grad(norms.rms_norm_reference(x32, w32, EPS), (x32, w32), dy.float())
    torch.testing.assert_close(dx.float(), ref_dx, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw.float(), ref_dw, rtol=2e-2, atol=2e-2)


@runs_kernels
def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, generator=g).to(DEVICE).t().requires_grad_()  # [8, 16], strides (1, 8): copied
    w = torch.linspace(0.5, 1.5, 16, device=DEVICE, requires_grad=True)
    dy = torch.randn(16, 8, generator=g).to(DEVICE).t()
    dx, dw = torch.autograd.grad(rmsnorm_triton.rms_norm(x, w, EPS), (x, w), dy)
    ref_dx, ref_dw = torch.autograd.grad(norms.rms_norm_reference(x, w, EPS), (x, w), dy)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-4)
    # A row-strided view (rows 12 wide, 16 apart) goes to the kernels as it is, with its row stride.
    xs = torch.randn(8, 16, generator=g).to(DEVICE)[:, :12].requires_grad_()
    ws = w.detach()[:12].requires_grad_()
    y = rmsnorm_triton.rms_norm(xs, ws, EPS)
    torch.testing.assert_close(y, norms.rms_norm_reference(xs, ws, EPS), rtol=1e-5, atol=1e-5)
    dx, dw = torch.autograd.grad(y, (xs, ws), dy[:, :12])
    ref_dx, ref_dw = torch.autograd.grad(norms.rms_norm_reference(xs, ws, EPS), (xs, ws), dy[:, :12])
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-4)


@runs_kernels
def test_sum_backward_with_expanded_gradient():
    x, w, _ = _inputs((3, 32), torch.float32, seed=4)
    rmsnorm_triton.rms_norm(x, w, EPS).sum().backward()  # dy arrives expanded, all strides 0
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    norms.rms_norm_reference(x2, w2, EPS).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-4)


@runs_kernels
def test_bad_weight_shape_is_refused():
    x = torch.randn(4, 32, device=DEVICE)
    with pytest.raises(RecipeError, match="weight shape"):
        rmsnorm_triton.rms_norm(x, torch.ones(16, device=DEVICE))
    with pytest.raises(RecipeError, match="weight shape"):
        rmsnorm_triton.rms_norm(x, torch.ones(1, 32, device=DEVICE))


@runs_kernels
def test_empty_rows_are_refused_and_double_backward_raises():
    with pytest.raises(RecipeError, match="empty last dimension"):
        rmsnorm_triton.rms_norm(torch.randn(3, 0, device=DEVICE), torch.ones(0, device=DEVICE))
    x, w, _ = _inputs((3, 32), torch.float32, seed=5)
    (dx,) = torch.autograd.grad(rmsnorm_triton.rms_norm(x, w, EPS).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        dx.sum().backward()  # a second derivative is refused, never silently zero
