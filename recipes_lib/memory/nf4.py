"""NF4 (4-bit NormalFloat, QLoRA's base format) in plain PyTorch: a frozen linear layer torch.compile fuses.

The format: a weight is cut into blocks of ``block_size`` (64) consecutive values; each block is scaled
by its absolute maximum (``absmax``) into [-1, 1], and each scaled value is replaced by the index of the
nearest of 16 fixed levels, ``NF4_CODE``. The levels are quantiles of a standard normal distribution
(8 positive, 7 negative and an exact 0, normalised to a maximum of 1), so each level is about equally
likely for normally distributed weights. Two 4-bit indices are packed per byte, the first in the high
nibble, as bitsandbytes does. Dequantizing is ``NF4_CODE[index] * absmax`` of the block.

Bytes per parameter: 0.5 for the codes + 4 / block_size for an fp32 absmax per block = 0.5625 at 64.
bitsandbytes' QLoRA default also quantizes the absmax values (double quantization: 8 bits per absmax
plus an fp32 scale per 256 of them), ~0.516 byte/param; we keep them in fp32: simpler and exact, for
0.047 byte/param more (~0.4 GB for an 8 B-parameter model).

Why it exists: bitsandbytes' ``Linear4bit`` dequantizes in an opaque custom op, which torch.compile
cannot fuse with anything, and under activation checkpointing the base
weights are dequantized three times a step (forward, recompute, backward). ``NF4Linear`` is the same
format written as tensor ops (a candidate for a faster QLoRA step, to be measured on a GPU):

* its autograd function saves only the packed codes and absmax, never a dequantized weight, and
  dequantizes again in backward to compute the input gradient (the base is frozen: no weight gradient);
  under torch.compile the same holds through a checkpointed region (see ``NF4Linear.forward``);
* under ``dequant_cache()`` each layer dequantizes once per step and reuses that weight in the forward,
  the checkpointing recompute and the backward, at the cost of holding every layer's weight in the
  compute dtype (2 bytes/param in bf16) until the context exits.

It subclasses ``nn.Linear`` so peft's ``target_modules="all-linear"`` wraps it like any linear layer.
peft reads ``base_layer.weight`` for its device and dtype (to place the adapters) and
``compute_dtype`` when present (as bitsandbytes' layer has it); so ``weight`` is the packed uint8 codes
(a buffer: right device, an integer dtype peft never casts adapters to) and ``compute_dtype`` is set,
which gives the adapters the same placement and dtype as with bitsandbytes. Merging adapters into the
base (``merge_and_unload``) is not supported: the weight is not a float tensor.
Do not cast a quantized model with ``model.to(dtype)``: it would round the fp32 absmax buffers.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import RecipeError

NF4_OFFSET = 0.9677083  # bitsandbytes' outermost quantile: the largest level is norm.ppf(offset) (1.845)


def _normal_map(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels as QLoRA / bitsandbytes' ``create_normal_map`` builds them (same rounding steps:
    quantile points in fp32, the normal quantile function in fp64, the levels in fp32)."""
    positive = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double()  # 8 levels > 0
    negative = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double()  # 7 levels < 0
    levels = torch.cat([torch.special.ndtri(positive), -torch.special.ndtri(negative),
                        torch.zeros(1, dtype=torch.float64)]).float()
    levels = levels.sort().values
    return levels / levels.max()


NF4_CODE = _normal_map()


@functools.cache
def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """``NF4_CODE`` on ``device`` (one copy per device)."""
    return NF4_CODE.to(device)


def nf4_bytes(n_params: int, block_size: int = 64) -> float:
    """Bytes of ``n_params`` NF4 values: half a byte each plus an fp32 absmax per block."""
    return n_params / 2 + 4 * n_params / block_size


def _check_block(numel: int, block_size: int) -> None:
    if block_size < 2 or block_size % 2:
        raise RecipeError(f"NF4 block_size must be an even number >= 2 (got {block_size}); use 64")
    if numel % block_size:
        raise RecipeError(f"a weight of {numel} values does not split into blocks of {block_size}: "
                          f"pick a block_size that divides {numel}, or leave this layer unquantized (skip=)")


def quantize_nf4(weight: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, absmax)``: uint8 codes, two per byte (first value in the high nibble), and the fp32
    absolute maximum of each block of ``block_size`` consecutive values (of the flattened weight).

    Each value goes to the nearest level (ties to the lower one), computed in fp32 as bitsandbytes does.
    """
    _check_block(weight.numel(), block_size)
    blocks = weight.detach().reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    code = nf4_code(weight.device)
    index = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return (index[0::2] << 4) | index[1::2], absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype,
                   code: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of ``shape`` in ``dtype`` from ``quantize_nf4``'s output (levels times absmax in fp32,
    then rounded once to ``dtype``). ``code``: ``NF4_CODE`` on the codes' device (looked up if None)."""
    code = nf4_code(packed.device) if code is None else code
    high = code[(packed >> 4).int()]
    low = code[(packed & 15).int()]
    values = torch.stack((high, low), dim=-1).reshape(absmax.numel(), -1) * absmax.unsqueeze(1)
    return values.reshape(shape).to(dtype)


def _dequant_linear(x, packed, absmax, code, bias, shape):
    return F.linear(x, dequantize_nf4(packed, absmax, shape, x.dtype, code), bias)


