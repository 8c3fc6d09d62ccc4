"""Build the shipped instruction data sets from the project's synthetic tasks (no download).

    python scripts/build_instruct_data.py            # writes data/instruct.jsonl and data/instruct_chat.jsonl

- ``data/instruct.jsonl``: 2,000 rows with ``prompt``, ``response`` and ``task`` columns, the five
  pre-training tasks and ``reverse`` (which the embedded model has not seen) drawn round-robin; the
  default data of ``recipes train`` and its CI run.
- ``data/instruct_chat.jsonl``: 200 conversations in a ``messages`` column (``role``/``content``), some
  with a system message, some with two user/assistant exchanges: the ``format: chat`` example.

Deterministic (fixed seeds): running it again rewrites the same bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipes_lib.core import tasks

TASKS = ("reverse", *tasks.TASKS)
SYSTEM = "You solve small text tasks. Answer with the result only."


def instruct_rows(n: int, seed: int) -> list[dict]:
    return [{"prompt": ex.prompt, "response": ex.answer, "task": ex.task}
            for ex in tasks.make_examples(n, seed, TASKS)]


def chat_rows(n: int, seed: int) -> list[dict]:
    """Conversations: every third has two exchanges, every fifth opens with a system message."""
    examples = iter(tasks.make_examples(2 * n, seed, TASKS))
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if i % 5 == 0 else []
        for _ in range(2 if i % 3 == 0 else 1):
            ex = next(examples)
            messages += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--chat-rows", type=int, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(instruct_rows(args.rows, seed=15), args.out / "instruct.jsonl")
    write_jsonl(chat_rows(args.chat_rows, seed=16), args.out / "instruct_chat.jsonl")


if __name__ == "__main__":
    main()
