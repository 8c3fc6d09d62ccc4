"""The size sweep's plot (and notebook 03's decode panels): they draw, and their axes carry units."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from recipes_lib import plots  # noqa: E402
from recipes_lib.measure import decode_sweep  # noqa: E402


def row(shape, params, layers, fmt, batch, rate=None, skipped=None, floor=1000.0, speedup=None):
    return {"shape": shape, "parameters": params, "layers": layers, "format": fmt, "batch": batch,
            "weight_dtype": "torch.bfloat16", "floor_tokens_per_s": floor, "skipped": skipped,
            "decode_tokens_per_s": rate, "speedup_vs_bf16": speedup,
            "speedup_min": None if speedup in (None, 1.0) else 0.9 * speedup,
            "speedup_max": None if speedup in (None, 1.0) else 1.1 * speedup}


ROWS = [r for batch in (1, 16) for r in (
    row("1b", 1.2e9, 16, "bf16", batch, 600, floor=1500, speedup=1.0),
    row("1b", 1.2e9, 16, "int8", batch, 700, floor=2800, speedup=1.17),
    row("1b", 1.2e9, 16, "int4", batch, skipped="no int4 kernel here", floor=4500),
    row("1b", 0.7e9, 8, "bf16", batch, 900, floor=2500, speedup=1.0),  # a cut-depth row: not drawn
    row("8b", 8.0e9, 32, "bf16", batch, 150, floor=200, speedup=1.0),
    row("8b", 8.0e9, 32, "int8", batch, 260, floor=390, speedup=1.73),
    row("8b", 8.0e9, 32, "int4", batch, skipped="no int4 kernel here", floor=700))]


def test_size_sweep_draws_a_column_per_batch_with_units():
    fig = plots.decode_size_sweep(ROWS, title="int8 weight-only passes bf16")
    axes = fig.axes
    assert len(axes) == 4 and fig._suptitle.get_text() == "int8 weight-only passes bf16"
    for ax in axes:
        assert ax.get_xlabel() == "parameters (billions, log scale)" and ax.get_xscale() == "log"
        assert ax.get_title() in ("batch 1", "batch 16")
    tokens, speedup = axes[0], axes[2]  # a column per batch: tokens/s on top, speed-up below
    assert tokens.get_ylabel() == "decode tokens/s (log scale)" and tokens.get_yscale() == "log"
    assert speedup.get_ylabel() == "decode speed-up over bf16 (x)"
    labels = [t.get_text() for t in tokens.get_legend().get_texts()]
    assert "int4 bandwidth floor (not run here)" in labels and "int8 measured" in labels
    measured = next(line for line in tokens.get_lines() if line.get_label() == "bf16 measured")
    assert list(measured.get_xdata()) == [1.2, 8.0]  # full depth only, in billions
    assert list(measured.get_ydata()) == [600, 150]
    allowed = next(line for line in speedup.get_lines() if line.get_label().startswith("int8: the speed-up"))
    assert list(allowed.get_ydata()) == pytest.approx([2800 / 1500, 390 / 200])
    plt.close(fig)


def test_size_sweep_names_an_unquantized_fp32_reference_and_counts_in_millions():
    rows = [dict(r, parameters=r["parameters"] / 1e3, weight_dtype="torch.float32") for r in ROWS]
    fig = plots.decode_size_sweep(rows)
    assert fig.axes[0].get_xlabel() == "parameters (millions, log scale)"
    assert fig.axes[2].get_ylabel() == "decode speed-up over float32 (unquantized) (x)"
    assert plots.decode_size_sweep([]) is None
    plt.close(fig)


def test_size_sweep_plots_a_real_cpu_sweep():
    result = decode_sweep.run(shapes=("llama-mini",), formats=("bf16", "int8", "int4"), batches=(1,),
                              prompt_len=4, new_tokens=2, repeats=2, depth_fractions=(1.0, 0.5))
    fig = plots.decode_size_sweep(result["rows"])
    assert len(fig.axes) == 2 and fig.axes[0].get_lines()
    plt.close(fig)


def test_decode_panels_show_each_batch_and_the_weights():
    speed = {"bf16": [{"decode_tokens_per_s": 600.0, "weight_bytes": 2**31}, {"decode_tokens_per_s": 5000.0}],
             "int8": [{"decode_tokens_per_s": 700.0, "weight_bytes": 2**30}]}  # measured at batch 1 only
    panels = plots.decode_panels(speed, [1, 16])
    assert [kw["title"] for _, kw in panels] == ["decode at batch 1", "decode at batch 16", "weight memory"]
    assert panels[1][1]["names"] == ["bf16"] and panels[2][1]["values"] == [2.0, 1.0]
    assert panels[0][1]["ylabel"] == "decode tokens/s" and panels[2][1]["ylabel"] == "weights (GiB)"
    fig = plots.side_by_side(panels)
    assert len(fig.axes) == 3
    plt.close(fig)
