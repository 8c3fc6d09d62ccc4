"""A LoRA SwiGLU MLP as one autograd function, with its backward written out (Unsloth's ``LoRA_MLP``
approach), for a QLoRA model whose MLP projections are peft LoRA layers over a frozen base.

peft runs each of the three projections as a base linear plus an adapter path, and autograd keeps what
every one of those ops needs: the input, the adapter products, ``gate``, ``up``, ``silu(gate)`` and their
product. ``LoRAMLP`` keeps the input, ``gate``, ``up`` and the three rank-``r`` adapter products, and
recomputes the rest in a backward that computes only what training needs: the input's gradient and the
six adapter gradients (the base is frozen). The base weights are dequantized where they are used, in the
forward and again in the backward, never kept: a weight ``w`` enters as any tensor whose ``w.to(dtype)``
is the dense matrix, torchao's ``NF4Tensor`` (its dequantization) or a plain weight. Under
``torch.compile`` the function's pointwise work (SwiGLU and its derivative, the scaled adapter sums) is
fused with the dequantization into the layer's kernels.

``fuse(model)`` puts it into every decoder layer's MLP of a peft model in place, each projection with its
own scale; it refuses what the function does not compute (adapter dropout, DoRA, a bias on ``lora_B``,
merged adapters, several adapters, a base with a bias), and a call with the adapters disabled, merged or
switched since takes peft's own path. Notebook 01 measures it as one of the QLoRA
candidates (issue 18), on torchao's base with compiled layers.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from ..core.errors import RecipeError
from ..core.models import decoder_layers
from . import nf4_torchao


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class LoRAMLP(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` where each projection is ``x @ w.T + scale * (x @ a.T) @ b.T``."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                s_gate: float, s_up: float, s_down: float):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.reshape(-1, x.shape[-1]).to(dtype)  # [tokens, d]
            ax_gate, ax_up = xc @ a_gate.to(dtype).T, xc @ a_up.to(dtype).T
            gate = xc @ w_gate.to(dtype).T + s_gate * ax_gate @ b_gate.to(dtype).T
            up = xc @ w_up.to(dtype).T + s_up * ax_up @ b_up.to(dtype).T
            hidden = F.silu(gate) * up
            ah_down = hidden @ a_down.to(dtype).T
            out = hidden @ w_down.to(dtype).T + s_down * ah_down @ b_down.to(dtype).T
        ctx.save_for_backward(xc, gate, up, ax_gate, ax_up, ah_down, w_gate, w_up, w_down,
                              a_gate, b_gate, a_up, b_up, a_down, b_down)
        ctx.scales, ctx.dtype, ctx.x_dtype, ctx.x_shape = (s_gate, s_up, s_down), dtype, x.dtype, x.shape
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (xc, gate, up, ax_gate, ax_up, ah_down, w_gate, w_up, w_down,
         a_gate, b_gate, a_up, b_up, a_down, b_down) = ctx.saved_tensors
        (s_gate, s_up, s_down), dtype = ctx.scales, ctx.dtype
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
            sig = torch.sigmoid(gate)
            silu = gate * sig
            hidden = silu * up
            d_b_down = s_down * g.T @ ah_down
            d_ah_down = s_down * g @ b_down.to(dtype)
            d_a_down = d_ah_down.T @ hidden
            d_hidden = g @ w_down.to(dtype) + d_ah_down @ a_down.to(dtype)
            d_gate = d_hidden * up * sig * (1 + gate * (1 - sig))  # silu'(gate) = sig (1 + gate (1 - sig))
            d_up = d_hidden * silu
            d_b_gate, d_ax_gate = s_gate * d_gate.T @ ax_gate, s_gate * d_gate @ b_gate.to(dtype)
            d_b_up, d_ax_up = s_up * d_up.T @ ax_up, s_up * d_up @ b_up.to(dtype)
            d_x = (d_gate @ w_gate.to(dtype) + d_up @ w_up.to(dtype) + d_ax_gate @ a_gate.to(dtype)
                   + d_ax_up @ a_up.to(dtype))
            d_a_gate, d_a_up = d_ax_gate.T @ xc, d_ax_up.T @ xc
        grads = [d_a_gate, d_b_gate, d_a_up, d_b_up, d_a_down, d_b_down]
        params = [a_gate, b_gate, a_up, b_up, a_down, b_down]
        adapters = [d.to(p.dtype) for d, p in zip(grads, params, strict=True)]
        return (d_x.reshape(ctx.x_shape).to(ctx.x_dtype), None, None, None, *adapters, None, None, None)


def _parts(layer, name: str):
    """(base weight, lora A, lora B, scale) of the peft LoRA layer ``layer`` (one adapter, no dropout)."""
    keys = list(getattr(layer, "lora_A", {}))
    if len(keys) != 1:
        raise RecipeError(f"fuse: {name} is not a peft LoRA layer with one adapter (found {keys or 'none'})")
    key = keys[0]
    if not isinstance(layer.lora_dropout[key], torch.nn.Identity):
        raise RecipeError(f"fuse: {name} has adapter dropout, which the fused MLP does not apply: set "
                          "lora_dropout=0")
    unsupported = {"DoRA (use_dora)": layer.use_dora.get(key, False), "merged adapters": layer.merged,
                   "a bias on lora_B (lora_bias)": layer.lora_B[key].bias is not None}
    found = [what for what, on in unsupported.items() if on]
    if found:
        raise RecipeError(f"fuse: {name} has {', '.join(found)}, which the fused MLP does not compute")
    base = layer.get_base_layer()
    if getattr(base, "bias", None) is not None:
        raise RecipeError(f"fuse: {name}'s base has a bias, which the fused MLP does not add")
    weight = base.weight
    packed = weight.dtype == torch.uint8 or hasattr(weight, "quant_state")  # bitsandbytes, memory.nf4
    if packed and not isinstance(base, nf4_torchao.TorchaoNF4Linear):
        raise RecipeError(f"fuse: {name}'s 4-bit base cannot be dequantized by .to(dtype): use torchao's NF4 "
                          "base (qlora_model(base='torchao')) or an unquantized one")
    return weight, layer.lora_A[key].weight, layer.lora_B[key].weight, layer.scaling[key]


def _forward(mlp, x):
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if any(layer.disable_adapters or layer.merged or list(layer.active_adapters) != [mlp.lora_mlp_key]
           for layer in layers):  # the adapters as fused are not what peft would apply now: peft's path
        return type(mlp).forward(mlp, x)
    (wg, ag, bg, sg), (wu, au, bu, su), (wd, ad, bd, sd) = mlp.lora_mlp_parts
    return LoRAMLP.apply(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd)


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Run every decoder layer's SwiGLU MLP of the peft LoRA ``model`` through ``LoRAMLP``, in place;
    returns ``model``. Call it before ``speed.compile_layers``."""
    for index, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        names = ("gate_proj", "up_proj", "down_proj")
        act = type(getattr(mlp, "act_fn", None)).__name__
        if not all(hasattr(mlp, n) for n in names) or "SiLU" not in act:
            raise RecipeError(f"fuse: layer {index}'s MLP is not a SwiGLU (silu of gate_proj, up_proj, "
                              "down_proj)")
        # the parameters themselves: the optimizer updates them in place, so these stay current
        mlp.lora_mlp_parts = [_parts(getattr(mlp, n), f"layer {index} {n}") for n in names]
        mlp.lora_mlp_key = next(iter(mlp.gate_proj.lora_A))
        mlp.forward = types.MethodType(_forward, mlp)
    return model
