"""The torchrun worker's context: join and leave the process group, sum across ranks, report a result.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.errors import RecipeError
from . import launcher

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """Where this worker sits: its rank among ``world_size`` processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(backend: str | None = None) -> Context:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise RecipeError(f"no torchrun environment ({', '.join(missing)} unset): start this script with "
                          f"`torchrun --nproc-per-node N script.py` or recipes_lib.parallel.launcher.launch")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    launcher.check_backend(backend)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # With NCCL, gloo too for tensors on the CPU (FSDP2's CPU offload reduces the gradient norm there).
    pg_backend = "cpu:gloo,cuda:nccl" if backend == "nccl" else backend
    dist.init_process_group(pg_backend, device_id=device if device.type == "cuda" else None)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup(barrier: bool = True) -> None:
    """Leave the process group (so the launcher's processes exit without a warning).

    Args:
        barrier: wait for every rank first; pass False after an error, when a peer may never arrive.
    """
    if dist.is_initialized():
        if barrier:
            # Ranks leave together: a worker once stayed alive after its last output while its peer had
            # exited (seen with the c10d rendezvous under CPU contention; cause not pinned down).
            dist.barrier()
        dist.destroy_process_group()


def all_ranks_sum(value: float, device: torch.device, dtype: torch.dtype = torch.float64) -> float:
    """Sum of ``value`` over all ranks (itself when there is no process group)."""
    if not dist.is_initialized():
        return value
    total = torch.tensor(value, dtype=dtype, device=device)
    dist.all_reduce(total)
    return total.item()


def report_result(ctx: Context | None, **values) -> None:
    """Print one line the launcher parses: ``RESULT {"rank": r, ...}``; under ``launcher.launch``
    also write it to the run's result folder (``launcher.RESULT_DIR_ENV``).

    One write of the whole line: ranks sharing a stdout (torchrun without ``--tee``) then cannot
    interleave inside it (``print`` writes the text and the newline separately). The file is what the
    launcher trusts: torchrun's ``--tee`` reader can drop a worker's last line when the worker exits
    right after writing it (it checks "finished" after reading end-of-file, without reading again).
    """
    line = json.dumps({"rank": ctx.rank if ctx else 0, **values})
    sys.stdout.write(launcher.RESULT_PREFIX + line + "\n")
    sys.stdout.flush()
    folder = os.environ.get(launcher.RESULT_DIR_ENV)
    if folder and os.path.isdir(folder):  # another node of a multi-node run has no such folder
        launcher.write_result(folder, line)
