"""CPU offloading of optimizer states, through torchao's ``CPUOffloadOptimizer``.

AdamW keeps two moments per trainable parameter (8 bytes/param in fp32). Offloading keeps them, an
fp32 master copy of the parameters, and the optimizer step itself in pinned host memory; gradients
stream to the host on a side CUDA stream as backward produces them, and updated parameters stream
back. Accelerator memory saved: the optimizer state; cost: PCIe traffic and a CPU AdamW step.

Why torchao: it offloads exactly the optimizer (parameters stay on the GPU, no process group or
sharding wrapper needed on one GPU), overlaps transfers with backward, and is maintained by the
PyTorch team. FSDP2's ``CPUOffloadPolicy`` (notebook 02) also offloads parameters and needs a
process group; DeepSpeed's ZeRO-Offload needs its launcher and a config file.
On a machine without an accelerator there is nothing to offload to: the state already lives in
host memory, and ``offloaded_adamw`` returns a plain AdamW and says so.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..core.errors import RecipeError
from ..measure.memory import optimizer_tensors, tensor_bytes


def offloaded_adamw(params, device: torch.device, lr: float = 1e-4, **kwargs):
    """AdamW whose state and step live in host memory when ``device`` is an accelerator.

    Not compatible with gradient clipping on the device gradients (the host copies are taken during
    backward): train with ``max_grad_norm=None``.
    """
    params = [p for p in params if p.requires_grad]
    if device.type == "cpu":
        return torch.optim.AdamW(params, lr=lr, **kwargs)
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError:
        raise RecipeError("optimizer offloading uses torchao: pip install torchao "
                          "(or pip install -e '.[offload]')") from None
    if device.type not in ("cuda", "xpu"):
        warnings.warn(f"torchao offloads from CUDA/XPU only; {device.type} keeps a plain AdamW", stacklevel=2)
        return torch.optim.AdamW(params, lr=lr, **kwargs)
    optimizer = CPUOffloadOptimizer(params, torch.optim.AdamW, offload_gradients=False, lr=lr, fused=True,
                                    **kwargs)
    optimizer.release = functools.partial(release, optimizer)
    return optimizer


def release(optimizer) -> None:
    """Let an offloading optimizer's model be freed: call it when done with both.

    torchao registers a post-accumulate-grad hook on every offloaded parameter whose closure holds
    the optimizer, which maps each parameter to its host copy and state. That cycle runs through the
    autograd engine's C++ hook list, where Python's garbage collector cannot see it, so ``del model,
    optimizer`` frees neither: the model's weights stay on the device for the rest of the process.
    Emptying the optimizer's maps breaks the cycle (the hooks stay, pointing at an empty optimizer).
    """
    for name in ("param_d2h_map", "optim_dict", "queue"):
        getattr(optimizer, name, {}).clear()
    if hasattr(optimizer, "d_opt"):
        optimizer.d_opt, optimizer.d_param_groups = None, []


def optimizer_state_bytes(optimizer) -> dict[str, int]:
    """Bytes of optimizer state per device type, e.g. ``{"cpu": ..., "cuda": ...}`` (after a step).

    torchao keeps parameters smaller than its ``minimal_size`` (norm weights) and their state on
    the device: a sliver next to the rest.
    """
    tensors = optimizer_tensors(optimizer)
    kinds = sorted({t.device.type for t in tensors})
    return {kind: tensor_bytes(tensors, torch.device(kind)) for kind in kinds}
