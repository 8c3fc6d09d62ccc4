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
