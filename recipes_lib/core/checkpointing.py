"""Activation checkpointing: recompute decoder layers' activations in backward, optionally offloading
the saved layer inputs to host memory.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from .errors import RecipeError


def enable_checkpointing(model, every: int = 1, offload: bool = False) -> list[int]:
    """Recompute decoder layers' activations in backward; returns the indices of the checkpointed layers.

    Args:
        every: checkpoint every ``every``-th decoder layer (1 = all: least memory; 2 = half of them:
            about half the memory saving for half the recomputation).
        offload: also keep the checkpointed layers' saved inputs in pinned host memory (activation
            offloading): frees ``layers * tokens * hidden`` bytes of device memory for two copies
            over PCIe per layer and step.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise RecipeError(f"every={every!r}: checkpoint every k-th layer with k a positive whole number")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    recompute = functools.partial(_offloaded_checkpoint if offload else checkpoint, use_reentrant=False)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):  # set here, so every version of transformers selects alike
        layer.gradient_checkpointing = index % every == 0
        layer._gradient_checkpointing_func = recompute
    return [i for i, layer in enumerate(layers) if layer.gradient_checkpointing]


def _offloaded_checkpoint(function, *args, **kwargs):
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    with torch.autograd.graph.save_on_cpu(pin_memory=device_type == "cuda"):
        return checkpoint(function, *args, **kwargs)


def disable_checkpointing(model) -> None:
    """Keep every activation again (undo ``enable_checkpointing``)."""
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            layer.gradient_checkpointing = False
