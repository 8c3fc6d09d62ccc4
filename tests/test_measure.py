"""measure: the CPU allocation tracker, the memory breakdown, FLOPs per token, MFU, OOM detection."""

import time

import pytest
import torch
from conftest import tiny_config, tiny_model

from recipes_lib.attention import masks
from recipes_lib.measure import flops, memory, report, timing

MiB = 2**20


def test_tracker_peak_of_known_allocations():
    baseline = torch.empty(MiB, dtype=torch.uint8)
    with memory.AllocationTracker([baseline]) as tracker:
        assert tracker.current == MiB  # the baseline counts from the start
        a = torch.ones(4 * MiB, dtype=torch.uint8)
        assert tracker.current == 5 * MiB
        del a
        assert tracker.current == MiB  # freed storage is released
        b = torch.zeros(2 * MiB, dtype=torch.uint8)
        view = b.view(2, MiB)  # a view shares the storage: not counted twice
        assert tracker.current == 3 * MiB
        del b, view
    assert tracker.peak == 5 * MiB


def test_tracker_without_baseline_and_peak_of_two_live_tensors():
    with memory.AllocationTracker() as tracker:
        a = torch.ones(MiB // 4)  # 1 MiB of fp32
        b = torch.ones(MiB // 2)  # 2 MiB
        del a, b
        c = torch.ones(MiB // 8)
        del c
    assert tracker.peak == 3 * MiB


def test_tracker_counts_the_backward_pass():
    weight = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)
    with memory.AllocationTracker([weight]) as tracker:
        (x @ weight).sum().backward()
    # weight + its gradient at least, and the 64x256 matmul output.
    assert tracker.peak >= 2 * weight.nbytes + 64 * 256 * 4


def test_peak_memory_on_cpu():
    baseline = [torch.empty(MiB, dtype=torch.uint8)]
    with memory.peak_memory(torch.device("cpu"), baseline) as result:
        x = torch.ones(3 * MiB, dtype=torch.uint8)
        del x
    assert result["peak"] == 4 * MiB


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(10)  # 40 bytes
    b = torch.zeros(3, dtype=torch.float64)  # 24 bytes
    assert memory.tensor_bytes([a, a[2:5], a.view(2, 5), b, None]) == 64
    assert memory.tensor_bytes([a, b], torch.device("cpu")) == 64
    assert memory.tensor_bytes([a, torch.zeros(4, device="meta")], torch.device("cpu")) == 40


def test_breakdown_arithmetic():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5, bias=False))
    model[1].weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model(torch.randn(3, 10)).sum().backward()
    optimizer.step()  # creates one momentum buffer per trainable parameter

    params = (10 * 20 + 20 + 20 * 5) * 4
    trainable = (10 * 20 + 20) * 4
    state = memory.optimizer_tensors(optimizer)
    assert state and memory.tensor_bytes(state) == trainable

    bd = memory.breakdown(model, optimizer, peak=10_000, device=torch.device("cpu"))
    assert (bd.parameters, bd.gradients, bd.optimizer) == (params, trainable, trainable)
    assert bd.states == params + 2 * trainable
    assert bd.activations == 10_000 - bd.states
    assert bd.peak == 10_000
    assert bd.gib()["peak"] == pytest.approx(10_000 / 2**30)

    small = memory.breakdown(model, None, peak=100, device=torch.device("cpu"))
    assert small.optimizer == 0 and small.activations == 0  # never negative


def test_breakdown_counts_buffers_as_parameters():
    model = tiny_model(64)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    buffer_bytes = sum(b.nbytes for b in model.buffers())
    bd = memory.breakdown(model, None, peak=0, device=torch.device("cpu"))
    assert bd.parameters == param_bytes + buffer_bytes
    assert bd.gradients == param_bytes


def test_training_flops_per_token_by_hand():
    config = tiny_config(vocab_size=64)  # d=32, 4 heads of 8, 2 kv heads, ffn 64, 2 layers
    # per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 = 3072; mlp 3 * 32 * 64 = 6144
    n = 2 * (3072 + 6144) + 64 * 32  # + the LM head = 20480
    seq_len = 16
    # Causal attention: 4 FLOPs x head_dim per query-key pair the mask keeps, per head, 3 passes, 2 layers.
    pairs = int(masks.dense_mask(seq_len, None).sum())
    attention = 3 * 2 * 4 * pairs * 8 * 4 / seq_len
    assert n == 20480 and pairs == 136  # half of 16 x 16, plus the diagonal's half
    assert flops.training_flops_per_token(config, seq_len) == 6 * n + attention == 129408
    # Frozen base: forward 2N + input gradients 2N, no weight gradients.
    assert flops.training_flops_per_token(config, seq_len, trainable_fraction=0.0) == 4 * n + attention
    assert flops.training_flops_per_token(config, seq_len, trainable_fraction=0.5) == 5 * n + attention