class _NF4Matmul(torch.autograd.Function):
    """``x @ W.T + bias`` with W dequantized on the fly; backward dequantizes again (saves only codes)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, bias, shape):
        weight = dequantize_nf4(packed, absmax, shape, x.dtype, code)
        ctx.save_for_backward(packed, absmax, code)
        ctx.shape = shape
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        packed, absmax, code = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize_nf4(packed, absmax, ctx.shape, grad.dtype, code)
        if ctx.needs_input_grad[4]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, None, grad_bias, None


_CACHES: list[dict] = []  # the open dequant_cache() contexts, innermost last


@contextlib.contextmanager
def dequant_cache():
    """Under this context each ``NF4Linear`` dequantizes its weight once, on first use, and reuses it
    (forward, activation-checkpointing recompute, backward); the weights are freed on exit.

    Eager layers only: a compiled layer does not read the cache (its code is traced once, and a global
    store read there would be baked into the graph or recompile it per layer and per step; where
    transformers checkpoints around the compiled layer, forward and recompute could even disagree).

    Wrap one whole optimizer step (forward and backward of all its micro-batches) in it. Memory cost:
    every NF4 layer's weight in its compute dtype (2 bytes/param in bf16) held until exit, on top of the
    0.5625 byte/param codes; kept across steps it would be a bf16 base again, which QLoRA exists to avoid.
    """
    store: dict = {}
    _CACHES.append(store)
    try:
        yield store
    finally:
        _CACHES.remove(store)
        store.clear()


def cache_per_step(model: nn.Module, optimizer):
    """Dequantize each ``NF4Linear`` weight once per optimizer step, for a training loop that does not
    wrap its steps in ``dequant_cache()``: a cache opened now and emptied after each ``optimizer.step()``.
    Returns ``optimizer``, whose ``release()`` closes the cache (``measure.bench`` calls it after a row);
    it also closes when ``model`` is freed. While it is open, every eager NF4 layer in the process uses it."""
    if not any(isinstance(m, NF4Linear) for m in model.modules()):
        raise RecipeError("no NF4Linear layers in this model, nothing to cache: quantize it with "
                          "nf4.quantize_model (qlora_model(base='torch'))")
    store: dict = {}
    _CACHES.append(store)
    optimizer.register_step_post_hook(lambda *_: store.clear())
    previous = getattr(optimizer, "release", None)

    def release():
        _CACHES[:] = [c for c in _CACHES if c is not store]
        store.clear()
        if previous is not None:
            previous()

    optimizer.release = release
    weakref.finalize(model, release)  # a model freed without release() does not leave its cache open
    return optimizer


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is stored in NF4: the buffers ``weight`` (packed uint8 codes,
    ``numel / 2`` bytes), ``absmax`` (fp32, one per block) and ``code`` (the 16 levels, not saved in
    the state dict), plus the bias (if any, in ``compute_dtype``, frozen). Build it with ``from_linear``.

    The forward computes in ``compute_dtype`` and returns the input's dtype (as bitsandbytes does).
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                 block_size: int = 64):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full float weight
        numel = in_features * out_features
        _check_block(numel, block_size)
        if packed.numel() * 2 != numel or absmax.numel() * block_size != numel:
            raise RecipeError(f"NF4 buffers ({packed.numel()} bytes, {absmax.numel()} absmax) do not fit a "
                              f"{out_features}x{in_features} weight in blocks of {block_size}: "
                              "build the layer with NF4Linear.from_linear")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.block_size = compute_dtype, block_size
        self.register_buffer("weight", packed.to(torch.uint8))
        self.register_buffer("absmax", absmax.float())
        self.register_buffer("code", nf4_code(packed.device).clone(), persistent=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16,
                    block_size: int = 64) -> NF4Linear:
        """The NF4 version of ``linear`` (on its device); ``linear`` itself is left untouched."""
        packed, absmax = quantize_nf4(linear.weight, block_size)
        return cls(packed, absmax, linear.in_features, linear.out_features, linear.bias, compute_dtype,
                   block_size)

    def reset_parameters(self) -> None:
        """Nothing to initialise: the weight comes quantized (nn.Linear's init would need a float weight)."""

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight, ``out_features x in_features``, in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_nf4(self.weight, self.absmax, (self.out_features, self.in_features),
                              dtype or self.compute_dtype, self.code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(self.compute_dtype)
        if not torch.compiler.is_compiling() and _CACHES:  # eager only: see dequant_cache
            store = _CACHES[-1]
            weight = store.get(self)
            if weight is None:
                weight = store[self] = self.dequantize()
            return F.linear(x, weight, self.bias).to(dtype)
        shape = (self.out_features, self.in_features)
        if torch.compiler.is_compiling():
            # AOTAutograd re-partitions forward + backward and would save the dequantized weight (it
            # does not recompute a tensor that a backward matmul reads); a checkpointed region tags
            # the dequantization for recomputation, so only the codes are saved. The matmul is not
            # recomputed: the input gradient needs only the weight.
            out = checkpoint(_dequant_linear, x, self.weight, self.absmax, self.code, self.bias, shape,
                             use_reentrant=False)
        else:
            out = _NF4Matmul.apply(x, self.weight, self.absmax, self.code, self.bias, shape)
        return out.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, "
                f"block_size={self.block_size}")


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, skip=("lm_head",),
                   block_size: int = 64) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an ``NF4Linear``, except those named in
    ``skip`` (a module's dotted name or its last parts: ``"lm_head"`` matches ``model.lm_head``); returns
    ``model``.

    The original weights are dropped (freed unless something else holds them: a linear whose weight is
    tied to the embedding, as a tied LM head is, keeps it alive, so quantizing it saves nothing). Quantize
    before adding LoRA adapters: a model that already has peft adapters is refused.
    """
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise RecipeError("this model already has peft adapters: call quantize_model before add_lora")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not isinstance(module, NF4Linear)
               and not _skipped(name, skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(linear, compute_dtype, block_size))
    return model
