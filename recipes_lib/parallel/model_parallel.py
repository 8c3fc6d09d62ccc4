"""Naive model parallelism: one process, consecutive decoder layers on each GPU.

The baseline that splits a model too large for one GPU the simplest way (what ``device_map="auto"``
does at inference): only one GPU works at any moment, the others wait for its hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.models import decoder_layers, unwrap


def _move(obj, device: torch.device):
    """``obj`` with every tensor in it (tuples, lists, dicts) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _rest_to(module: torch.nn.Module, placed: set[int], device: torch.device) -> None:
    """Move every submodule of ``module`` except the ``placed`` ones (and their contents) to ``device``."""
    for child in module.children():
        if id(child) in placed:
            continue
        if any(id(m) in placed for m in child.modules()):
            _rest_to(child, placed, device)
        else:
            child.to(device)
    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        tensor.data = tensor.data.to(device)


def split_across_devices(model: torch.nn.Module, devices: Sequence[torch.device | str]) -> list[str]:
    """Naive model parallelism: consecutive decoder layers on each device, everything else on the first.

    A pre-forward hook on each layer (and on the final norm) moves its inputs to its own device, so
    one micro-batch runs through the GPUs in turn: only one of them works at any moment, and the
    hidden states cross between them twice per boundary (forward and backward). Returns the layers'
    devices.
    """
    devices = [torch.device(d) for d in devices]
    layers = decoder_layers(model)
    per_device = -(-len(layers) // len(devices))
    placed = []
    for index, layer in enumerate(layers):  # layers first: the whole model never sits on one GPU
        device = devices[index // per_device]
        layer.to(device)
        placed.append(str(device))
    _rest_to(model, {id(layer) for layer in layers}, devices[0])
    decoder = unwrap(model)
    decoder = decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder
    for module in [*layers, *(m for m in decoder.children() if not isinstance(m, torch.nn.ModuleList))]:
        device = next(module.parameters(), torch.empty(0, device=devices[0])).device
        module.register_forward_pre_hook(
            lambda _, args, kwargs, device=device: (_move(args, device), _move(kwargs, device)),
            with_kwargs=True)
    return placed


