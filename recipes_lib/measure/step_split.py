"""Where one training step's time goes: attention, MLP, loss, offload copies and the rest.

``profile(step, device)`` runs ``step()`` once under torch.profiler (``timeline.trace_events``, the
harness of the comm/compute timeline) and ``split`` cuts the step's wall time (its ``record_function``
range) into parts that do not overlap, so that they add up to the step:

- **attention**: SDPA's kernels (on a CPU, its operators), found by name (``ATTENTION``, one table for
  the flash, memory-efficient and cuDNN backends), forward, backward and any recomputation;
- **mlp**: what runs inside ``MLP_RANGE``, the ``record_function`` range around the tiled MLP's forward
  and backward (``long_context.tiling``; its recomputations included). An untiled MLP records no range:
  its time is then in ``other``, and ``notes`` says so;
- **loss**: what runs inside ``core.losses.LOSS_RANGE``, around the chunked LM head + cross-entropy's
  forward and backward (the full-logits loss records none: ``notes`` again);
- **offload copies**: host<->device copies (``gpu_memcpy`` events HtoD and DtoH: activations offloaded to
  pinned memory and back, and the few bytes ``.item()`` reads). A copy on a side stream overlaps compute
  and costs the step nothing while it does, so the split counts only the copy time with no kernel beside
  it, ``copies_exposed_s``; ``copies_s`` is all of it. (``save_on_cpu``, our offload, copies on the
  compute stream: its copies are exposed.) On a CPU there are none;
- **other**: the rest: norms, RoPE, embeddings, the optimizer step, launch gaps and waits (on a GPU
  ``idle_s`` of it, when the device runs nothing).

``attribution`` says which reading was used:
- ``"gpu"`` (the trace has kernels): device time. A kernel is attention by its name; else MLP (or loss)
  if it starts inside a ``gpu_user_annotation`` span of that range on its own stream: the profiler's
  image of a ``record_function`` range on the GPU, from the first to the last kernel it launched there.
- ``"cpu"``: host time. Attention is the SDPA operators and their backward nodes, MLP and loss their
  ``user_annotation`` ranges.

Each part's time is a union of intervals (``timeline.merge``: nested operators and concurrent streams
count once); where two parts overlap, the earlier in ``PARTS`` keeps the time.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..core.losses import LOSS_RANGE
from . import timeline
from .timeline import Interval, clip, length, merge, minus, span

MLP_RANGE = "recipes::mlp"
PARTS = ("attention", "mlp", "loss", "offload copies", "other")
RANGES = {"mlp": MLP_RANGE, "loss": LOSS_RANGE}
# Lowercase pieces of the names SDPA's kernels (CUDA, by backend) and operators (CPU) carry, forward
# and backward: e.g. pytorch_flash::flash_fwd_kernel, flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel,
# fmha_cutlassF_bf16_aligned_64x128_rf_sm80, cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16,
# aten::_scaled_dot_product_flash_attention_for_cpu, ScaledDotProductFlashAttentionForCpuBackward0.
ATTENTION = {"flash": ("flash_fwd", "flash_bwd", "pytorch_flash::", "flashattn"),
             "efficient": ("fmha_cutlass", "memeffattention"),
             "cudnn": ("fort_native_sdpa",),
             "cpu": ("scaled_dot_product", "scaleddotproduct")}
COPIES = ("HtoD", "DtoH")  # in a gpu_memcpy event's name: "Memcpy HtoD (Pinned -> Device)"
_HOW = {"gpu": {"attention": "SDPA kernels by name", "mlp": f"kernels inside {MLP_RANGE} (tiled MLP)",
                "loss": f"kernels inside {LOSS_RANGE} (chunked loss)",
                "offload copies": "HtoD/DtoH copies with no kernel beside them",
                "other": "other kernels, launch gaps and waits"},
        "cpu": {"attention": "SDPA operators", "mlp": f"{MLP_RANGE} ranges (tiled MLP)",
                "loss": f"{LOSS_RANGE} ranges (chunked loss)", "offload copies": "none on a CPU",
                "other": "other operators and Python"}}


@dataclass(frozen=True)
class StepSplit:
    """One profiled step's time by part (module docstring), in seconds."""

    attribution: str             # "gpu": device kernels and copies; "cpu": host operators and ranges
    step_s: float                # the step's wall time
    seconds: dict[str, float]    # by part of PARTS: disjoint, they add up to step_s
    shares: dict[str, float]     # the same in % of step_s (100 in all)
    copies_s: float              # all host<->device copy time, overlapped by kernels or not
    copies_exposed_s: float      # the part of it with no kernel beside it (= seconds["offload copies"])
    idle_s: float | None         # GPU: no kernel and no copy ran (part of "other"); CPU: None
    notes: tuple[str, ...]       # the parts nothing was attributed to, and where their time went

    def table(self):
        """A pandas table: seconds and % of the step per part, what each counts, then the step."""
        import pandas as pd

        how = dict(_HOW[self.attribution])
        for note in self.notes:
            part, _, text = note.partition(": ")
            how[part] = text
        copying = f"offload copies (exposed; {self.copies_s:.3g} s copying in all)" if self.copies_s else None
        rows = [{"part": copying if copying and part == "offload copies" else part, "s": self.seconds[part],
                 "% of step": self.shares[part], "counted": how[part]} for part in PARTS]
        rows.append({"part": "step", "s": self.step_s, "% of step": 100.0,
                     "counted": f"{self.attribution} time"})
        return pd.DataFrame(rows).set_index("part").round({"s": 4, "% of step": 1})


