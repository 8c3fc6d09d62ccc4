"""What the decode size sweep's rows say (issue 20): a fixed + per-layer cost model fitted to each format and
batch (``decode_cost``), the student shape it chooses for the largest teacher, and where int8 passes bf16
along the model sizes. ``decode_sweep`` measures the rows; this module only reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses

from ..core.errors import RecipeError
from . import decode_cost, decode_floor
from .estimate import model_config


def shape_config(shape: str, layers: int | None = None):
    """The config of ``shape`` (a ``data/configs`` name, ``random:<name>``, a folder), cut to ``layers``."""
    config = model_config(shape if shape.startswith("random:") or "/" in shape else f"random:{shape}")
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def fit_points(points: list, bandwidth: float, slack=1.1, **how) -> tuple[decode_cost.CostModel, int]:
    """A cost model of ``points`` and its fitted terms: 3 (bandwidth too) if possible and physical (no
    negative cost, reads no faster than ``slack`` x the copy ``bandwidth``: toy weights in cache), else 2."""
    with contextlib.suppress(RecipeError):
        model = decode_cost.fit(points, **how)
        if min(model.overhead_s, model.layer_latency_s) >= 0 and model.bandwidth <= slack * bandwidth:
            return model, 3
    return decode_cost.fit(points, bandwidth=bandwidth, **how), 2


def cost_model(entry: dict) -> decode_cost.CostModel:
    """The ``CostModel`` of one of ``analyse``'s ``cost_models`` entries."""
    return decode_cost.CostModel(**{f.name: entry[f.name] for f in dataclasses.fields(decode_cost.CostModel)})


def analyse(result: dict, target_speedup: float = 2.0) -> dict:
    """Per (format, batch), a cost model fitted to the measured rows (``fit_points``; ``points``, ``terms``);
    the ``largest`` shape; from bf16 batch 1, its student predicted to decode ``target_speedup`` x as fast."""
    rows = [r for r in result["rows"] if not r["skipped"]]
    models, errors = {}, {}
    for fmt, batch in dict.fromkeys((r["format"], r["batch"]) for r in rows):
        points = [(shape_config(r["shape"], r["layers"]), r["ms_per_decode_step"] / 1e3) for r in rows
                  if (r["format"], r["batch"]) == (fmt, batch)]
        how = dict(fmt=fmt, batch=batch, context=result["context"], act_bytes=result["act_bytes"])
        try:
            model, terms = fit_points(points, result["bandwidth"], **how)
        except RecipeError as error:
            errors[f"{fmt} batch {batch}"] = str(error)
            continue
        models[f"{fmt} batch {batch}"] = {**dataclasses.asdict(model), "points": len(points), "terms": terms,
                                          "residuals": decode_cost.residuals(model, points)}
    out = {"cost_models": models, "not_fitted": errors,
           "largest": max(rows, key=lambda r: r["parameters"])["shape"] if rows else None}
    if "bf16 batch 1" in models:
        try:
            s = decode_cost.choose_student(shape_config(out["largest"]), target_speedup,
                                           cost_model(models["bf16 batch 1"]))
            out["student"] = {"teacher": out["largest"], "layers": s.layers, "hidden_size": s.hidden_size,
                              "num_attention_heads": s.config.num_attention_heads,
                              "num_key_value_heads": s.config.num_key_value_heads,
                              "intermediate_size": s.config.intermediate_size, "parameters": s.parameters,
                              "predicted_speedup": s.speedup, "target_speedup": target_speedup}
        except RecipeError as error:
            out["student"] = str(error)
    return out


def cost_table(analysis: dict) -> list[dict]:
    """``analyse``'s cost models as table records: fixed and per-layer costs at the largest shape, and fit."""
    top = shape_config(analysis["largest"])
    return [{"model": name, "fixed ms": 1e3 * m.fixed_s(top), "µs per layer": 1e6 * m.per_layer_s(top),
             "latency µs": 1e6 * m.layer_latency_s, "read µs": 1e6 * (m.per_layer_s(top) - m.layer_latency_s),
             "GB/s": m.bandwidth / 1e9, "points": e["points"], "terms": e["terms"],
             "max |residual| %": 100 * max(map(abs, e["residuals"]))}
            for name, e in analysis["cost_models"].items() for m in [cost_model(e)]]


def _count(n: float) -> str:
    return next(f"{n / s:.3g}{unit}" for s, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= s)


def crossover(analysis: dict, fmt: str = "int8", batch: int = 1) -> dict | None:
    """``fmt``'s fitted speed-up over bf16 along the largest shape scaled down; where it passes 1x (words)."""
    ref, other = (analysis["cost_models"].get(f"{f} batch {batch}") for f in ("bf16", fmt))
    if ref is None or other is None:
        return None
    ref, other, top = cost_model(ref), cost_model(other), shape_config(analysis["largest"])
    curve = [(decode_floor.parameter_count(c), ref.step_s(c) / other.step_s(c)) for c in [
        decode_cost.student_config(top, max(1, round(top.num_hidden_layers * k / top.num_key_value_heads)), k)
        for k in range(1, top.num_key_value_heads + 1)]]  # depth and width scaled down together
    cross = [(a * (b / a) ** ((1 - s) / (t - s)), "passes" if s < t else "falls below")
             for (a, s), (b, t) in zip(curve, curve[1:]) if min(s, t) < 1 <= max(s, t)]  # either way
    words = (", then ".join(f"{how} bf16 at about {_count(n)} parameters" for n, how in cross) if cross else
             f"stays {'above' if curve[0][1] >= 1 else 'below'} bf16 from {_count(curve[0][0])} to "
             f"{_count(curve[-1][0])} parameters") + f" ({curve[-1][1]:.2f}x at full size)"
    return dict(fmt=fmt, batch=batch, curve=curve, parameters=(cross or [(None,)])[0][0], words=words)


def where_int8_pays(analysis: dict, where: dict | None) -> str:
    """Notebook 03's reading of the batch-1 fits in words (markdown): int8's and bf16's read time, latency
    per layer and fixed part at the largest shape, and ``where`` (``crossover``) int8 passes bf16; empty
    without both fits."""
    fits = {e["model"]: e for e in cost_table(analysis)}
    b, q = fits.get("bf16 batch 1"), fits.get("int8 batch 1")
    if not (where and b and q):
        return ""
    return (f"**Where int8 pays.** Per layer of `{analysis['largest']}` at batch 1, int8 weight-only reads "
            f"for {q['read µs']:.3g} µs against bf16's {b['read µs']:.3g}, with a latency of "
            f"{q['latency µs']:.3g} µs against {b['latency µs']:.3g} (fixed part: {q['fixed ms']:.3g} ms "
            f"against {b['fixed ms']:.3g}). The reads saved grow with a layer's width, the latency does not: "
            f"by these fits, int8 {where['words']}.")
