"""A QLoRA base on torchao's ``NF4Tensor``: torchtune's way to a fast 4-bit base under ``torch.compile``.

Each frozen linear layer's weight becomes an ``NF4Tensor`` (64-value blocks, double-quantized scales in
blocks of 256: ~0.516 byte per parameter, bitsandbytes' layout), and the layer runs ``linear_nf4``, an
autograd function that saves the 4-bit weight for the backward and dequantizes it there again. The
tensor subclass is traceable, so a compiled decoder layer fuses the dequantization. It is one of notebook
01's QLoRA candidates beside bitsandbytes' ``Linear4bit`` and our own ``memory.nf4``.

torchao moved the NF4 code between releases (``torchao.dtypes.nf4tensor`` before 0.15,
``torchao.quantization`` after); both are tried.
"""

from __future__ import annotations

import re

import torch

from ..core.errors import RecipeError
from ..measure import flops


def _torchao_nf4():
    """torchao's ``(to_nf4, linear_nf4)``, wherever this version keeps them."""
    for where in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            module = __import__(where, fromlist=["to_nf4", "linear_nf4"])
            return module.to_nf4, module.linear_nf4
        except ImportError:
            continue
    raise RecipeError("torchao's NF4 tensor is not importable: pip install torchao (>= 0.12), or pick "
                      "base='bitsandbytes' or base='torch'")


BLOCKS = 64 * 256  # torchao's default block_size x scaler_block_size


def unsupported(config) -> str | None:
    """Why ``quantize_model`` cannot take every decoder linear layer of a model of ``config`` (None: it
    can): each must be an ``nn.Linear`` (GPT-2's are ``Conv1D``) of a multiple of ``BLOCKS`` weights."""
    if config.model_type == "gpt2":
        return "its layers are Conv1D, not nn.Linear"
    try:
        shapes = flops.linear_shapes(config)
    except (AttributeError, KeyError, TypeError, ValueError):  # a family whose widths flops does not know
        return f"{config.model_type}'s layer shapes are not known here"
    odd = sorted({i * o for i, o in shapes if (i * o) % BLOCKS})
    return f"a layer of {odd[0]} weights is not a multiple of {BLOCKS}" if odd else None


class TorchaoNF4Linear(torch.nn.Linear):
    """A frozen linear layer whose weight is a torchao ``NF4Tensor`` (built by ``from_linear``)."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype) -> TorchaoNF4Linear:
        to_nf4, _ = _torchao_nf4()
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(compute_dtype)
        layer.weight = torch.nn.Parameter(to_nf4(weight), requires_grad=False)
        layer.linear_nf4 = _torchao_nf4()[1]  # looked up once: an import inside forward breaks the graph
        bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(compute_dtype),
                                                                    requires_grad=False)
        layer.register_parameter("bias", bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear_nf4(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def quantize_model(model: torch.nn.Module, compute_dtype: torch.dtype,
                   skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Every ``nn.Linear`` of ``model`` (but those whose name matches a ``skip`` pattern) as a
    ``TorchaoNF4Linear``, in place; returns ``model``. Each weight's numel must be a multiple of
    ``BLOCKS`` (64-value blocks whose scales are quantized 256 at a time)."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and not any(re.search(p, name) for p in skip)]
    for name, linear in targets:
        if linear.weight.numel() % BLOCKS:
            raise RecipeError(f"{name}: {linear.weight.numel()} weights are not a multiple of {BLOCKS} "
                              "(torchao NF4's 64-value blocks, scales in 256s); skip it (skip=) or use "
                              "base='torch'")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                TorchaoNF4Linear.from_linear(linear, compute_dtype))
    return model
