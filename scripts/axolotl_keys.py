"""Axolotl's own config schema, for `recipes export axolotl`: list its keys, validate exported files.

Axolotl's full install pulls in gradio, xformers, lm-eval and more; its schema (pydantic models in
``axolotl.utils.schemas``) imports with this project's environment alone. So: unpack its wheel aside and
put it on the path, without installing it.

    pip download axolotl==0.19.0 --no-deps -d /tmp/axolotl
    unzip -q -o /tmp/axolotl/*.whl -d /tmp/axolotl/src
    PYTHONPATH=/tmp/axolotl/src python scripts/axolotl_keys.py --list   # data/axolotl_config_keys.txt
    PYTHONPATH=/tmp/axolotl/src python scripts/axolotl_keys.py --validate my.axolotl.yaml --gpus 2

``--validate`` runs ``AxolotlConfigWCapabilities`` (what ``axolotl train`` checks a config with, on a GPU
with bf16) and refuses top-level keys the schema does not know (pydantic would ignore them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

KEYS_FILE = Path(__file__).resolve().parent.parent / "data" / "axolotl_config_keys.txt"


def schema_keys(model) -> list[str]:
    """Field names and aliases of a pydantic model."""
    names = set(model.model_fields)
    names |= {f.alias for f in model.model_fields.values() if f.alias}
    return sorted(names)


def validate(path: str, gpus: int) -> list[str]:
    """The problems Axolotl's schema finds in the config at ``path`` (empty: it validates)."""
    import torch
    from axolotl.utils.schemas.config import AxolotlConfigWCapabilities, AxolotlInputConfig
    from pydantic import ValidationError

    raw = yaml.safe_load(Path(path).read_text())
    problems = [f"unknown key {k!r}" for k in sorted(set(raw) - set(schema_keys(AxolotlInputConfig)))]
    capabilities = {"bf16": True, "tf32": True, "n_gpu": gpus, "n_node": 1, "compute_capability": "sm_90"}
    try:
        AxolotlConfigWCapabilities(**raw, capabilities=capabilities,
                                   env_capabilities={"torch_version": torch.__version__.split("+")[0]})
    except ValidationError as error:
        problems += [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help=f"write {KEYS_FILE.name}")
    parser.add_argument("--validate", nargs="*", default=[], help="exported Axolotl configs to validate")
    parser.add_argument("--gpus", type=int, default=1)
    args = parser.parse_args()
    from axolotl import __version__
    from axolotl.utils.schemas.config import AxolotlInputConfig

    if args.list:
        header = f"# the top-level config keys of axolotl {__version__} (scripts/axolotl_keys.py --list)"
        KEYS_FILE.write_text("\n".join([header, *schema_keys(AxolotlInputConfig)]) + "\n")
        print(f"wrote {KEYS_FILE} from axolotl {__version__}")
    failed = 0
    for path in args.validate:
        problems = validate(path, args.gpus)
        print(f"{path}: " + ("valid for axolotl " + __version__ if not problems else "; ".join(problems)))
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
