"""The ``recipes eval``, ``recipes bench`` and ``recipes export`` subcommands: their options and handlers.

``add(commands)`` registers them on the ``recipes`` parser (``cli``); each handler returns an exit code,
and every ``RecipeError`` becomes one line on stderr and exit code 2, as for ``recipes train``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import datasets

import recipes_lib

from ..core.errors import RecipeError
from . import bench_cmd, config, evaluate, export, techniques

DATA_OPTIONS = {"split": "split to read (default: the run's, else train)",
                "format": "prompt_response, chat or text (default: the run's, else prompt_response)",
                "prompt-column": None, "response-column": None, "messages-column": None, "text-column": None}


def add(commands) -> None:
    """Register ``eval``, ``bench`` and ``export`` on the ``recipes`` subcommand parser."""
    ev = commands.add_parser("eval", help="score a run (or a model) against its base on held-out data",
                             description=evaluate.__doc__.splitlines()[0].replace("``", "`"))
    ev.add_argument("target", help="a `recipes train` output folder, a model folder or a hub id")
    ev.add_argument("--data", help="data to score (default: the run's validation split)")
    for name, text in DATA_OPTIONS.items():
        default = name.split("-")[0]
        ev.add_argument(f"--{name}", help=text or f"column name (default: the run's, else {default})")
    ev.add_argument("--max-examples", type=int, help="score only the first N rows of the data")
    ev.add_argument("--base", help="a base model to put beside a model (a run knows its own)")
    ev.add_argument("--max-new-tokens", type=int, help="answer length (default: longest reference + 4)")
    ev.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
    ev.add_argument("--out", help="folder for eval_results.json and predictions.jsonl (default: RUN/eval)")
    ev.set_defaults(handler=_eval)

    be = commands.add_parser("bench", help="measure one recipe of the notebooks against its plain reference",
                             description=bench_cmd.__doc__.splitlines()[0].replace("``", "`"))
    be.add_argument("--technique", help="one of: " + ", ".join(techniques.TECHNIQUES))
    be.add_argument("--list", action="store_true", help="name and describe every technique")
    be.add_argument("--model", help="hub id, model folder or random:<shape> (default: the profile's)")
    be.add_argument("--seq-len", type=int)
    be.add_argument("--micro-batch", type=int)
    be.add_argument("--steps", type=int, help="timed steps (or repeats)")
    be.add_argument("--nproc", type=int, help="processes for the multi-GPU techniques (default: the GPUs)")
    be.add_argument("--json", help="also write the rows to this JSON file")
    be.set_defaults(handler=bench_cmd.main)

    ex = commands.add_parser("export", help="write the same run for another trainer (Axolotl)")
    ex.add_argument("tool", choices=["axolotl"])
    ex.add_argument("config", help="a `recipes train` YAML config")
    ex.add_argument("overrides", nargs="*", help="key=value, as for recipes train")
    ex.add_argument("-o", "--out", help="where to write (default: <config>.axolotl.yaml beside it)")
    ex.add_argument("--gpus", type=int, default=1,
                    help="GPUs of the Axolotl run (sets gradient accumulation)")
    ex.set_defaults(handler=_export)


def run(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; a RecipeError is one line on stderr and exit code 2."""
    recipes_lib.quiet()
    datasets.disable_progress_bars()
    try:
        return args.handler(args)
    except RecipeError as error:
        print(f"recipes {args.command}: {error}", file=sys.stderr)
        return 2


def _eval(args) -> int:
    updates = {"source": args.data, "split": args.split, "format": args.format,
               "prompt_column": args.prompt_column, "response_column": args.response_column,
               "messages_column": args.messages_column, "text_column": args.text_column,
               "max_examples": args.max_examples}
    if args.batch_size < 1:
        raise RecipeError(f"--batch-size={args.batch_size}: give a positive number of prompts")
    results = evaluate.run(args.target, updates, args.out, args.base, args.max_new_tokens, args.batch_size)
    print(evaluate.table(results))
    print("wrote", ", ".join(results["written"]))
    return 0


def _export(args) -> int:
    cfg = config.load(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(args.config).with_suffix(".axolotl.yaml")
    warnings = export.write(cfg, out, args.gpus, source=" ".join([args.config, *args.overrides]))
    for warning in warnings:
        print(f"recipes export: {warning}", file=sys.stderr)
    print(json.dumps({"wrote": str(out), "warnings": sum(w.startswith("warning") for w in warnings)}))
    return 0