def is_attention(name: str) -> bool:
    """Whether a kernel or operator name is one of SDPA's (``ATTENTION``)."""
    lowered = name.lower()
    return any(piece in lowered for pieces in ATTENTION.values() for piece in pieces)


def _by_stream(ranges: Iterable[dict]) -> dict:
    """{(pid, tid): (sorted starts, disjoint spans)} of ``gpu_user_annotation`` spans."""
    streams = defaultdict(list)
    for event in ranges:
        streams[event.get("pid"), event.get("tid")].append(span(event))
    return {key: ([s for s, _ in spans], spans) for key, spans in ((k, merge(v)) for k, v in streams.items())}


def _inside(event: dict, streams: dict) -> bool:
    starts, spans = streams.get((event.get("pid"), event.get("tid")), ([], []))
    index = bisect.bisect_right(starts, event["ts"]) - 1
    return index >= 0 and event["ts"] < spans[index][1]


def _gpu_parts(spans: Sequence[dict]) -> tuple[dict, list[Interval], list[Interval]]:
    """(part -> kernel intervals, offload-copy intervals, all other device work) of a GPU trace."""
    is_copy = [e.get("cat") == "gpu_memcpy" and any(c in e.get("name", "") for c in COPIES) for e in spans]
    annotations = [e for e in spans if e.get("cat") == "gpu_user_annotation"]
    ranges = {part: _by_stream(e for e in annotations if e["name"] == name) for part, name in RANGES.items()}
    parts: dict[str, list[Interval]] = {"attention": [], "mlp": [], "loss": []}
    for kernel in (e for e in spans if e.get("cat") == "kernel"):
        part = "attention" if is_attention(kernel["name"]) else next(
            (p for p, streams in ranges.items() if _inside(kernel, streams)), None)
        if part:
            parts[part].append(span(kernel))
    device = [span(e) for e, copy in zip(spans, is_copy)
              if not copy and e.get("cat") in timeline.DEVICE_CATEGORIES]
    return parts, [span(e) for e, copy in zip(spans, is_copy) if copy], device


def _cpu_parts(spans: Sequence[dict]) -> tuple[dict, list[Interval], list[Interval]]:
    """(part -> operator and range intervals, no copies, no device work) of a CPU trace."""
    parts = {"attention": [span(e) for e in spans if e.get("cat") == "cpu_op" and is_attention(e["name"])]}
    for part, name in RANGES.items():
        parts[part] = [span(e) for e in spans if e.get("cat") == "user_annotation" and e["name"] == name]
    return parts, [], []


def split(events: Sequence[dict]) -> StepSplit:
    """The split of the one ``timeline.STEP_PREFIX`` range of a Chrome trace's ``traceEvents``."""
    spans = [e for e in events if e.get("ph") == "X" and "ts" in e and "name" in e]
    steps = [e for e in spans if e.get("cat") == "user_annotation"
             and e["name"].startswith(timeline.STEP_PREFIX)]
    if len(steps) != 1:
        raise ValueError(f"a trace of one profiled step has one {timeline.STEP_PREFIX!r} range, "
                         f"not {len(steps)}")
    start, end = span(steps[0])
    on_gpu = any(e.get("cat") == "kernel" for e in spans)
    found, copies, device = (_gpu_parts if on_gpu else _cpu_parts)(spans)
    taken, seconds = [], {}
    for part in ("attention", "mlp", "loss"):  # PARTS' order: an earlier part keeps shared time
        own = minus(clip(found[part], start, end), taken)
        seconds[part], taken = length(own) / 1e6, merge(taken + own)
    copying = clip(copies, start, end)
    exposed = minus(copying, taken + clip(device, start, end))
    step_s = (end - start) / 1e6
    seconds["offload copies"] = length(exposed) / 1e6
    seconds["other"] = max(step_s - sum(seconds.values()), 0.0)
    busy = length(taken + copying + clip(device, start, end)) / 1e6
    return StepSplit("gpu" if on_gpu else "cpu", step_s, seconds,
                     {part: 100 * s / step_s for part, s in seconds.items()}, length(copying) / 1e6,
                     seconds["offload copies"], step_s - busy if on_gpu else None, _notes(spans, seconds))


def _notes(spans: Sequence[dict], seconds: dict[str, float]) -> tuple[str, ...]:
    ran = {e["name"] for e in spans if e.get("cat") == "user_annotation"}
    notes = []
    if seconds["attention"] == 0:
        notes.append("attention: no SDPA kernel or operator found by name (ATTENTION); eager or math "
                     "attention is counted in other")
    if MLP_RANGE not in ran:
        notes.append(f"mlp: untiled (no {MLP_RANGE} range ran): the MLP is counted in other")
    if LOSS_RANGE not in ran:
        notes.append(f"loss: not the chunked loss (no {LOSS_RANGE} range ran): the loss is counted in other")
    return tuple(notes)


def profile(step: Callable[[], object], device: torch.device, warmup: int = 0,
            trace: str | None = None) -> StepSplit:
    """Run ``step()`` under torch.profiler (``warmup`` steps first, thrown away) and split the last one.

    Args:
        step: one training step that waits for its device before returning (``core.train.sync``).
        trace: also write the Chrome trace there (``timeline.trace_events``).
    """
    return split(timeline.trace_events(step, 1, device, trace, warmup))
