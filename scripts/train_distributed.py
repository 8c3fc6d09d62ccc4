"""Train a causal LM on several processes: ``recipes train`` on a config file, or notebook 02's measured runs.

With a config file first, this script is ``recipes train`` (``python -m recipes_lib train``): real
data, checkpoints and resume, logs, the trained adapters or model saved. Use it, or the command:

    torchrun --nproc-per-node 8 scripts/train_distributed.py configs/fsdp2-full.yaml lr=1e-5
    accelerate launch --config_file configs/accelerate/zero3.yaml \
        scripts/train_distributed.py configs/zero3.yaml

With options first (``--strategy ...``), it runs notebook 02's measurements: DDP, FSDP2, FSDP-QLoRA,
DeepSpeed ZeRO and naive model parallelism on random tokens of a fixed global batch, reporting
losses, memory and tokens/s and saving no model:

    torchrun --standalone --nproc-per-node 2 scripts/train_distributed.py --strategy fsdp2 --steps 4
    torchrun --standalone --nproc-per-node 2 scripts/train_distributed.py --strategy deepspeed-zero3 --bf16
    python scripts/train_distributed.py --strategy single        # the one-process reference
    python scripts/train_distributed.py --strategy naive-mp      # one process, layers spread over the GPUs
    torchrun --standalone --nproc-per-node 2 scripts/train_distributed.py --strategy ddp --timeline-steps 2 \
        --then --strategy fsdp2 --timeline-steps 2 --trace outputs/fsdp2_trace.json  # two runs, one start-up

The measured runs are a thin command line over ``recipes_lib.parallel.run`` (the options, the run) and
``recipes_lib.parallel.batches`` (the global batch of every step, the same whatever the number of
processes; rank r trains on its slice of rows, ``--micro-batch`` rows at a time). Each rank prints
one ``RESULT {json}`` line (loss and gradient norm per step, memory, tokens/s) that
``recipes_lib.parallel.launcher.launch`` reads back; ``--save-params`` writes the final full weights;
``--timeline-steps`` adds profiled steps and their comm/compute timeline (``recipes_lib.measure.timeline``).
Steps are timed by ``recipes_lib.measure.timing``. The same script runs on CPU with gloo (CI) and on
GPUs with NCCL.
"""

from __future__ import annotations

import sys

import recipes_lib
from recipes_lib.app import cli
from recipes_lib.measure import timing
from recipes_lib.parallel import run

recipes_lib.quiet()  # no weight-loading bars or known-harmless warnings in every rank's output


def progress(args):
    """Rank 0's live progress: one line per step."""
    def show(index: int, loss: float, seconds: float, tokens: int) -> None:
        print(f"step {index + 1}/{args.steps} | loss {loss:.4f} | {seconds:.2f} s | "
              f"{tokens / seconds:,.0f} tokens/s", flush=True)
    return show


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):  # a config file: `recipes train`
        sys.exit(cli.main(["train", *sys.argv[1:]]))
    runs = run.parse_runs()  # one run, or several separated by --then
    run.main(runs if len(runs) > 1 else runs[0], timer=timing.stepper, progress=progress)
