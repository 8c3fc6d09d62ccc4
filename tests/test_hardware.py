"""hardware: CPU detection, precision choices, and datasheet peaks by GPU name."""

import dataclasses
import sys

import pytest
import torch

from recipes_lib.core import hardware


def test_detect_on_cpu():
    hw = hardware.detect("cpu")
    assert hw.device == torch.device("cpu")
    assert not hw.cuda
    assert hw.amp_dtype is None
    assert hw.model_dtype == torch.float32
    assert not hw.needs_loss_scaling
    assert "math" in hw.sdpa_backends
    assert hw.peak_flops is None and hw.memory_bytes is None
    assert "CPU" in hw.summary()


@pytest.mark.skipif(torch.cuda.is_available(), reason="default device is CUDA here")
def test_detect_default_is_cpu_without_gpu():
    assert hardware.detect().device.type == "cpu"


def test_precision_on_gpus():
    cpu = hardware.detect("cpu")
    ampere = dataclasses.replace(cpu, device=torch.device("cuda"), bf16=True)
    turing = dataclasses.replace(cpu, device=torch.device("cuda"), bf16=False)
    assert ampere.amp_dtype == ampere.model_dtype == torch.bfloat16 and not ampere.needs_loss_scaling
    assert turing.amp_dtype == torch.float16 and turing.needs_loss_scaling
    assert turing.model_dtype == torch.float32  # fp32 master weights: GradScaler cannot unscale fp16 grads


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10G", 125e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("Tesla T4", 65e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
])
def test_peak_flops_for_known_gpus(name, peak):
    assert hardware.peak_flops_for(name) == peak


@pytest.mark.parametrize("name", ["Some Future GPU", "CPU", ""])
def test_peak_flops_for_unknown_is_none(name):
    assert hardware.peak_flops_for(name) is None


def test_peak_flops_for_l40_is_not_the_l4():
    assert hardware.peak_flops_for("NVIDIA L40") != hardware.DATASHEET_BF16_PEAK["L4"]


def test_sdpa_backends_on_cpu():
    backends = hardware.sdpa_backends(torch.device("cpu"))
    assert "math" in backends
    assert "cudnn" not in backends and "efficient" not in backends  # CUDA-only kernels


def test_bitsandbytes_works_is_false_when_its_kernel_fails(monkeypatch):
    """Installed but without a kernel for the device (a missing native library, an old GPU): False."""
    functional = pytest.importorskip("bitsandbytes.functional")

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(functional, "quantize_4bit", no_kernel)
    assert hardware.bitsandbytes_works(torch.device("cpu")) is False


def test_bitsandbytes_works_is_false_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # import now raises ImportError
    assert hardware.bitsandbytes_works(torch.device("cpu")) is False
