"""INT8 post-training quantization: LLM.int8() for memory, int8 weight-only for decode speed.

- **LLM.int8()** (bitsandbytes, ``models.load_model(..., quantization="int8")``): int8 weights with
  per-row scales; at run time activation columns with outliers (|x| > 6) are multiplied in fp16 and
  the rest in int8, then both parts are summed. It halves weight memory, but the outlier split and
  the extra quantize/dequantize kernels make it slower than bf16, most of all at batch 1.
- **int8 weight-only** (torchao ``Int8WeightOnlyConfig``): int8 weights with one scale per output
  row, ``y = (x @ W_int8.T) * scale``, activations stay bf16. Decoding one token reads every weight
  once, so halving the bytes read can nearly halve the step time, *if* the int8-to-bf16 conversion
  is fused into the matmul: ``torch.compile`` (Inductor) does that fusion; eagerly the weight is
  first converted into a bf16 copy, which is slower than plain bf16.

Without torchao (it is installed on GPU machines only) ``int8_weight_only`` falls back to
``Int8WeightOnlyLinear``, the same arithmetic in plain PyTorch.

- **int4 weight-only** (torchao ``Int4WeightOnlyConfig``, tile-packed for PyTorch's tinygemm kernel
  ``_weight_int4pack_mm``): 4-bit weights in groups of 128 inputs with a bf16 scale and zero per group.
  CUDA only (compute capability 8.0 or newer) and bf16 weights; ``int4_unavailable`` says why not here.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import RecipeError
from ..measure.memory import tensor_bytes


class Int8WeightOnlyLinear(nn.Module):
    """A linear layer with int8 weights and one scale per output row (weight-only quantization)."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        """Symmetric per-row quantization: ``scale = max|w_row| / 127``, ``q = round(w / scale)``."""
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(linear.weight.dtype), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def quantization_of(model: nn.Module) -> str | None:
    """How ``model`` is already quantized (a short description), or None for plain float weights."""
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, Int8WeightOnlyLinear) or kind in ("Linear8bitLt", "Linear4bit"):
            return f"{kind} at {name}"
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and hasattr(weight, "__tensor_flatten__"):
            return f"{type(weight).__name__} weight at {name}"
        if isinstance(weight, torch.Tensor) and weight.dtype in (torch.int8, torch.uint8):
            return f"{weight.dtype} weight at {name}"
    return None


def int8_weight_only(model: nn.Module, backend: str = "auto") -> tuple[nn.Module, str]:
    """Quantize every ``nn.Linear`` of ``model`` in place to int8 weight-only; returns (model, backend used).

    Args:
        backend: ``"torchao"``, ``"pytorch"`` (``Int8WeightOnlyLinear``) or ``"auto"`` (torchao if installed).
    """
    existing = quantization_of(model)
    if existing is not None:
        raise RecipeError(f"this model is already quantized ({existing}): quantizing it again would round "
                          f"the rounded weights. Quantize the original bf16/fp32 model instead.")
    if backend not in ("auto", "torchao", "pytorch"):
        raise RecipeError(f"backend={backend!r}; choose 'auto', 'torchao' or 'pytorch'")
    if backend in ("auto", "torchao") and torchao_available():
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # set_inductor_config=False: torchao would otherwise switch on Inductor's coordinate-descent tuning
        # (all directions) for every later torch.compile in the process, bf16 models included, and a compile
        # of a batch-16 decode step then autotunes for minutes. Tuning is the caller's choice
        # (generate.benchmark(tune=True)), applied to the models being compared alike.
        config = Int8WeightOnlyConfig(set_inductor_config=False)
        quantize_(model, config, filter_fn=lambda module, _: isinstance(module, nn.Linear))
        return model, "torchao"
    if backend == "torchao":
        warnings.warn("torchao is not installed (pip install torchao): using the plain-PyTorch int8 "
                      "weight-only layer instead (same arithmetic, no torchao kernels).", stacklevel=2)
    _replace_linears(model)
    return model, "pytorch"


def int4_unavailable(model: nn.Module) -> str | None:
    """Why ``int4_weight_only`` cannot run on ``model`` here, or None if it can."""
    weight = next(model.parameters())
    if not torchao_available():
        return "no int4 kernel here: torchao is not installed (pip install torchao)"
    if weight.device.type != "cuda":
        return f"no int4 kernel here: torchao's int4 kernel (tinygemm) needs CUDA, not {weight.device}"
    if torch.cuda.get_device_capability(weight.device)[0] < 8:
        return "no int4 kernel here: tinygemm needs compute capability 8.0 or newer"
    if weight.dtype != torch.bfloat16:
        return f"no int4 kernel here: tinygemm needs bf16 weights, not {weight.dtype}"
    return None


def int4_weight_only(model: nn.Module, group_size: int = 128) -> tuple[nn.Module, str]:
    """Quantize every ``nn.Linear`` of ``model`` (whose inputs divide into groups) in place to int4
    weight-only with torchao's tinygemm layout; returns (model, backend). Raises where there is no kernel."""
    existing, missing = quantization_of(model), int4_unavailable(model)
    if existing is not None:
        raise RecipeError(f"this model is already quantized ({existing}): quantize the bf16 model instead.")
    if missing is not None:
        raise RecipeError(missing)
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    # set_inductor_config=False: see int8_weight_only (tuning is the benchmark's choice)
    config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                  set_inductor_config=False)
    quantize_(model, config, filter_fn=lambda module, _: isinstance(module, nn.Linear)
              and module.in_features % group_size == 0)
    return model, "torchao"


def _replace_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8WeightOnlyLinear.from_linear(child))
        else:
            _replace_linears(child)


def linear_weight_bytes(model: nn.Module, quantized_only: bool = False) -> tuple[int, int]:
    """(bytes, values) of the linear layers' weights, scales counted.

    Args:
        quantized_only: count only the layers holding int8 weights (bitsandbytes keeps the LM head in
            the model dtype, for instance), to compare them with the same values in bf16.
    """
    tensors, values = [], 0
    for module in model.modules():
        if isinstance(module, Int8WeightOnlyLinear):
            tensors += [module.weight_int8, module.scale]
            values += module.weight_int8.numel()
        elif isinstance(module, nn.Linear):  # also bitsandbytes' Linear8bitLt and torchao-quantized layers
            weight = module.weight
            quantized = hasattr(weight, "__tensor_flatten__") or weight.dtype in (torch.int8, torch.uint8)
            if quantized or not quantized_only:
                tensors.append(weight)
                values += weight.numel()
    return tensor_bytes(tensors), values
