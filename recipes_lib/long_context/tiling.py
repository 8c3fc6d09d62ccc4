"""Tiled MLP: a decoder layer's feed-forward block computed over the sequence one chunk at a time.

A Llama-style MLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, keeps four ``[tokens, intermediate]``
tensors for backward (the gate and up projections, the activation and their product): at
``intermediate = 4 * hidden`` that is 16x its input, the largest activation of a layer at long length.
As in Arctic Long Sequence Training (ALST), the tiled version runs inside one autograd function that
saves only its input and, in backward, recomputes each chunk and back-propagates through it, so those
tensors exist for one chunk at a time. The projections are called as modules, never read as weights,
so LoRA-wrapped projections (peft) train through it, and a checkpointed layer may recompute it whole.
"""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from ..core.errors import RecipeError
from ..measure.step_split import MLP_RANGE

_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether ``module`` has the Llama/Qwen/Mistral MLP structure (gate, up and down projections)."""
    return all(hasattr(module, part) for part in _PARTS) and callable(getattr(type(module), "forward", None))


class _TiledMLPFunction(torch.autograd.Function):
    """``forward(x)`` of one MLP in chunks of rows, saving only ``x``; backward recomputes per chunk. Both
    run inside the profiler range ``MLP_RANGE`` (no cost when no profiler runs): ``measure.step_split``
    counts what runs there as the MLP's time."""

    @staticmethod
    def forward(ctx, mlp, chunk_tokens, x, *params):
        with torch.profiler.record_function(MLP_RANGE):
            return _TiledMLPFunction._forward(ctx, mlp, chunk_tokens, x, *params)

    @staticmethod
    def _forward(ctx, mlp, chunk_tokens, x, *params):
        ctx.mlp, ctx.chunk_tokens, ctx.params = mlp, chunk_tokens, params
        device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        # Backward replays the chunks from this RNG state, so a LoRA dropout draws the same masks.
        ctx.cpu_rng = torch.get_rng_state()
        ctx.devices, ctx.device_rng = get_device_states(x)
        ctx.save_for_backward(x)
        rows = x.reshape(-1, x.shape[-1])
        out = None
        for start in range(0, rows.shape[0], chunk_tokens):
            piece = _untiled(mlp, rows[start:start + chunk_tokens])
            if out is None:
                out = piece.new_empty((rows.shape[0], piece.shape[-1]))
            out[start:start + chunk_tokens] = piece
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        with torch.profiler.record_function(MLP_RANGE):
            return _TiledMLPFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        params = list(ctx.params)
        rows = x.detach().reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if ctx.needs_input_grad[2] else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        enabled, dtype = ctx.autocast
        device_type = x.device.type
        rng_type = "cuda" if device_type == "cpu" else device_type  # as torch's checkpoint picks it
        with torch.random.fork_rng(devices=ctx.devices, device_type=rng_type):
            torch.set_rng_state(ctx.cpu_rng)
            set_device_states(ctx.devices, ctx.device_rng, device_type=rng_type)
            for start in range(0, rows.shape[0], ctx.chunk_tokens):
                stop = start + ctx.chunk_tokens
                piece = rows[start:stop].detach().requires_grad_(grad_x is not None)
                with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    out = _untiled(ctx.mlp, piece)
                inputs = ([piece] if grad_x is not None else []) + params
                grads = list(torch.autograd.grad(out, inputs, grad_rows[start:stop], allow_unused=True))
                if grad_x is not None:
                    grad_x[start:stop] = grads.pop(0)
                for i, grad in enumerate(grads):
                    if grad is not None:  # summed in fp32: bf16 sums lose bits with every chunk
                        grad_params[i] = grad.float() if grad_params[i] is None else grad_params[i].add_(grad)
        grad_params = [g if g is None else g.to(p.dtype) for g, p in zip(grad_params, params, strict=True)]
        grad_x = None if grad_x is None else grad_x.reshape(x.shape)
        # The parameters are inputs of the function: their gradients return through autograd, so
        # hooks, gradient accumulation and sharded wrappers see them as they would untiled.
        return (None, None, grad_x, *grad_params)


def _untiled(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(mlp).forward(mlp, x)


def _tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    params = [p for p in self.parameters() if p.requires_grad]
    return _TiledMLPFunction.apply(self, self.tile_chunk_tokens, x, *params)


def tile_mlp(model: torch.nn.Module, chunk_tokens: int) -> int:
    """Compute every gated MLP of ``model`` in chunks of ``chunk_tokens`` rows; returns how many changed.

    Args:
        chunk_tokens: rows (batch x sequence positions) per chunk: the ``[tokens, intermediate]``
            activations then take ``chunk_tokens / tokens`` of their untiled memory, for one extra
            MLP forward per step (the recomputation in backward). Calling again sets a new size.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise RecipeError(f"chunk_tokens={chunk_tokens!r}: the tiled MLP's chunk is a positive whole "
                          f"number of tokens (e.g. 8192); pass one")
    mlps = [m for m in model.modules() if is_gated_mlp(m)]
    if not mlps:
        raise RecipeError(f"tile_mlp: {type(model).__name__} has no gated MLP (a module with "
                          f"{', '.join(_PARTS)}, as Llama, Qwen and Mistral have); tile_mlp supports "
                          f"only those: leave the MLP untiled for this model")
    for mlp in mlps:
        mlp.tile_chunk_tokens = chunk_tokens
        mlp.forward = types.MethodType(_tiled_forward, mlp)
    return len(mlps)


def untile_mlp(model: torch.nn.Module) -> int:
    """Undo ``tile_mlp``: every MLP computes the whole sequence at once again; returns how many changed."""
    changed = 0
    for mlp in model.modules():
        if "tile_chunk_tokens" in vars(mlp):
            del mlp.forward, mlp.tile_chunk_tokens
            changed += 1
    return changed


def is_tiled(model: torch.nn.Module) -> bool:
    """Whether any MLP of ``model`` is tiled."""
    return any("tile_chunk_tokens" in vars(m) for m in model.modules())


def agreement(model: torch.nn.Module, tokens: int = 1000, chunk_tokens: int = 256, seed: int = 0) -> dict:
    """Relative errors of the tiled MLP against the untiled one: the first gated MLP of ``model`` on random
    ``[1, tokens, hidden]`` input, its output and the gradients of its input and of each weight, before
    and after ``tile_mlp(model, chunk_tokens)`` (left tiled). Run it in fp32 to check the arithmetic."""
    mlp = next(m for m in model.modules() if is_gated_mlp(m))
    weight = next(mlp.parameters())
    generator = torch.Generator(weight.device).manual_seed(seed)
    x = torch.randn(1, tokens, weight.shape[1], generator=generator, device=weight.device, dtype=weight.dtype)
    grad_out = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x.requires_grad_(True)

    def outputs():
        out = mlp(x)
        return [out, *torch.autograd.grad(out, [x, *mlp.parameters()], grad_out)]

    untiled = outputs()
    tile_mlp(model, chunk_tokens)
    names = ["output", "d input", *(f"d {name}" for name, _ in mlp.named_parameters())]
    pairs = zip(names, outputs(), untiled, strict=True)
    return {name: ((tiled - plain).norm() / plain.norm()).item() for name, tiled, plain in pairs}
