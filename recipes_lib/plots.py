"""The plot kinds the notebooks share: ladder bars (memory breakdown, throughput) and curves."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

from .measure.memory import GiB, memory_breakdown

_PARTS = [("parameters", "#4C72B0"), ("gradients", "#DD8452"), ("optimizer", "#55A868"),
          ("activations", "#C44E52")]


def _unit(max_bytes: float) -> tuple[float, str]:
    return (GiB, "GiB") if max_bytes >= 0.5 * GiB else (2**20, "MiB")


def memory_bars(rows: Sequence[dict], title: str, ax=None):
    """Stacked bars of the peak-memory breakdown per configuration; OOM rows are labelled.

    Args:
        rows: dicts with ``name`` and either ``memory`` (a ``MemoryBreakdown``) or ``oom=True``.
    """
    ax = ax or plt.gca()
    peaks = [r["memory"].peak for r in rows if not r.get("oom")]
    scale, unit = _unit(max(peaks, default=GiB))
    names = [r["name"] for r in rows]
    bottoms = [0.0] * len(rows)
    for part, color in _PARTS:
        heights = [0.0 if r.get("oom") else getattr(r["memory"], part) / scale for r in rows]
        ax.bar(names, heights, bottom=bottoms, color=color, label=part)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, r in enumerate(rows):
        label = "OOM" if r.get("oom") else f"{r['memory'].peak / scale:.2f}"
        ax.annotate(label, (i, bottoms[i]), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(f"peak memory ({unit})")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    return ax


def value_bars(names: Sequence[str], values: Sequence[float | None], ylabel: str, title: str, ax=None,
               fmt: str = "{:,.0f}"):
    """Plain bars with the value written on top; None shows as OOM."""
    ax = ax or plt.gca()
    heights = [v or 0.0 for v in values]
    bars = ax.bar(names, heights, color="#4C72B0")
    for bar, v in zip(bars, values):
        ax.annotate("OOM" if v is None else fmt.format(v),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    return ax


def ladder(rows: Sequence[dict], title: str):
    """The recipe ladder: peak-memory breakdown and tokens/s side by side."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    memory_bars(rows, "peak memory per configuration", ax=left)
    value_bars([r["name"] for r in rows], [None if r.get("oom") else r["tokens_per_s"] for r in rows],
               "tokens/s", "training throughput", ax=right)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def curves(series: dict[str, tuple[Sequence[float], Sequence[float | None]]], xlabel: str, ylabel: str,
           title: str, ax=None, logx: bool = False, logy: bool = False):
    """One line per named series of ``(x, y)`` points; None values (OOM) are left out of a line."""
    ax = ax or plt.gca()
    for name, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=4, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def floor_bars(names: Sequence[str], values: Sequence[float], floor: float, floor_label: str, ylabel: str,
               title: str, ax=None, fmt: str = "{:.3g}"):
    """``value_bars`` with a dashed horizontal line at ``floor`` (a bound no bar can beat)."""
    ax = value_bars(names, values, ylabel, title, ax=ax, fmt=fmt)
    ax.axhline(floor, color="#C44E52", linestyle="--", label=floor_label)
    ax.legend(fontsize=8)
    return ax


def side_by_side(panels: Sequence[tuple], title: str | None = None, width: float = 6.5, height: float = 4.0):
    """One figure, a panel per ``(plot_function, kwargs)``, drawn by ``plot_function(**kwargs, ax=...)``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for ax, (plot, kwargs) in zip(axes[0], panels):
        plot(**kwargs, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def decode_panels(speed: dict[str, list[dict]], batches: Sequence[int]) -> list[tuple]:
    """``side_by_side`` panels of ``decode.sweep`` rows by method: decode tokens/s at each batch size (a
    method measured at fewer batches is left out of the later panels), and each method's weight memory."""
    panels = []
    for i, batch in enumerate(batches):
        shown = {name: rows[i]["decode_tokens_per_s"] for name, rows in speed.items() if len(rows) > i}
        panels.append((value_bars, dict(names=list(shown), values=list(shown.values()),
                                        ylabel="decode tokens/s", title=f"decode at batch {batch}")))
    weights = [rows[0]["weight_bytes"] / GiB for rows in speed.values()]
    return panels + [(value_bars, dict(names=list(speed), values=weights, fmt="{:.2f}",
                                       ylabel="weights (GiB)", title="weight memory"))]


def series_of(rows: Sequence[dict], group: str, x: str, y: str, scale: float = 1.0,
              groups: Sequence[str] | None = None) -> dict[str, tuple[list, list]]:
    """``curves``' series from result rows: one per value of ``group``, ``y * scale`` against ``x``.

    An OOM row, or one without ``y``, is a gap (None); ``groups`` fixes the order (default: as found).
    """
    names = list(groups) if groups is not None else list(dict.fromkeys(r[group] for r in rows))
    picked = {name: [r for r in rows if r[group] == name] for name in names}
    return {name: ([r[x] for r in found], [None if r.get("oom") or r.get(y) is None else r[y] * scale
                                           for r in found]) for name, found in picked.items()}


def curves_with_line(series: dict[str, tuple[Sequence[float], Sequence[float | None]]], xlabel: str,
                     ylabel: str, title: str, line: float, line_label: str, ax=None, **kwargs):
    """``curves`` with a dashed horizontal reference line at ``line`` (a level to read the curves against)."""
    ax = curves(series, xlabel, ylabel, title, ax=ax, **kwargs)
    ax.axhline(line, color="grey", lw=0.8, ls="--", label=line_label)
    ax.legend(fontsize=8)
    return ax


