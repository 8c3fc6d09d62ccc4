"""Runs of the training script seen from the launching side: command lines, result rows, comparisons.

``script_args`` turns a dict into the script's options; ``launch_row`` launches it and returns rank
0's result (or the reason it could not run here); ``launch_rows`` does the same for several runs, in
one launch (``RUN_SEPARATOR``: one start-up for all) or one launch each; ``agreement`` compares a run
with the one-process reference; ``throughput`` adds tokens/s per GPU (median and min-max over the
timed steps) and MFU; ``memory_row`` is one line of the memory table, predicted against measured;
``timeline_row`` one line of the comm/compute table (``measure.timeline``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..core.errors import RecipeError
from ..measure import bench, flops, memory
from . import launcher

# Between two runs' options on the training script's command line (``run.parse_runs``).
RUN_SEPARATOR = "--then"


def script_args(values: dict) -> list[str]:
    """The training script's command line from a dict: ``True`` a bare flag, ``False``/None left out."""
    args = []
    for key, value in values.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not False and value is not None:
            args += [f"--{key}", str(value)]
    return args


def rank0(results: list[dict], nproc: int) -> dict:
    """Rank 0's result, with every rank's timed step seconds (``rank_step_times``, one list per rank);
    RecipeError unless each of the ``nproc`` ranks reported the same global losses."""
    ranks = [(r["rank"], r["world_size"]) for r in results]
    if ranks != [(rank, nproc) for rank in range(nproc)]:
        raise RecipeError(f"expected one result from each of {nproc} ranks, got (rank, world size) {ranks}")
    if any(r["losses"] != results[0]["losses"] for r in results):
        raise RecipeError("the ranks report different global losses: " + str([r["losses"] for r in results]))
    return results[0] | {"rank_step_times": [r.get("step_times") for r in results]}


def launch_row(script: str, nproc: int, values: dict, gpus: int, **launch) -> dict:
    """Rank 0's result of the script run with ``values`` on ``nproc`` processes, ``gpus`` added; a run this
    machine cannot make comes back as ``{"strategy", "error"}`` (``launcher.failure_reason``)."""
    try:
        results = launcher.launch(script, nproc, script_args(values), **({"echo": False} | launch))
    except RecipeError as error:
        return {"strategy": values.get("strategy"), "error": launcher.failure_reason(error)}
    return rank0(results, nproc) | {"gpus": gpus}


def launch_rows(script: str, nproc: int, runs: list[dict], gpus: int | Sequence[int], together: bool = True,
                **launch) -> list[dict]:
    """``launch_row`` for each of ``runs`` (option dicts): all in one launch of ``nproc`` processes
    (``together``; a run refused with a RecipeError is a row with its ``error``, the others go on), or
    one launch each. ``gpus``: for every run, or one per run. ``launch`` goes to ``launcher.launch``
    (``echo`` False unless given)."""
    gpus = list(gpus) if isinstance(gpus, Sequence) else [gpus] * len(runs)
    if not together or len(runs) == 1:
        return [launch_row(script, nproc, values, n, **launch) for values, n in zip(runs, gpus)]
    args = [arg for i, values in enumerate(runs) for arg in [RUN_SEPARATOR] * (i > 0) + script_args(values)]
    try:
        results = launcher.launch(script, nproc, args, **({"echo": False} | launch))
    except RecipeError as error:
        reason = launcher.failure_reason(error)
        return [{"strategy": values.get("strategy"), "error": reason} for values in runs]
    by_run = [[r["runs"][i] | {"rank": r["rank"]} for r in results] for i in range(len(runs))]
    return [{k: ranks[0][k] for k in ("strategy", "error")} if "error" in ranks[0]
            else rank0(ranks, nproc) | {"gpus": n} for ranks, n in zip(by_run, gpus)]


def succeeded(row: dict) -> dict:
    """``row`` itself, or the RecipeError of a run that could not be made (``launch_rows``)."""
    if "error" in row:
        raise RecipeError(f"--strategy {row['strategy']}: {row['error']}")
    return row


