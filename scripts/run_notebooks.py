"""Execute notebooks top to bottom on this machine, a progress bar per notebook.

    python scripts/run_notebooks.py notebooks/*.ipynb             # executed copies -> outputs/
    python scripts/run_notebooks.py --inplace notebooks/01_*.ipynb # refresh the committed outputs

Exits non-zero, naming the notebook and cell, if any cell fails (a failed ``assert`` included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent


def execute(path: Path, timeout: int, kernel: str, checkpoint: Path | None = None) -> nbformat.NotebookNode:
    """Run every cell of ``path`` with the notebook's folder as the working directory.

    Args:
        checkpoint: write the notebook there after every cell, so a run that fails or is killed
            half-way still leaves what it executed (a GPU lease can end mid-run).
    """
    os.environ.setdefault("RECIPES_PROGRESS", "0")  # a saved bar would show its first state only
    nb = nbformat.read(path, as_version=4)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    bar = tqdm(total=n_code, desc=path.stem, unit="cell")

    def cell_done(**_):
        bar.update(1)
        if checkpoint is not None:
            nbformat.write(nb, checkpoint)

    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                            resources={"metadata": {"path": str(path.parent)}}, on_cell_executed=cell_done)
    try:
        client.execute()
    finally:
        bar.close()
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--inplace", action="store_true", help="write outputs back into the notebooks")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs", help="folder for executed copies")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds allowed per cell")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for path in args.notebooks:
        start = time.time()
        try:
            nb = execute(path, args.timeout, args.kernel, checkpoint=args.out / f"{path.stem}.partial.ipynb")
        except CellExecutionError as error:
            failed.append(path.name)
            print(f"FAILED {path.name} (executed cells: {args.out / path.stem}.partial.ipynb):\n"
                  f"{str(error)[-3000:]}", file=sys.stderr)
            continue
        target = path if args.inplace else args.out / path.name
        nbformat.write(nb, target)
        print(f"{path.name}: executed in {time.time() - start:.0f} s -> {target}")
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
