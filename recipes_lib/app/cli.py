"""The ``recipes`` command line: ``recipes train CONFIG [key=value ...] [--resume PATH]``.

Also ``python -m recipes_lib train ...``, which is what ``torchrun`` and ``accelerate launch`` start.
``recipes train --help`` lists every configuration key with its default. ``recipes eval``,
``recipes bench`` and ``recipes export`` are in ``commands``, ``recipes estimate`` in ``estimate_cmd``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import recipes_lib

from ..core.errors import RecipeError
from . import checkpoint, config, estimate_cmd, preflight, trainer
from . import commands as subcommands

USAGE = """recipes train CONFIG [key=value ...] [--resume PATH]

  CONFIG       a YAML file (configs/ has examples; configs/reference.yaml lists every key)
  key=value    overrides: a dotted key (optim.lr=1e-4) or a key only one section has (lr=1e-4)
  --resume     continue from this checkpoint folder (or set checkpoint.resume=true to take the latest)
  --print-config  print the validated config and exit
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipes", description="Measured LLM training recipes.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", usage=USAGE, add_help=False,
                                    help="fine-tune a model as a config file says")
    train_cmd.add_argument("config", nargs="?")
    train_cmd.add_argument("overrides", nargs="*")
    train_cmd.add_argument("--resume", default=None)
    train_cmd.add_argument("--print-config", action="store_true")
    train_cmd.add_argument("-h", "--help", action="store_true")
    subcommands.add(commands)
    estimate_cmd.add_parser(commands)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; ``key=value`` overrides may also come after the options
    (``recipes train CONFIG --resume PATH lr=1e-4``), where argparse alone would refuse them."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if getattr(args, "handler", None) is not None:  # eval, bench, export
        return subcommands.run(args)
    if args.help:
        print(USAGE + "\nEvery key, with its default:\n\n" + config.reference_yaml())
        return 0
    if args.config is None:
        print(f"usage: {USAGE}\nrecipes train: give a CONFIG file (the quick start: "
              "configs/lora-tiny-cpu.yaml; recipes train --help lists every key)", file=sys.stderr)
        return 2
    recipes_lib.quiet()
    main_rank, cfg = os.environ.get("RANK", "0") == "0", None  # one summary per run, not one per rank
    try:
        cfg = config.load(args.config, args.overrides)
        if args.print_config:
            print(json.dumps(cfg.model_dump(), indent=1))
            return 0
        summary = trainer.run(cfg, resume_from=args.resume)
    except RecipeError as error:
        print(f"recipes train: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if main_rank:
            print(f"\nrecipes train: {interrupted(cfg)}", file=sys.stderr)
        return 130
    if main_rank:
        print(json.dumps(summary, indent=1))
    return 0


def interrupted(cfg: config.RunConfig | None) -> str:
    """What Ctrl-C leaves, and how to go on from it."""
    last = checkpoint.latest(cfg.output.dir) if cfg is not None else None
    if last is None:
        return "interrupted before a checkpoint was saved: run the same command to start again"
    return (f"interrupted; {last} holds step {preflight.step_of(last)}: run the same command with "
            f"checkpoint.resume=true to continue from it")