def timeline_row(strategy: str, result: dict) -> dict:
    """One line of the comm/compute table: a run's profiled steps (medians, ms), or why there are none."""
    steps = result.get("timeline")
    if steps is None:
        return {"strategy": strategy, "note": (result.get("error") or "not profiled")[:90]}
    mib = None if steps["comm_bytes"] is None else steps["comm_bytes"] / 2**20
    return {"strategy": strategy, "step ms": steps["step_ms"], "compute ms": steps["compute_ms"],
            "comm ms": steps["comm_ms"], "exposed comm ms": steps["exposed_comm_ms"],
            "idle ms": steps["idle_ms"], "collectives": steps["collectives"], "comm MiB": mib}


def throughput(result: dict, config, peak_flops: float | None, measured_peak: float | None = None) -> dict:
    """``result`` with tokens/s per GPU (the median step's, and its min-max over the timed steps) and MFU:
    ``mfu`` of the datasheet ``peak_flops``, ``mfu_measured`` of the ``measured_peak`` matmul rate
    (``timing.matmul_peak``); None where a peak is unknown."""
    per_token = flops.training_flops_per_token(config, result["seq_len"],
                                               result["trainable_params"] / result["n_params"])
    gpus = max(result["gpus"], 1)
    per_gpu = result["tokens_per_s"] / gpus
    return result | {"tokens_per_s_per_gpu": per_gpu,
                     "tokens_per_s_per_gpu_min": result["tokens_per_s_min"] / gpus,
                     "tokens_per_s_per_gpu_max": result["tokens_per_s_max"] / gpus,
                     "mfu": flops.mfu(per_gpu, per_token, peak_flops),
                     "mfu_measured": flops.mfu(per_gpu, per_token, measured_peak)}


def per_gpu_spread(result: dict) -> str:
    """A run's tokens/s per GPU over its timed steps, ``"min-max"`` (``bench.spread``'s format)."""
    return bench.spread({"tokens_per_s_min": result["tokens_per_s_per_gpu_min"],
                         "tokens_per_s_max": result["tokens_per_s_per_gpu_max"]})


def agreement(result: dict, params: dict, reference: dict, reference_params: dict) -> dict:
    """How far a run's losses, gradient norms and final weights are from the one-process reference's."""
    def worst_rel(key):
        return max(abs(a - b) / abs(b) for a, b in zip(result[key], reference[key]))
    worst = max((params[k] - reference_params[k]).abs().max().item() for k in reference_params)
    return {"strategy": result["strategy"], "processes": result["world_size"],
            "max loss rel. diff": worst_rel("losses"), "max grad-norm rel. diff": worst_rel("grad_norms"),
            "max parameter diff": worst, "param bytes / rank": result["param_bytes"],
            "optimizer bytes / rank": result["optimizer_bytes"]}


def memory_row(strategy: str, result: dict, predicted: dict | None, unit: float, unit_name: str) -> dict:
    """One line of the memory table: predicted state, measured state and breakdown (CUDA), tokens/s, MFU."""
    if "error" in result:
        return {"strategy": strategy, "note": result["error"][:90]}
    row = {"strategy": strategy, "GPUs": result["gpus"],
           f"state predicted ({unit_name})": predicted["on device"] / unit}
    parts = memory.memory_breakdown(result)
    if parts is not None:  # CUDA readings
        state = parts.parameters + parts.gradients + parts.optimizer
        row |= {f"state measured ({unit_name})": state / unit}
        row |= {f"{k} ({unit_name})": v / unit for k, v in vars(parts).items()}
    else:
        row |= {f"weights measured ({unit_name})": result["param_bytes"] / unit,
                f"AdamW measured ({unit_name})": result["optimizer_bytes"] / unit}
    row["tokens/s per GPU"] = result["tokens_per_s_per_gpu"]
    row["tokens/s per GPU, min-max"] = per_gpu_spread(result)
    if result["mfu"] is not None:  # a GPU with a known peak
        row["MFU (% of datasheet)"] = 100 * result["mfu"]
    if result.get("mfu_measured") is not None:  # and its measured matmul peak, side by side
        row["MFU (% of measured matmul)"] = 100 * result["mfu_measured"]
    return row


def recipe_error(fn: Callable[[], object]) -> RecipeError | str:
    """The ``RecipeError`` that ``fn()`` raised, or ``"no error"``."""
    try:
        fn()
    except RecipeError as error:
        return error
    return "no error"

