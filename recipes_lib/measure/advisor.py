"""Does a training plan fit a GPU, and if not, which recipe changes make it fit: the OOM advisor.

``capacity("24GiB")`` or ``capacity("L4")`` gives the bytes a run may allocate there: the card's total
memory less the CUDA context's reserve, with a margin for the caching allocator's fragmentation (its
reserved memory exceeds what tensors hold). ``advise(plan, bytes)`` stacks recipe changes in order of
cost, cheapest first, each with its predicted peak, until the plan fits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import RecipeError
from .estimate import Plan, estimate, with_changes
from .memory import GiB

# Total memory as nvidia-smi reports it (MiB).
GPUS = {"T4": 15360, "V100-16GB": 16384, "V100-32GB": 32768, "L4": 23034, "A10": 24564, "A10G": 23028,
        "RTX 3090": 24576, "RTX 4090": 24564, "L40S": 46068, "A100-40GB": 40960, "A100-80GB": 81920,
        "H100": 81559, "H100 NVL": 95830, "H200": 143771}
CONTEXT_RESERVE = 512 * 2**20  # the CUDA context, cuBLAS and cuDNN handles: outside PyTorch's allocator
FRAGMENTATION = 0.05           # share of the rest the caching allocator may hold without a tensor in it


def _key(text: str) -> str:
    return re.sub(r"[\s_-]|gb$", "", text.lower())


def capacity(gpu: str) -> tuple[str, int]:
    """``(name, bytes a run may allocate)`` for a GPU name (``"L4"``, ``"A100-80GB"``) or a size
    (``"24GiB"``, ``"24GB"``, ``"24"``: GiB)."""
    size = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g)?\s*", gpu.lower())
    if size:
        total = float(size[1]) * (1e9 if size[2] == "gb" else GiB)
        name = f"{float(size[1]):g} {'GB' if size[2] == 'gb' else 'GiB'}"
    else:
        matches = ([n for n in GPUS if _key(n) == _key(gpu)]
                   or [n for n in GPUS if _key(n).startswith(_key(gpu))])
        if len(matches) != 1:
            known = ", ".join(f"{n} ({GPUS[n] / 1024:.0f} GiB)" for n in GPUS)
            raise RecipeError(f"gpu={gpu!r}: " + ("which one? " + " or ".join(matches) if matches else
                                                   "unknown GPU") + f". Known: {known}; or give a size "
                                                   f"such as 24GiB")
        name, total = matches[0], GPUS[matches[0]] * 2**20
    if total <= CONTEXT_RESERVE:
        raise RecipeError(f"gpu={gpu!r}: {total / GiB:.2f} GiB is less than the CUDA context needs")
    return name, usable(total)


def usable(total_bytes: float) -> int:
    """Bytes a run may allocate on a GPU of ``total_bytes``: less the context, with the allocator's margin."""
    return int((total_bytes - CONTEXT_RESERVE) * (1 - FRAGMENTATION))


@dataclass
class Advice:
    """One rung of the advice: the change, what it costs, the plan with it (and all before), its peak."""

    change: str
    cost: str
    plan: Plan
    peak: float
    fits: bool


