"""Lower layers never import higher ones: the package import graph follows LAYERS."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_loop"
# A package may import packages of its own layer or below.
LAYERS = {
    "config": 0, "utils": 0,
    "data": 1,
    "models": 2, "losses": 2, "generation": 2, "checkpointing": 2, "checkpoint_manifest": 2,
    "tasks": 2,
    "algorithms": 3,
    "evaluation": 4,
    "experiments": 5,
}


def _imports(path: Path) -> set[str]:
    """Top-level nemo_loop packages imported anywhere in ``path`` (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found |= {name.split(".")[1] for name in names
                  if name.startswith("nemo_loop.") and name.count(".") >= 1}
    return found


def _package(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_package_has_a_layer():
    packages = {_package(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
                or p.parent != PACKAGE}
    assert packages <= set(LAYERS), packages - set(LAYERS)


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        own = _package(path)
        for imported in _imports(path):
            if LAYERS[imported] > LAYERS[own]:
                violations.append(f"{path.relative_to(PACKAGE.parent)} ({own}) imports "
                                  f"nemo_loop.{imported}")
    assert not violations, "\n".join(violations)


def test_data_and_algorithms_never_import_evaluation():
    for package in ("data", "algorithms", "tasks"):
        for path in (PACKAGE / package).rglob("*.py"):
            assert "evaluation" not in _imports(path), path
