"""Point the notebooks' Colab badges and clone line, and the README's badges, at another repository.

    python scripts/set_repo_url.py https://github.com/you/recipes

The URL is kept once, in pyproject.toml (``[project.urls] Repository``); this rewrites every
``github.com/<owner>/<name>`` of the current URL in pyproject.toml, README.md and the notebooks (both
twins), so Colab opens your fork's notebooks and their install cell clones your fork.
``tests/test_colab.py`` checks that they all agree.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
URL = re.compile(r"^https://github\.com/([A-Za-z0-9][\w.-]*)/([\w.-]+?)(?:\.git)?/?$")


def current_url(root: Path = ROOT) -> str:
    """The repository URL in ``pyproject.toml``."""
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def files(root: Path = ROOT) -> list[Path]:
    """Every file that names the repository."""
    return [root / "pyproject.toml", root / "README.md", *sorted((root / "notebooks").glob("*.ipynb")),
            *sorted((root / "notebooks").glob("*.py"))]


def set_repo_url(new: str, root: Path = ROOT) -> list[Path]:
    """Replace the current ``owner/name`` by ``new``'s everywhere; returns the files changed."""
    match = URL.match(new)
    if not match:
        raise SystemExit(f"{new!r}: give a GitHub URL like https://github.com/you/recipes (Colab opens "
                         "notebooks from GitHub)")
    old_slug = "/".join(URL.match(current_url(root)).groups())
    new_slug = "/".join(match.groups())
    changed = []
    for path in files(root):
        text = path.read_text()
        updated = text.replace(f"github.com/{old_slug}", f"github.com/{new_slug}")
        updated = updated.replace(f"colab.research.google.com/github/{old_slug}/",
                                  f"colab.research.google.com/github/{new_slug}/")
        if updated != text:
            path.write_text(updated)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="your repository, e.g. https://github.com/you/recipes")
    args = parser.parse_args(argv)
    for path in set_repo_url(args.url):
        print("updated", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