def strategy_panels(runs: dict[str, dict], source: str) -> list[tuple]:
    """``side_by_side`` panels of notebook 02's runs by strategy (those that could be made): per-process
    peak memory, split into its parts where CUDA measured them (on a CPU: weights + AdamW state per
    process), and tokens/s per process. ``source`` says where they were measured."""
    made = {s: r for s, r in runs.items() if "error" not in r}
    parts = {s: memory_breakdown(r) for s, r in made.items()}
    if parts and all(parts.values()):
        left = (memory_bars, dict(rows=[{"name": s, "memory": m} for s, m in parts.items()],
                                  title=f"Per-GPU peak by strategy\n({source})"))
    else:
        left = (value_bars, dict(names=list(made), ylabel="MiB per process", fmt="{:,.1f}",
                                 values=[(r["param_bytes"] + r["optimizer_bytes"]) / 2**20
                                         for r in made.values()],
                                 title=f"Weights + AdamW state per process\n({source})"))
    right = (value_bars, dict(names=list(made), ylabel="tokens/s per process",
                              values=[r["tokens_per_s_per_gpu"] for r in made.values()],
                              title=f"Throughput per process\n({source})"))
    return [left, right]


def _weights_label(fmt: str, weight_dtype: str) -> str:
    """A weight format's legend name: the unquantized "bf16" rows of a run in another dtype say so."""
    dtype = weight_dtype.replace("torch.", "")
    return fmt if fmt != "bf16" or dtype == "bfloat16" else f"{dtype} (unquantized)"


def _sweep_format(axes, rows: Sequence[dict], reference: dict | None, scale: float, name: str,
                  color: str) -> None:
    """One weight format's lines on ``decode_size_sweep``'s panels (``reference``: bf16 floors by shape)."""
    xs = [r["parameters"] / scale for r in rows]
    ran = [(x, r) for x, r in zip(xs, rows) if not r["skipped"]]
    axes[0].plot(xs, [r["floor_tokens_per_s"] for r in rows], ls="--", color=color,
                 label=f"{name} bandwidth floor" + ("" if ran else " (not run here)"))
    if ran:
        axes[0].plot(*zip(*[(x, r["decode_tokens_per_s"]) for x, r in ran]), marker="o", color=color,
                     label=f"{name} measured")
    if reference is None:  # the reference format itself: the line at 1x
        return
    allowed = [r["floor_tokens_per_s"] / reference.get(r["shape"], float("nan")) for r in rows]
    axes[1].plot(xs, allowed, ls="--", color=color, label=f"{name}: the speed-up its floor allows")
    if ran:
        ups = [r["speedup_vs_bf16"] for _, r in ran]
        spread = [[u - (r["speedup_min"] or u) for u, (_, r) in zip(ups, ran)],
                  [(r["speedup_max"] or u) - u for u, (_, r) in zip(ups, ran)]]
        axes[1].errorbar([x for x, _ in ran], ups, yerr=spread, marker="o", color=color, capsize=3,
                         label=f"{name} measured (min-max)")


def _sweep_column(axes, rows: Sequence[dict], batch: int) -> None:
    """``decode_size_sweep``'s two panels for one batch size."""
    scale, unit = (1e9, "billions") if max(r["parameters"] for r in rows) >= 1e9 else (1e6, "millions")
    reference = {r["shape"]: r["floor_tokens_per_s"] for r in rows if r["format"] == "bf16"}
    base = _weights_label("bf16", rows[0]["weight_dtype"])
    for i, fmt in enumerate(dict.fromkeys(r["format"] for r in rows)):
        mine = [r for r in rows if r["format"] == fmt]
        _sweep_format(axes, mine, None if fmt == "bf16" else reference, scale,
                      _weights_label(fmt, mine[0]["weight_dtype"]), f"C{i}")
    axes[1].axhline(1.0, color="grey", lw=0.8, label=f"{base} (the reference)")
    sizes = sorted({r["parameters"] / scale for r in rows})
    for ax, ylabel in zip(axes, ("decode tokens/s (log scale)", f"decode speed-up over {base} (x)")):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{x:.3g}" for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel(f"parameters ({unit}, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")


def decode_size_sweep(rows: Sequence[dict], title: str | None = None):
    """``decode_sweep`` rows against model size, a column per batch: decode tokens/s (top) and the speed-up
    over bf16 with its min-max (bottom), measured points solid, each format's bandwidth floor (and the
    speed-up the floors allow) dashed in the same colour, drawn for skipped formats too. Only each shape's
    deepest rows are drawn (the cut-depth ones are for the cost model); None if there is no row."""
    deepest = {}
    for r in rows:
        deepest[r["shape"]] = max(deepest.get(r["shape"], 0), r["layers"])
    rows = sorted((r for r in rows if r["layers"] == deepest[r["shape"]]), key=lambda r: r["parameters"])
    batches = sorted({r["batch"] for r in rows})
    if not batches:
        return None
    fig, axes = plt.subplots(2, len(batches), figsize=(6.5 * len(batches), 8), squeeze=False)
    for column, batch in enumerate(batches):
        _sweep_column(axes[:, column], [r for r in rows if r["batch"] == batch], batch)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
