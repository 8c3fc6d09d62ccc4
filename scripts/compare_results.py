"""Compare two results files figure by figure: what moved by more than a tolerance.

    python scripts/compare_results.py results/history/OLD.json results/NEW.json [--time 0.10] [--memory 0.02]

Every number found at the same place in both files (``figures`` and ``scoreboard``, nested dicts
and lists, list entries matched by their ``name`` or benchmark keys where they have them) is
compared. Keys that hold
bytes (``*bytes*``, ``*peak*``, ``*gib*``) use the memory tolerance, the rest the time tolerance.
Prints a Markdown table of the figures outside their tolerance, then a count of those within it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MEMORY_WORDS = ("bytes", "peak", "gib", "memory")


def label(item, index: int) -> str:
    """A list entry's name: its ``name``, else what identifies a benchmark row, else its position."""
    if not isinstance(item, dict):
        return str(index)
    keys = [str(item[k]) for k in ("implementation", "seq_len", "batch", "window") if item.get(k) is not None]
    return str(item.get("name") or "/".join(keys) or index)


def flatten(value, prefix: str = "") -> dict[str, float]:
    """``{"a.b[name].c": number}`` for every number in ``value`` (booleans left out)."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((label(item, i), item) for i, item in enumerate(value))
    else:
        return {}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def compare(old: dict, new: dict, time_tol: float, memory_tol: float) -> tuple[list[tuple], int]:
    """(rows outside tolerance: (key, old, new, ratio), count within tolerance)."""
    a = flatten({"figures": old.get("figures"), "scoreboard": old.get("scoreboard")})
    b = flatten({"figures": new.get("figures"), "scoreboard": new.get("scoreboard")})
    outside, within = [], 0
    for key in sorted(a.keys() & b.keys()):
        tol = memory_tol if any(w in key.lower() for w in MEMORY_WORDS) else time_tol
        if a[key] == b[key] or (a[key] and abs(b[key] / a[key] - 1) <= tol):
            within += 1
        else:
            outside.append((key, a[key], b[key], b[key] / a[key] if a[key] else float("inf")))
    return outside, within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--time", type=float, default=0.10, help="relative tolerance of non-memory figures")
    parser.add_argument("--memory", type=float, default=0.02, help="relative tolerance of memory figures")
    args = parser.parse_args()
    old, new = json.loads(args.old.read_text()), json.loads(args.new.read_text())
    outside, within = compare(old, new, args.time, args.memory)
    print(f"{args.old.name} ({old['environment'].get('device')}) -> {args.new.name} "
          f"({new['environment'].get('device')})\n")
    print("| figure | before | after | after / before |\n| --- | --- | --- | --- |")
    for key, before, after, ratio in outside:
        print(f"| {key} | {before:,.4g} | {after:,.4g} | {ratio:.3f} |")
    print(f"\n{len(outside)} figures outside tolerance ({args.time:.0%} time, {args.memory:.0%} memory), "
          f"{within} within")


if __name__ == "__main__":
    main()
