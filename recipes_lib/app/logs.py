"""What a run records: a JSONL line per logged step, TensorBoard event files, the run's duration.

Only the main process writes. ``metrics.jsonl`` holds one JSON object per logged step (any tool reads
it); ``tensorboard/`` holds the same scalars as event files (``tensorboard --logdir <output.dir>``);
``training_duration.json`` the wall time, tokens, tokens/s and the device, written at the end. A run that
resumes (or starts over) drops the lines an interrupted run logged past its first step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..core.hardware import Hardware


class RunLog:
    """Scalars per step to JSONL and TensorBoard, from the main process only."""

    def __init__(self, out_dir: str | Path, main: bool = True, tensorboard: bool = True, first_step: int = 0):
        """A run starting after step ``first_step`` (0, or the checkpoint it resumes) drops what an earlier,
        interrupted run logged past that step, so that no step is logged twice."""
        self.out_dir, self.main = Path(out_dir), main
        self.start = time.perf_counter()
        self.writer = None
        if not main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        kept = [r for r in _whole_records(path) if r.get("step", 0) <= first_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.jsonl = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            # TensorBoard hides the earlier event files' scalars from purge_step on
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=first_step + 1)

    def log(self, step: int, **scalars: float) -> None:
        if not self.main:
            return
        record = {"step": step, **{k: v for k, v in scalars.items() if v is not None}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)

    def finish(self, hw: Hardware, tokens: int, steps: int, **extra) -> dict:
        """Write ``training_duration.json``; returns what it holds."""
        seconds = time.perf_counter() - self.start
        summary = {"wall_seconds": seconds, "steps": steps, "tokens": tokens,
                   "tokens_per_s": tokens / seconds if seconds else None, "device": hw.name, **extra}
        if self.main:
            (self.out_dir / "training_duration.json").write_text(json.dumps(summary, indent=1) + "\n")
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
        return summary


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _whole_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` that may end in a line half-written by a killed run."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