def _smaller_batch(plan: Plan, limit: float, config) -> Plan | None:
    """The largest smaller micro-batch that fits, the global batch kept by more accumulation."""
    for micro in range(plan.micro_batch - 1, 0, -1):
        if plan.micro_batch % micro == 0:
            candidate = with_changes(plan, micro_batch=micro,
                                     accum_steps=plan.accum_steps * plan.micro_batch // micro)
            if estimate(candidate, config).peak <= limit or micro == 1:
                return candidate
    return None


def _more_gpus(plan: Plan, limit: float, config) -> Plan | None:
    for gpus in (2, 4, 8):
        if gpus > plan.gpus:
            candidate = with_changes(plan, strategy="fsdp2", gpus=gpus, optimizer="fused",
                                     accum_steps=max(plan.accum_steps * plan.gpus // gpus, 1))
            if estimate(candidate, config).peak <= limit or gpus == 8:
                return candidate
    return None


Change = Callable[[Plan, float, object], Plan | None]
CHANGES: list[tuple[str, str, Change]] = [  # in order of cost
    ("fused AdamW", "none: the same update in one kernel",
     lambda p, lim, c: with_changes(p, optimizer="fused") if p.optimizer == "foreach" else None),
    ("SDPA attention (flash kernels)", "none: faster than eager",
     lambda p, lim, c: with_changes(p, attention="sdpa") if p.attention == "eager" else None),
    ("chunked loss (fused LM head + cross-entropy)", "a few % of step time",
     lambda p, lim, c: with_changes(p, chunked_loss=True) if not p.chunked_loss else None),
    ("activation checkpointing, every layer", "one extra forward: about +30% step time",
     lambda p, lim, c: with_changes(p, checkpoint_every=1) if p.checkpoint_every != 1 else None),
    ("smaller micro-batch, more accumulation", "smaller kernels: lower tokens/s", _smaller_batch),
    ("LoRA adapters instead of full fine-tuning", "a different method: adapters only learn",
     lambda p, lim, c: with_changes(p, method="lora") if p.method == "full" else None),
    ("QLoRA (4-bit NF4 base)", "dequantising: slower steps, a quantized base",
     lambda p, lim, c: with_changes(p, method="qlora") if p.method == "lora" else None),
    ("AdamW state offloaded to the CPU", "PCIe copies and a CPU step; no gradient clipping",
     lambda p, lim, c: with_changes(p, optimizer="offload") if p.strategy == "single"
     and p.optimizer != "offload" else None),
    ("checkpointed activations offloaded to the CPU", "PCIe copies of every layer's input",
     lambda p, lim, c: with_changes(p, offload_activations=True) if p.checkpoint_every
     and not p.offload_activations else None),
    ("more GPUs with FSDP2", "more GPUs", _more_gpus),
]


def advise(plan: Plan, limit: float, config=None) -> list[Advice]:
    """Recipe changes, cheapest first, each on top of the ones before, until ``plan`` fits in ``limit``
    bytes; a change is kept only if it lowers the peak. Empty if ``plan`` fits already."""
    current, peak, out = plan, estimate(plan, config).peak, []
    for change, cost, apply in CHANGES:
        if peak <= limit:
            break
        candidate = apply(current, limit, config)
        if candidate is None:
            continue
        candidate_peak = estimate(candidate, config).peak
        if candidate_peak < peak:
            current, peak = candidate, candidate_peak
            out.append(Advice(change, cost, current, peak, peak <= limit))
    return out


def advice_text(plan: Plan, gpu: str | int, config=None) -> str:
    """"fits" or "does not fit" on ``gpu`` (a name or size for ``capacity``, or a number of bytes the run
    may allocate, e.g. a budget), and the advice, as lines of text."""
    name, limit = capacity(gpu) if isinstance(gpu, str) else (f"{gpu / 2**20:,.0f} MiB", gpu)
    peak = estimate(plan, config).peak
    unit, scale = ("GiB", GiB) if limit >= GiB else ("MiB", 2**20)
    head = f"{name}: {limit / scale:.1f} {unit} usable, predicted peak {peak / scale:.2f} {unit}"
    if peak <= limit:
        return f"fits on {head}"
    advice = advise(plan, limit, config)
    lines = [f"does not fit on {head}; cheapest changes first:"]
    lines += [f"  {i}. + {a.change}: {a.peak / scale:.2f} {unit}, {'fits' if a.fits else 'not yet'} "
              f"(costs {a.cost})" for i, a in enumerate(advice, 1)]
    if not advice or not advice[-1].fits:
        lines.append("  no recipe change here makes it fit: a larger GPU, or a shorter sequence")
    return "\n".join(lines)
