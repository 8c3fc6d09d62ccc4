"""SDPA backends agree with eager attention; a missing backend warns and falls back."""

import dataclasses

import pytest
import torch

from recipes_lib.attention import kernels
from recipes_lib.core import hardware
from recipes_lib.measure import flops


def test_backends_agree_with_eager():
    hw = hardware.detect("cpu")
    q, k, v = kernels.random_qkv(1, 2, 32, 16, hw.device, torch.float32)
    found = kernels.kernels(hw)
    assert "sdpa math" in found
    for fn in found.values():
        assert kernels.max_error_vs_eager(fn, q, k, v) < 1e-5


def test_missing_flash_falls_back():
    hw = dataclasses.replace(hardware.detect("cpu"), sdpa_backends=("math",))
    with pytest.warns(UserWarning, match="does not run"):
        assert kernels.choose_backend("flash", hw) == "math"


def test_causal_flops():
    assert flops.causal_flops(1, 1, 4, 2) == 4 * 16 * 2 / 2