def test_flops_n_is_the_matmul_weights_of_the_model():
    model = tiny_model(64)
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops.training_flops_per_token(model.config, 1) == 6 * n_linear + 12 * 2 * 32


def test_mfu():
    assert flops.mfu(1000.0, 1e9, None) is None
    assert flops.mfu(1000.0, 1e9, 0) is None
    assert flops.mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)


def test_is_oom():
    assert memory.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert memory.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not memory.is_oom(RuntimeError("shape mismatch"))
    assert not memory.is_oom(ValueError("out of memory"))


def test_time_it_warms_up_then_times_each_call():
    calls, sleeps = [], iter([0.0, 0.0, 0.02, 0.001, 0.01, 0.012, 0.008])

    def fn():
        calls.append(1)
        time.sleep(next(sleeps))

    t = timing.time_it(fn, torch.device("cpu"), repeats=5, warmup=2)
    assert len(calls) == 7 and len(t.samples) == 5
    assert t.low < 0.005 < t.median < 0.015 < t.high  # the 0.02 s call is the max, the median the 0.01 s one
    assert t.spread == pytest.approx((t.high - t.low) / t.median)


def test_timing_of_samples_drops_warm_up():
    t = timing.Timing.of([100.0, 1.0, 3.0, 2.0], skip=1)
    assert (t.median, t.low, t.high) == (2.0, 1.0, 3.0)
    assert timing.Timing.of([5.0], skip=1).median == 5.0  # too few to drop: kept
    with pytest.raises(ValueError):
        timing.Timing.of([])


def test_timing_per_second_is_work_over_the_median_slowest_and_fastest_call():
    rates = timing.Timing.of([2.0, 1.0, 4.0]).per_second(8)
    assert rates == {"tokens_per_s": 4.0, "tokens_per_s_min": 2.0, "tokens_per_s_max": 8.0}
    assert timing.Timing.of([2.0, 1.0, 4.0]).over(0.5) == (4.0, 2.0, 8.0)  # in units of 0.5 s


def test_matmul_peak_is_a_plausible_rate_on_cpu():
    rate = timing.matmul_peak(torch.device("cpu"), n=256, dtype=torch.float32, repeats=3)
    # 2 * 256^3 FLOPs: a CPU core does between 1e9 and 1e13 FLOP/s at this size
    assert 1e9 < rate < 1e13
    assert timing.matmul_peak is timing.matmul_peak  # notebook 03's committed cells call it there


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_seconds_times_the_given_gpu_not_the_current_one():
    a = torch.randn(4096, 4096, device="cuda:1")
    seconds = timing.median_seconds(lambda: [a @ a for _ in range(10)], torch.device("cuda:1"), repeats=3)
    # Timing an idle stream of cuda:0 instead reads only the host's launches (tens of microseconds),
    # a rate far beyond any GPU's; the real fp32 (or TF32) work runs below 1 PFLOP/s.
    assert 10 * 2 * 4096**3 / seconds < 1e15, "an idle stream of the current GPU was timed, not cuda:1's work"


def test_report_format(capsys):
    report.report("config", **{"peak (GiB)": 1.23456, "tokens/s": 12345.6, "oom": False})
    out = capsys.readouterr().out.strip()
    assert out.startswith("config")
    assert out.endswith("peak (GiB): 1.23 | tokens/s: 12,346 | oom: False")


class _Pair(torch.Tensor):
    """A wrapper tensor subclass holding two plain tensors, as torchao's Int8Tensor and NF4Tensor do."""

    @staticmethod
    def __new__(cls, a, b):
        return torch.Tensor._make_wrapper_subclass(cls, a.shape, dtype=a.dtype)

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __tensor_flatten__(self):
        return ["a", "b"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # what nn.Parameter and .data call
            return cls(args[0].a, args[0].b)
        raise NotImplementedError(func)


def test_allocation_tracker_counts_the_tensors_a_subclass_holds():
    """`recipes bench --technique int8` on a CPU with torchao: its weights are wrapper subclasses, whose own
    storage is no memory (accessing it raised)."""
    pair = _Pair(torch.zeros(10), torch.zeros(20, dtype=torch.float64))
    pair = torch.nn.Parameter(pair, requires_grad=False)
    plain = torch.zeros(5)
    tracker = memory.AllocationTracker([pair, plain])
    assert tracker.current == tracker.peak == 10 * 4 + 20 * 8 + 5 * 4
