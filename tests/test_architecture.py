"""The package's shape (recipes_lib/README.md): layers whose imports point down, short modules,
no private name used across modules, no import inside a function to dodge a cycle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "recipes_lib"
# What each layer may import from the package (besides itself).
LAYERS = {
    "core": set(),
    "measure": {"core"},
    "memory": {"core", "measure"},
    "parallel": {"core", "measure", "memory"},
    "inference": {"core", "measure"},
    "attention": {"core", "measure"},
    "long_context": {"core", "measure", "attention"},
    "top": {"core", "measure", "memory", "parallel", "inference", "attention", "long_context", "top"},
    # the `recipes` command: the application over every layer (nothing imports it)
    "app": {"core", "measure", "memory", "parallel", "inference", "attention", "long_context", "top"},
}
# measure holds the harnesses that time the techniques (decode, attention kernels): they may use them.
MEASURE_USES = {"attention", "inference"}
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _layer(path: Path) -> str:
    if path.name == "__main__.py":  # `python -m recipes_lib`: the command line's entry point
        return "app"
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else "top"


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(absolute module, imported names, inside a function?) of each recipes_lib import in ``path``."""
    tree = ast.parse(path.read_text())
    package = ["recipes_lib", *path.relative_to(PACKAGE).parent.parts]
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.startswith("recipes_lib"):
                found.append((module, [a.name for a in node.names], id(node) in nested))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in nested) for a in node.names
                      if a.name.startswith("recipes_lib")]
    return found


def _target_layer(module: str, names: list[str]) -> set[str]:
    parts = module.split(".")[1:]
    if not parts:  # from recipes_lib import x
        return {n if (PACKAGE / n).is_dir() else "top" for n in names}
    return {parts[0] if (PACKAGE / parts[0]).is_dir() else "top"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    layer = _layer(path)
    allowed = LAYERS[layer] | {layer} | (MEASURE_USES if layer == "measure" else set())
    for module, names, _ in _imports(path):
        wrong = _target_layer(module, names) - allowed
        assert not wrong, f"{path.name} ({layer}) imports {module} {names}; it may import {sorted(allowed)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_lazy_package_import_and_no_private_name(path):
    for module, names, inside_function in _imports(path):
        assert not inside_function, f"{path.name} imports {module} inside a function"
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{path.name} imports private {private} from {module}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_short(path):
    assert len(path.read_text().splitlines()) < 300, f"{path.name}: split it by concern (300 lines at most)"


def test_no_private_attribute_of_another_module():
    """``module._name`` across modules (a private helper reached from outside) is not used."""
    for path in MODULES:
        imported = {name for module, names, _ in _imports(path) for name in names}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in imported and node.attr.startswith("_") and not node.attr.startswith("__"):
                    pytest.fail(f"{path.name} uses {node.value.id}.{node.attr}")
