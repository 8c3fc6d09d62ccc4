"""Print the scoreboard: every technique's peak memory and tokens/s against its baseline.

Reads the ``outputs/*.json`` files that the notebooks write (``make run``), prints one table and
saves it as ``outputs/scoreboard.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUTPUTS = Path(__file__).resolve().parent.parent / "outputs"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.3f}"


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if not value or not base else f"{value / base:.2f}x"


def table(payloads: list[dict]) -> str:
    header = ("| notebook | device | technique | baseline | peak GiB | baseline GiB | memory | "
              "tokens/s | baseline tokens/s | speed |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for payload in payloads:
        device = payload["environment"]["device"]
        for row in payload["scoreboard"]:
            tps, base_tps = row["tokens_per_s"], row["baseline_tokens_per_s"]
            lines.append(
                f"| {row['notebook']} | {device} | {row['technique']} | {row['baseline']} | "
                f"{_gib(row['memory_bytes'])} | {_gib(row['baseline_memory_bytes'])} | "
                f"{_ratio(row['memory_bytes'], row['baseline_memory_bytes'])} | "
                f"{'-' if tps is None else f'{tps:,.0f}'} | "
                f"{'-' if base_tps is None else f'{base_tps:,.0f}'} | "
                f"{_ratio(tps, base_tps)} |")
    return "\n".join(lines)


def main() -> int:
    files = sorted(OUTPUTS.glob("*.json"))
    if not files:
        print(f"no results in {OUTPUTS}: run the notebooks first (make run)", file=sys.stderr)
        return 1
    text = table([json.loads(f.read_text()) for f in files])
    (OUTPUTS / "scoreboard.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
