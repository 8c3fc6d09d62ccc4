"""A decode-step cost model fitted to measured step times, and the student shape it recommends.

A decode step is a fixed part plus a part per layer (``decode.step_split``). Each part is a latency
plus the bytes it reads over a bandwidth (``decode_floor``'s byte counts)::

    step_s = fixed_s + layers * per_layer_s
    fixed_s     = overhead_s       + head_bytes  / bandwidth   (LM head, final norm, embedding row,
                                                                argmax, the host and graph launch)
    per_layer_s = layer_latency_s  + layer_bytes / bandwidth   (7 GEMVs, attention over the cache,
                                                                norms; the latency is what the
                                                                kernels cost beside their bytes)

The three numbers are fitted by least squares to measured steps (``fit``): two depths of one shape
separate the fixed part from the per-layer part; a second width separates the per-layer latency
from the bytes (it fits the bandwidth the kernels reach). With one width only, pass the measured
copy bandwidth and only the two latencies are fitted. A narrower layer then saves only its bytes:
its latency stays, which is why a small model gains less from int8 (half the bytes, same latency)
than a large one. Fit one model per weight format and batch: each has its own kernels.

``choose_student`` searches depth and width (keeping ``head_dim`` and the query/key-value head ratio)
for the student with the most parameters predicted to decode ``target_speedup`` x its teacher.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ..core.errors import RecipeError
from . import decode_floor


@dataclass(frozen=True)
class CostModel:
    """Seconds of one decode step of any Llama-style config, at one format, batch and context."""

    overhead_s: float
    layer_latency_s: float
    bandwidth: float
    fmt: str = "bf16"
    batch: int = 1
    context: float = 0
    act_bytes: int = 2

    def _bytes(self) -> dict:
        return {"fmt": self.fmt, "batch": self.batch, "act_bytes": self.act_bytes}

    def fixed_s(self, config) -> float:
        return self.overhead_s + decode_floor.head_bytes(config, **self._bytes()) / self.bandwidth

    def per_layer_s(self, config) -> float:
        return (self.layer_latency_s
                + decode_floor.layer_bytes(config, context=self.context, **self._bytes()) / self.bandwidth)

    def step_s(self, config) -> float:
        return self.fixed_s(config) + config.num_hidden_layers * self.per_layer_s(config)

    def tokens_per_s(self, config) -> float:
        return self.batch / self.step_s(config)

    def speedup(self, config, reference) -> float:
        """How many times faster ``config`` decodes than ``reference``, predicted."""
        return self.step_s(reference) / self.step_s(config)


def fit(points: list[tuple[object, float]], bandwidth: float | None = None, fmt: str = "bf16",
        batch: int = 1, context: float = 0, act_bytes: int = 2) -> CostModel:
    """Least-squares ``CostModel`` from ``(config, seconds per step)`` measured at ``fmt``, ``batch``
    and mean ``context``.

    Args:
        bandwidth: bytes/s the step's reads are charged at (the measured copy bandwidth). None fits it
            too, which needs steps at two or more widths as well as two depths.
    """
    model = CostModel(0.0, 0.0, 1.0, fmt, batch, context, act_bytes)
    rows, times = [], []
    for config, seconds in points:
        layers = config.num_hidden_layers
        read = decode_floor.head_bytes(config, **model._bytes()) + layers * decode_floor.layer_bytes(
            config, context=context, **model._bytes())
        rows.append([1.0, layers, read])
        times.append(seconds)
    a, y = np.array(rows, dtype=float), np.array(times, dtype=float)
    if bandwidth is not None:  # the bytes' share is known: fit the two latencies to what is left
        y, a = y - a[:, 2] / bandwidth, a[:, :2]
    if np.linalg.matrix_rank(a / np.abs(a).max(axis=0)) < a.shape[1]:
        need = "two depths of one shape" if bandwidth is not None else \
            "two depths of one shape and a second width, or pass bandwidth= (the copy bandwidth)"
        raise RecipeError(f"{len(points)} measured step(s) cannot separate the cost model's terms: "
                          f"measure {need}")
    solution = np.linalg.lstsq(a, y, rcond=None)[0]
    if bandwidth is None:
        if solution[2] <= 0:
            raise RecipeError("the fitted step time does not grow with the bytes read: pass bandwidth= "
                              "(the measured copy bandwidth) and fit the latencies only")
        bandwidth = 1 / solution[2]
    return CostModel(float(solution[0]), float(solution[1]), float(bandwidth), fmt, batch, context,
                     act_bytes)


def residuals(model: CostModel, points: list[tuple[object, float]]) -> list[float]:
    """Measured over predicted step time, minus one, for each ``(config, seconds)`` point."""
    return [seconds / model.step_s(config) - 1 for config, seconds in points]


@dataclass(frozen=True)
class Student:
    """A student shape and what the cost model predicts for it."""

    config: object
    layers: int
    hidden_size: int
    parameters: int
    speedup: float


def student_config(teacher, layers: int, kv_heads: int):
    """``teacher``'s config with ``layers`` layers and ``kv_heads`` key/value heads: same ``head_dim``
    and query/key-value head ratio, so the hidden size and the MLP width scale with ``kv_heads``."""
    n_kv, head_dim = decode_floor.kv_heads_dim(teacher)
    heads = kv_heads * (teacher.num_attention_heads // n_kv)
    hidden = heads * head_dim
    ffn = max(1, round(teacher.intermediate_size * kv_heads / n_kv))
    config = copy.deepcopy(teacher)
    for key, value in dict(num_hidden_layers=layers, num_key_value_heads=kv_heads, num_attention_heads=heads,
                           hidden_size=hidden, intermediate_size=ffn, head_dim=head_dim).items():
        setattr(config, key, value)
    return config


def candidates(teacher, depths=None, kv_heads=None) -> list:
    """Student configs over a grid: ``depths`` (default 1 to the teacher's) x ``kv_heads`` (default 1 to
    the teacher's key/value heads; each sets the width)."""
    n_kv, _ = decode_floor.kv_heads_dim(teacher)
    depths = depths or range(1, teacher.num_hidden_layers + 1)
    kv_heads = kv_heads or range(1, n_kv + 1)
    return [student_config(teacher, layers, kv) for kv in kv_heads for layers in depths]


def choose_student(teacher_config, target_speedup: float, cost_model: CostModel, depths=None,
                   kv_heads=None) -> Student:
    """The grid's student with the most parameters that ``cost_model`` predicts decodes at least
    ``target_speedup`` times as fast as ``teacher_config`` (ties: the deeper one)."""
    best, fastest = None, 0.0
    for config in candidates(teacher_config, depths, kv_heads):
        speedup = cost_model.speedup(config, teacher_config)
        fastest = max(fastest, speedup)
        if speedup < target_speedup:
            continue
        student = Student(config, config.num_hidden_layers, config.hidden_size,
                          decode_floor.parameter_count(config), speedup)
        if best is None or (student.parameters, student.layers) > (best.parameters, best.layers):
            best = student
    if best is None:
        raise RecipeError(f"no student in the grid is predicted to decode {target_speedup}x the teacher: "
                          f"the fastest reaches {fastest:.2f}x (the fixed cost per step stays)")
    return best
